"""One SQLite connection to the queue: how it is set up (:func:`connect`), a transaction
(:func:`run_transaction`), the store error an sqlite3 error means (:func:`translate`) and
small helpers. No event loop here: the service runs these on a connection's own thread
(:mod:`pigateway.store.thread`), ``pigateway send`` calls them directly
(:mod:`pigateway.store.producer`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from pigateway.config import StoreConfig
from pigateway.errors import StoreConflict, StoreCorrupt, StoreError, StoreFull
from pigateway.store import owners

T = TypeVar("T")

#: Page size of a new queue file, and WAL pages between automatic checkpoints.
PAGE_SIZE = 2048
WAL_CHECKPOINT_PAGES = 10_000
#: Bytes the WAL is cut back to after a checkpoint: one checkpoint interval. Without it the
#: file keeps the size of the largest transaction it ever held (a purge, a migration).
JOURNAL_SIZE_LIMIT = WAL_CHECKPOINT_PAGES * PAGE_SIZE
#: Where statement journals and temporary tables live (``PRAGMA temp_store``): memory.
TEMP_STORE = "MEMORY"


def connect(config: StoreConfig) -> sqlite3.Connection:
    """A connection set up the way every connection to the queue must be; a file SQLite
    cannot open or set up is the store error it means (:func:`translate`)."""
    try:
        return _set_up(sqlite3.connect(config.path, timeout=config.busy_timeout,
                                       isolation_level=None, check_same_thread=False), config)
    except sqlite3.Error as exc:
        raise translate(exc, config.path) from exc


def _set_up(conn: sqlite3.Connection, config: StoreConfig) -> sqlite3.Connection:
    """The pragmas every connection runs with; the connection is closed if one fails."""
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
        # A statement's journal (the pages it changed, kept to undo it alone: an ack of 500
        # rows, a job's savepoint in a group commit) goes to a temporary file past 64 KB:
        # ~180 KB written again for every chunk of 500 acks, a third of a command's bytes.
        # In memory it is bounded by the statement, and every verb works in chunks of at
        # most SWEEP_CHUNK rows; a migration, which may rewrite a whole backlog in one
        # statement, runs with a file (schema.migrate). Nothing durable is in it: it only
        # undoes a statement inside a transaction that has not committed.
        conn.execute(f"PRAGMA temp_store = {TEMP_STORE}")
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


#: SQLite's primary result codes the store tells apart (an extended code's low byte).
_FULL: Final = frozenset({sqlite3.SQLITE_FULL})
_CORRUPT: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_READONLY: Final = frozenset({sqlite3.SQLITE_READONLY})
_BUSY: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
#: What SQLite says when a write or a file it needs fails: on a read-only file system,
#: that is what it is told.
_CANNOT_WRITE: Final = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})


def translate(exc: sqlite3.Error, path: Path) -> StoreError:
    """Turn an sqlite3 error into the store error a caller can act on, by SQLite's result
    code (``sqlite_errorcode``), never by the words of its message, which a trigger, a
    table name or another SQLite version can change."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if primary in _FULL:
        return StoreFull(f"the disk under {path} is full; queued commands are kept, new ones "
                         "are refused until space is freed")
    if primary in _CORRUPT:
        return StoreCorrupt(f"{path} is corrupt ({exc}); restart pigateway to quarantine it")
    if primary in _READONLY or (primary in _CANNOT_WRITE and owners.read_only(path)):
        return owners.refusal(path)  # a card gone read-only, or a file of another user
    if primary in _BUSY:
        return StoreError(f"{path} stayed locked by another process: {exc}")
    if primary == sqlite3.SQLITE_CONSTRAINT:
        return StoreConflict(f"{path}: {exc}")
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
