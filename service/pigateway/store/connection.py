"""One SQLite connection and the one thread it runs on, and the helpers around it.

Every connection to the queue is set up by :func:`connect` and lives on its own thread
(:class:`SqliteThread`): a whole transaction is one hop to that thread, which matters
because each hop costs about as much as a small statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pigateway.config import StoreConfig
from pigateway.errors import StoreCorrupt, StoreError, StoreFull

T = TypeVar("T")

#: Page size of a new queue file, and WAL pages between automatic checkpoints.
PAGE_SIZE = 2048
WAL_CHECKPOINT_PAGES = 10_000
#: Bytes the WAL is cut back to after a checkpoint: one checkpoint interval. Without it the
#: file keeps the size of the largest transaction it ever held (a purge, a migration).
JOURNAL_SIZE_LIMIT = WAL_CHECKPOINT_PAGES * PAGE_SIZE


class SqliteThread:
    """A ``sqlite3`` connection owned by one thread: everything on it runs there, in order.

    Standard library only: a thread serving a :class:`queue.SimpleQueue` and answering
    through :meth:`asyncio.loop.call_soon_threadsafe`, so no private API of a wrapper is
    involved. (A ``ThreadPoolExecutor(max_workers=1)`` with ``run_in_executor`` does the
    same with more bookkeeping per hop: one-row commits measured ~15% slower with it, and a
    put is one hop.) The thread is a daemon: a process that exits without closing its store
    does not hang, and an unfinished transaction is rolled back by SQLite.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Hop | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    @classmethod
    async def open(cls, config: StoreConfig, name: str) -> SqliteThread:
        thread = cls(name)
        try:
            thread._conn = await thread._hop(functools.partial(connect, config))
        except BaseException as exc:
            thread._jobs.put(None)
            if isinstance(exc, sqlite3.Error):
                raise translate(exc, config.path) from exc
            raise
        return thread

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the connection's thread, in one hop."""
        if self._closed:
            raise StoreError("the store's connection is closed")
        return await self._hop(functools.partial(fn, self._conn, *args))

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._conn is not None:
                await self._hop(self._conn.close)
        finally:
            self._jobs.put(None)

    async def _hop(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Hop(loop, future, fn))
        return await future

    def _serve(self) -> None:
        while (hop := self._jobs.get()) is not None:
            try:
                result = hop.fn()
            except BaseException as exc:  # handed to the caller, whatever it is
                hop.answer(None, exc)
            else:
                hop.answer(result, None)


class _Hop(NamedTuple):
    """One function for the thread, and where its outcome goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    fn: Callable[[], Any]

    def answer(self, result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def connect(config: StoreConfig) -> sqlite3.Connection:
    """A connection set up the way every connection to the queue must be."""
    conn = sqlite3.connect(config.path, timeout=config.busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        # Small pages and a WAL of ~20 MB between checkpoints: each commit rewrites fewer
        # bytes of half-filled pages, and hot pages reach the database file less often
        # (fewer bytes written per command over its life, which is what wears an SD card).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect on a new file only
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
        conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout * 1000)}")
        conn.execute("PRAGMA cache_size = -2000")
        # Debian builds SQLite with secure_delete on: it zeroes deleted rows, which costs
        # the SD card writes for every acked command. FAST zeroes only where it is free.
        conn.execute("PRAGMA secure_delete = FAST")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def run_transaction(conn: sqlite3.Connection, path: Path,
                    run: Callable[[sqlite3.Connection], T]) -> T:
    """``BEGIN IMMEDIATE``, ``run``, ``COMMIT``; roll back and translate on any error."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = run(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        rollback(conn)
        raise translate(exc, path) from exc
    except BaseException:
        rollback(conn)
        raise
    return result


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """Turn an sqlite3 error into the store error a caller can act on."""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StoreFull(f"the disk under {path} is full; queued commands are kept, new ones "
                         "are refused until space is freed")
    if "malformed" in text or "not a database" in text:
        return StoreCorrupt(f"{path} is corrupt ({exc}); restart pigateway to quarantine it")
    if "locked" in text or "busy" in text:
        return StoreError(f"{path} stayed locked by another process: {exc}")
    return StoreError(f"{path}: {exc}")


def select_one(conn: sqlite3.Connection) -> None:
    """The ping: the connection answers a statement that reads no table (takes no lock)."""
    conn.execute("SELECT 1").fetchall()


def truncate_wal(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the file and cut it to zero bytes; best effort (a reader may hold it)."""
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def data_version(conn: sqlite3.Connection) -> int:
    """Moves only when *another* connection commits (run it between transactions)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def first(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return tuple(row)


def fetch_all(conn: sqlite3.Connection, sql: str,
              params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(sql, params).fetchall()]


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def marks(count: int) -> str:
    """``?,?,?``: the placeholders of an ``IN (...)`` list."""
    return ",".join("?" * count)
