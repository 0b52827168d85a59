"""What every view of the queue reads (:class:`Reads`), and :class:`QueueReader`, the
queue file opened read-only for the CLI verbs that only look."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Self

from pigateway.config import StoreConfig
from pigateway.errors import NewerSchema, OlderSchema, StoreCorrupt, StoreError
from pigateway.store import clock, clock_row, delivery, owners
from pigateway.store.clock import GatewayClock
from pigateway.store.connection import first, translate
from pigateway.store.files import check_header, refuse_folder
from pigateway.store.inbox import InboxReads
from pigateway.store.outbox import tier_queries
from pigateway.store.schema import MIGRATIONS
from pigateway.store.values import (
    COMMAND_COLUMNS,
    Command,
    DeadLetter,
    Stats,
    check_name,
    shown_row,
)

#: ``queue ls``: every queued row, in flights too, in the order the drain claims them.
_LISTING_ORDER = tier_queries(COMMAND_COLUMNS, unclaimed=False)


class Reads:
    """What every view of the queue reads: the service's and producers' :class:`Store`, and
    the read-only :class:`QueueReader` of ``status``, ``queue ls/stats`` and ``inbox ls``."""

    #: the clock of every ``expires_at`` in the file (see :mod:`pigateway.store.clock`)
    clock: GatewayClock

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    @cached_property
    def inbox(self) -> InboxReads:
        """The inbox's reads (commands from the broker): find, pending, listing."""
        return InboxReads(self._fetch)

    async def stats(self) -> Stats:
        """Depth, bytes, oldest age, in flight and dead letters, read from the rows."""
        totals = await self._fetch("SELECT commands, bytes FROM totals WHERE id = 1")
        commands, size = totals[0] if totals else (0, 0)
        oldest = await self._fetch("SELECT queued_at FROM outbox ORDER BY seq LIMIT 1")
        in_flight = await self._fetch("SELECT count(*) FROM inflight")
        dead = await self._fetch("SELECT reason, count(*) FROM dead_letters GROUP BY reason")
        age = max(0.0, time.time() - oldest[0][0]) if oldest else None
        return Stats(depth=commands, bytes=size, oldest_age=age,
                     in_flight=in_flight[0][0] if in_flight else 0,
                     dead={reason: count for reason, count in dead})

    async def where(self, id_: str) -> delivery.Where:
        """Where command ``id_`` is: queued (position, attempts, last error), in flight,
        delivered (batch, when: watched commands, kept
        :data:`~pigateway.store.delivery.KEPT_SECONDS`), dead (reason), or unknown."""
        check_name("command id", id_)
        return delivery.where_of(id_, [await self._fetch_if_there(sql, (id_,))
                                       for sql in delivery.WHERE_SQL])

    async def key_owner(self, key: str) -> str | None:
        """The id of the command producer ``key`` names (``send --id KEY``), within the
        :data:`~pigateway.store.delivery.KEY_SECONDS` a key is kept; ``None`` otherwise."""
        check_name("producer key", key)
        rows = await self._fetch_if_there(
            delivery.KEY_OWNER_SQL, (key, self.clock.now() - delivery.KEY_SECONDS))
        return str(rows[0][0]) if rows else None

    async def _fetch_if_there(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """:meth:`_fetch`, with nothing for a table or column an older schema lacks (a file
        the service has not migrated yet is read as far as it goes)."""
        try:
            return await self._fetch(sql, params)
        except OlderSchema:
            return []

    async def forwarded(self) -> tuple[int, int]:
        """Queued forwarded messages (ingest) and their bytes, apart from commands; a scan
        (no index on kind): for ``queue stats``, not for the service's twice-a-second view."""
        rows = await self._fetch("SELECT count(*), coalesce(sum(size), 0) FROM outbox "
                                 "WHERE kind = 'forward'")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    async def list_queued(self, limit: int = 100) -> list[Command]:
        """The oldest ``limit`` commands, in the order they will be sent.

        For people: ``expires_at`` is shown as the wall time it falls at now.
        """
        rows: list[tuple[Any, ...]] = []
        for query in _LISTING_ORDER:
            if len(rows) < limit:
                rows += await self._fetch(query, (limit - len(rows),))
        return [self._for_display(shown_row(row)) for row in rows]

    async def list_dead(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters (``expires_at`` as wall time, as above)."""
        rows = await self._fetch(
            "SELECT 0, id, kind, device, name, params, size, queued_at, expires_at, attempts, "
            "last_error, reason, detail, dead_at FROM dead_letters ORDER BY dead_at DESC LIMIT ?",
            (limit,))
        return [DeadLetter(self._for_display(shown_row(row)), row[11], row[12], row[13])
                for row in rows]

    async def oldest_ttl(self) -> float | None:
        """The ttl the oldest queued command came with (``None``: none, or no ttl stored)."""
        rows = await self._fetch("SELECT ttl FROM outbox ORDER BY seq LIMIT 1")
        return rows[0][0] if rows else None

    def _for_display(self, command: Command) -> Command:
        return command._replace(expires_at=self.clock.to_wall(command.expires_at))


class QueueReader(Reads):
    """The queue file opened read-only (``mode=ro``), for the verbs that only look.

    It never creates, migrates or moves a file: a missing file reads as an empty queue with
    a :attr:`note`; a damaged one raises :class:`StoreCorrupt` and is left where it is (the
    service moves it aside); an older schema is read as far as it goes, with a note. (Over
    an existing file SQLite may add its -wal/-shm, owned like the file even when run as root.)
    """

    def __init__(self, path: Path, conn: sqlite3.Connection | None, note: str | None, *,
                 older: bool = False) -> None:
        self.path = path
        self.note = note
        #: The file's schema is older than this code's: a statement it cannot prepare
        #: (SQLite's plain ``SQLITE_ERROR``: a table or column it lacks) is the schema's
        self.older = older
        self._conn = conn
        self.clock = GatewayClock(clock.current(_stored_reading(conn)))

    @classmethod
    async def open(cls, config: StoreConfig) -> QueueReader:
        return await asyncio.to_thread(cls._open, config)

    @classmethod
    def _open(cls, config: StoreConfig) -> QueueReader:
        path = config.path
        refuse_folder(path)
        if not path.exists():
            return cls(path, None, f"no queue file at {path} yet: nothing is queued")
        problem = check_header(path)
        if problem is not None:
            raise _reader_refusal(path, problem)
        if path.stat().st_size == 0:
            return cls(path, None, f"{path} is empty: nothing is queued")
        try:
            conn, version = _connect(path, "mode=ro", config.busy_timeout)
        except sqlite3.DatabaseError as exc:
            if not owners.read_only(path):
                raise _reader_refusal(path, str(exc)) from exc
            # a card gone read-only: SQLite cannot make the -shm a WAL file's reader needs;
            # a file closed cleanly (no -wal) cannot change there, and reads as it is
            if Path(f"{path}-wal").exists():
                raise owners.read_only_error(path) from exc
            try:
                conn, version = _connect(path, "immutable=1", config.busy_timeout)
            except sqlite3.DatabaseError:
                raise _reader_refusal(path, str(exc)) from exc
        if version > len(MIGRATIONS):
            conn.close()
            raise NewerSchema(path, version, len(MIGRATIONS))
        note = None if version == len(MIGRATIONS) else (
            f"{path} has schema version {version}; the service migrates it to "
            f"{len(MIGRATIONS)} when it starts")
        return cls(path, conn, note, older=version < len(MIGRATIONS))

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._conn is None:
            return []
        return await asyncio.to_thread(self._fetch_now, self._conn, sql, params)

    def _fetch_now(self, conn: sqlite3.Connection, sql: str,
                   params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if self.older and exc.sqlite_errorcode == sqlite3.SQLITE_ERROR:
                raise OlderSchema(f"{self.path} has an older schema ({exc}); run the service "
                                  "once to migrate it") from exc
            raise translate(exc, self.path) from exc
        except sqlite3.DatabaseError as exc:
            raise _reader_refusal(self.path, str(exc)) from exc

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def figures(conn: sqlite3.Connection) -> tuple[int, int, float | None, float | None,
                                               dict[str, int]]:
    """Depth, bytes, oldest age, the oldest command's ttl and dead letters by reason, in
    one snapshot of a connection of its own (``pigateway metrics`` with no service up)."""
    conn.execute("BEGIN")  # one snapshot for every read below
    depth, size = first(conn, "SELECT commands, bytes FROM totals WHERE id = 1")
    oldest = conn.execute("SELECT queued_at, ttl FROM outbox ORDER BY seq LIMIT 1").fetchone()
    dead = dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason"))
    age = max(0.0, time.time() - oldest[0]) if oldest else None
    return depth, size, age, oldest[1] if oldest else None, dead


def _stored_reading(conn: sqlite3.Connection | None) -> clock.Reading | None:
    """The gateway clock's row, read without writing (``None``: no file, or a schema from
    before the clock, whose deadlines are wall time, which a new clock starts equal to)."""
    if conn is None:
        return None
    try:
        return clock_row.load(conn)
    except sqlite3.OperationalError:  # no clock table yet
        return None


def _connect(path: Path, how: str, timeout: float) -> tuple[sqlite3.Connection, int]:
    """A connection that has read the schema (``how``: ``mode=ro`` or ``immutable=1``),
    and the file's schema version; :class:`sqlite3.DatabaseError` when it cannot."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{how}", uri=True, timeout=timeout,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    try:
        version = int(first(conn, "PRAGMA user_version")[0])
        conn.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn, version


def _reader_refusal(path: Path, problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"{path} is not a sound queue ({problem}); it was left as it is. "
                        "The service moves it aside and starts a fresh queue when it is "
                        "started or restarted")

