"""The durable command queue: one SQLite file in WAL mode, shared by several processes.

A command is durable once :meth:`Store.put` returns: it is committed, synchronously, to
disk. Concurrent puts share one commit (group commit) through a single writer task, so
durability does not cost throughput. The queue is a narrow interface (put, claim, ack,
nack, dead-letter) in the spirit of huey's storage and persist-queue's ack queue:

* ``outbox`` holds queued commands in ``seq`` order (the order they were put);
* ``inflight`` marks the ones a drainer has claimed; it is emptied when a drainer opens,
  so whatever was in flight when the process died is queued again, first;
* ``dead_letters`` keeps everything that left the queue without delivery, with a reason;
* ``totals`` is one row of count and bytes kept by triggers inside every transaction,
  so limits are checked without scanning and can never drift from the rows.

Nothing is loaded into memory as a whole; every read is bounded by a ``LIMIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import sqlite3
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from pigateway import clock, delivery
from pigateway.clock import GatewayClock
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, QueueFull, StoreCorrupt, StoreError, StoreFull
from pigateway.ids import new_id
from pigateway.inputs import shown, text_problem
from pigateway.metrics import COUNTERS

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Told the running total of rows a long sweep has handled (the CLI prints it).
Progress = Callable[[int], None]

KINDS = ("action", "result", "forward")
MAX_NAME = 128
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100
#: How often a drainer looks for commits made by other processes (``pigateway send``).
POLL_INTERVAL = 0.05
#: Puts coalesced into one transaction at most.
GROUP_LIMIT = 4096
#: Command ids named in one log record at most.
LOGGED_IDS = 100
#: Page size of a new queue file, and WAL pages between automatic checkpoints.
PAGE_SIZE = 2048
WAL_CHECKPOINT_PAGES = 10_000
#: Bytes the WAL is cut back to after a checkpoint: one checkpoint interval. Without it the
#: file keeps the size of the largest transaction it ever held (a purge, a migration).
JOURNAL_SIZE_LIMIT = WAL_CHECKPOINT_PAGES * PAGE_SIZE
#: Rows one transaction of a sweep (expiry, purge, requeue, drop-oldest, dead-letter
#: pruning) handles at most: each chunk is its own commit, so the watchdog's ping,
#: producers and the drain get the writer between chunks, and a kill keeps the chunks done.
SWEEP_CHUNK = 500
#: Seconds one ``claim`` call goes on burying an expired backlog before it hands back an
#: empty claim (and wakes :meth:`Store.wait_for_work`): a cancelled claim ends soon.
CLAIM_SWEEP_SECONDS = 1.0

_INSERT = ("INSERT INTO outbox (id, kind, device, name, params, size, queued_at, expires_at, "
           "ttl) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_COLUMNS = "seq, id, kind, device, name, params, size, queued_at, expires_at, attempts, last_error"

#: Schema migrations, applied in order and tracked by ``PRAGMA user_version``.
#: Never edit an entry that has shipped; append a new one.
MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,  -- no AUTOINCREMENT: it would rewrite a page every commit
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        size INTEGER NOT NULL,
        queued_at REAL NOT NULL,
        expires_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE inflight (seq INTEGER PRIMARY KEY, claimed_at REAL NOT NULL);
    CREATE TABLE dead_letters (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        size INTEGER NOT NULL,
        queued_at REAL NOT NULL,
        expires_at REAL,
        attempts INTEGER NOT NULL,
        last_error TEXT,
        reason TEXT NOT NULL,
        detail TEXT,
        dead_at REAL NOT NULL
    );
    CREATE INDEX dead_letters_reason ON dead_letters (reason);
    CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        commands INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    );
    INSERT INTO totals VALUES (1, 0, 0);
    CREATE TRIGGER outbox_counted AFTER INSERT ON outbox BEGIN
        UPDATE totals SET commands = commands + 1, bytes = bytes + NEW.size WHERE id = 1;
    END;
    CREATE TRIGGER outbox_uncounted AFTER DELETE ON outbox BEGIN
        UPDATE totals SET commands = commands - 1, bytes = bytes - OLD.size WHERE id = 1;
    END;
    """,
    # 2: the inbox of commands from the broker (owned by pigateway.inbound)
    """
    CREATE TABLE inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        received_at REAL NOT NULL,
        expires_at REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        last_error TEXT,
        status TEXT,
        result TEXT,
        finished_at REAL
    );
    CREATE INDEX inbox_state ON inbox (state, seq);
    CREATE INDEX inbox_finished ON inbox (finished_at) WHERE state = 'done';
    """,
    # 3: the gateway clock every expires_at is on (owned by pigateway.clock); the ttl each
    # command came with (expires_at no longer shares a clock with queued_at/received_at, so
    # the ttl cannot be derived from them), and when an inbound one was done on that clock
    # (the dedupe window; finished_at is wall time)
    """
    CREATE TABLE clock (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        boot_id TEXT NOT NULL,
        base REAL NOT NULL,
        reading REAL NOT NULL,
        wall REAL NOT NULL,
        synced INTEGER NOT NULL,
        gap_from REAL
    );
    ALTER TABLE outbox ADD COLUMN ttl REAL;
    ALTER TABLE dead_letters ADD COLUMN ttl REAL;
    ALTER TABLE inbox ADD COLUMN ttl REAL;
    ALTER TABLE inbox ADD COLUMN done_on REAL;
    """,
    # 4: dead letters are bounded (store.max_dead_letters, max_dead_bytes, dead_letter_ttl):
    # their count and bytes kept by triggers like the outbox's, and an index to find the
    # oldest.
    """
    ALTER TABLE totals ADD COLUMN dead_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE totals ADD COLUMN dead_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE totals SET dead_count = (SELECT count(*) FROM dead_letters),
                      dead_bytes = (SELECT coalesce(sum(size), 0) FROM dead_letters)
        WHERE id = 1;
    CREATE TRIGGER dead_counted AFTER INSERT ON dead_letters BEGIN
        UPDATE totals SET dead_count = dead_count + 1, dead_bytes = dead_bytes + NEW.size
            WHERE id = 1;
    END;
    CREATE TRIGGER dead_uncounted AFTER DELETE ON dead_letters BEGIN
        UPDATE totals SET dead_count = dead_count - 1, dead_bytes = dead_bytes - OLD.size
            WHERE id = 1;
    END;
    CREATE INDEX dead_letters_age ON dead_letters (dead_at);
    """,
    # issue 11: delivery records and producer keys (pigateway.delivery)
    delivery.SCHEMA,
]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Command:
    """One queued command, as stored.

    ``queued_at`` is wall time; ``expires_at`` is on the store's gateway clock
    (:mod:`pigateway.clock`), except in :meth:`Store.list_queued`/:meth:`Store.list_dead`,
    which show it as wall time.
    """

    id: str
    device: str
    name: str
    params: dict[str, Any]
    kind: str
    queued_at: float
    expires_at: float | None
    attempts: int
    last_error: str | None
    size: int
    seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``pigateway queue ls --json``."""
        return {
            "id": self.id, "kind": self.kind, "device": self.device, "name": self.name,
            "params": self.params, "queued_at": self.queued_at, "expires_at": self.expires_at,
            "attempts": self.attempts, "last_error": self.last_error, "size": self.size,
        }


@dataclass(frozen=True)
class DeadLetter:
    """A command that left the queue without delivery, and why."""

    command: Command
    reason: str
    detail: str | None
    dead_at: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.command.as_dict(), "reason": self.reason, "detail": self.detail,
                "dead_at": self.dead_at}


@dataclass(frozen=True)
class NewCommand:
    """What a producer hands to :meth:`Store.put_many`."""

    device: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    ttl: float | None = None
    kind: str = "action"
    id: str | None = None


@dataclass(frozen=True)
class Stats:
    """A snapshot of the queue, read from the rows (never from a cache)."""

    depth: int
    bytes: int
    oldest_age: float | None
    in_flight: int
    dead: dict[str, int]

    @property
    def dead_total(self) -> int:
        return sum(self.dead.values())

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "bytes": self.bytes, "oldest_age": self.oldest_age,
                "in_flight": self.in_flight, "dead": dict(self.dead),
                "dead_total": self.dead_total}


# --------------------------------------------------------------------------- ids

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------- validation


def prepare(item: NewCommand, config: StoreConfig, now: float,
            gateway_now: float | None = None) -> tuple[Any, ...]:
    """Check one new command and turn it into a row; raise :class:`InvalidCommand`.

    ``now`` (wall clock) is its ``queued_at``; its ``expires_at`` counts from
    ``gateway_now`` (:mod:`pigateway.clock`), so a wall-clock step cannot move it.
    """
    for label, value in (("device", item.device), ("command name", item.name)):
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
            raise InvalidCommand(f"{label} must be a non-empty string of at most {MAX_NAME} "
                                 f"characters, got {shown(value)}")
        problem = text_problem(value)  # one rule for the CLI, the API and every caller
        if problem is not None:
            raise InvalidCommand(f"{label} {shown(value)} {problem}")
    if item.kind not in KINDS:
        raise InvalidCommand(f"kind must be one of {KINDS}, got {item.kind!r}")
    if not isinstance(item.params, dict):
        raise InvalidCommand(f"params must be a JSON object, got {type(item.params).__name__}")
    try:
        params = _ENCODER.encode(item.params)
        size = len(params.encode())  # a lone surrogate is no UTF-8: UnicodeEncodeError
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidCommand(f"params are not JSON: {str(exc)[:200]}") from exc
    if size > config.max_params_bytes:
        raise InvalidCommand(f"params are {size} bytes; the limit is {config.max_params_bytes} "
                             "(store.max_params_bytes)")
    ttl = _ttl_seconds(config.default_ttl if item.ttl is None else item.ttl)
    start = now if gateway_now is None else gateway_now
    expires_at = start + ttl if ttl > 0 else None
    return (item.id or new_id(), item.kind, item.device, item.name, params, size, now, expires_at,
            ttl)


def _ttl_seconds(value: Any) -> float:
    """A ttl as finite seconds >= 0; anything else (bool, 10**400, nan) is bad input."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        seconds = float(value)  # OverflowError for an int too big for a float
    except (TypeError, OverflowError):
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise InvalidCommand(f"ttl must be a number of seconds >= 0, got {shown(value)}")
    return seconds


def _row_to_command(row: Sequence[Any]) -> Command:
    seq, id_, kind, device, name, params, size, queued_at, expires_at, attempts, error = row[:11]
    return Command(id=id_, device=device, name=name, params=json.loads(params), kind=kind,
                   queued_at=queued_at, expires_at=expires_at, attempts=attempts,
                   last_error=error, size=size, seq=seq)


# --------------------------------------------------------------------------- opening


def _read_header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(HEADER_SIZE)


def check_header(path: Path) -> str | None:
    """The producer's cheap check: ``None`` when the file is missing, empty or starts with a
    whole SQLite header, else what is wrong with it. Reads 100 bytes, whatever the backlog."""
    try:
        head = _read_header(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if head == b"":
        return None
    if not head.startswith(SQLITE_MAGIC):
        return "not an SQLite database (bad header)"
    if len(head) < HEADER_SIZE:
        return f"truncated: {len(head)} bytes, shorter than an SQLite header"
    return None


def check_integrity(path: Path) -> str | None:
    """The drainer's full check at its open: ``None`` when the file is a sound SQLite
    database, else what is wrong with it. ``PRAGMA quick_check`` reads every page, so only
    the drainer runs it (once per start), never a producer (once per ``pigateway send``)."""
    if not path.exists():
        return None
    problem = check_header(path)
    if problem is not None:
        return problem
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError as exc:
        # a full disk (no room for the -shm), a lock, an I/O error: the file may be sound,
        # and moving a sound queue aside would strand every command in it
        stat = os.statvfs(path.parent)
        full = stat.f_bavail * stat.f_frsize < 1 << 20
        raise (StoreFull if full else StoreError)(
            f"cannot check {path} ({exc}{'; the disk is full' if full else ''}); "
            "it was left as it is") from exc
    except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
        return f"{type(exc).__name__}: {exc}"
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    verdict = "; ".join(str(row[0]) for row in rows[:5])
    return None if verdict == "ok" else verdict


def quarantine(path: Path, why: str) -> Path:
    """Move a bad database (and its -wal/-shm) aside; never delete a user's data.

    Only a drainer calls it, holding the drainer lock, so no second process can check or
    move the file meanwhile: the file renamed is the one that was checked. The real file is
    moved (a symlinked ``store.path`` keeps its link), since SQLite keeps its -wal beside it.
    """
    path = path.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    try:
        # the -wal first: left behind by a crash between the renames, it would be
        # replayed into the fresh file; a main file left behind is just checked again
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        path.rename(target)
    except OSError as exc:
        raise StoreCorrupt(f"{path} failed its integrity check ({why}) and cannot be moved "
                           f"aside: {exc}") from exc
    log.critical("queue database %s failed its integrity check (%s); moved it aside as %s "
                 "and started a fresh queue. Recover commands from it with sqlite3.",
                 path, why, target)
    return target


def _producer_refusal(path: Path, problem: str) -> StoreCorrupt:
    """A producer never moves a queue file: that is the drainer's, under its lock (a
    producer's fresh file could be moved by the next producer, with commands in it)."""
    return StoreCorrupt(
        f"{path} is not a sound queue ({problem}); nothing was queued. The service moves it "
        "aside and starts a fresh queue when it is started or restarted")


async def _check_before_open(path: Path, *, drainer: bool) -> None:
    """The drainer, holding its lock, runs the full check and moves a bad file aside; a
    producer reads the header only and refuses a bad file (see :func:`_producer_refusal`)."""
    if drainer:
        problem = await asyncio.to_thread(check_integrity, path)
        if problem is not None:
            quarantine(path, problem)
        return
    problem = check_header(path)
    if problem is not None:
        raise _producer_refusal(path, problem)


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
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


# --------------------------------------------------------------------------- the store


@dataclass
class _Job:
    """One unit of work for the writer; puts are coalesced into one transaction."""

    run: Callable[[sqlite3.Connection], Any] | None
    rows: list[tuple[Any, ...]] | None
    future: asyncio.Future[Any]
    items: list[NewCommand] = field(default_factory=list)
    also: Sequence[tuple[str, Sequence[Any]]] = ()
    #: run on the writer's thread outside any transaction (it takes no lock: the ping)
    bare: bool = False


class Reads:
    """What every view of the queue reads: the service's and producers' :class:`Store`, and
    the read-only :class:`QueueReader` of ``status``, ``queue ls/stats`` and ``inbox ls``."""

    #: the clock of every ``expires_at`` in the file (see :mod:`pigateway.clock`)
    clock: GatewayClock

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query."""
        return await self._fetch(sql, params)

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
        delivered (batch, when; kept :data:`pigateway.delivery.KEPT_SECONDS`), dead
        (reason), or unknown."""
        queued, in_flight, ahead, done, dead = [
            await self._fetch(sql, (id_,)) for sql in delivery.WHERE_SQL]
        return delivery.where_from(
            id_, queued[0][:2] if queued else None, in_flight=bool(in_flight and in_flight[0][0]),
            ahead=ahead[0][0] if ahead else 0, delivered=done[0] if done else None,
            dead=dead[0] if dead else None)

    async def list_queued(self, limit: int = 100) -> list[Command]:
        """The oldest ``limit`` commands, in the order they will be sent.

        For people: ``expires_at`` is shown as the wall time it falls at now.
        """
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM outbox ORDER BY seq LIMIT ?", (limit,))
        return [self._for_display(_row_to_command(row)) for row in rows]

    async def list_dead(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters (``expires_at`` as wall time, as above)."""
        rows = await self._fetch(
            "SELECT 0, id, kind, device, name, params, size, queued_at, expires_at, attempts, "
            "last_error, reason, detail, dead_at FROM dead_letters ORDER BY dead_at DESC LIMIT ?",
            (limit,))
        return [DeadLetter(self._for_display(_row_to_command(row)), row[11], row[12], row[13])
                for row in rows]

    def _for_display(self, command: Command) -> Command:
        return dataclasses.replace(command, expires_at=self.clock.to_wall(command.expires_at))


class QueueReader(Reads):
    """The queue file opened read-only (``mode=ro``), for the verbs that only look.

    It never creates, migrates or moves a file: a missing file reads as an empty queue with
    a :attr:`note`; a damaged one raises :class:`StoreCorrupt` and is left where it is (the
    service moves it aside); an older schema is read as far as it goes, with a note. (Over
    an existing file SQLite may add its -wal/-shm, owned like the file even when run as root.)
    """

    def __init__(self, path: Path, conn: sqlite3.Connection | None, note: str | None) -> None:
        self.path = path
        self.note = note
        self._conn = conn
        self.clock = GatewayClock(clock.current(_stored_reading(conn)))

    @classmethod
    async def open(cls, config: StoreConfig) -> QueueReader:
        return await asyncio.to_thread(cls._open, config)

    @classmethod
    def _open(cls, config: StoreConfig) -> QueueReader:
        path = config.path
        if not path.exists():
            return cls(path, None, f"no queue file at {path} yet: nothing is queued")
        problem = check_header(path)
        if problem is not None:
            raise _reader_refusal(path, problem)
        if path.stat().st_size == 0:
            return cls(path, None, f"{path} is empty: nothing is queued")
        uri = f"{path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=config.busy_timeout,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        try:
            version = int(_first(conn, "PRAGMA user_version")[0])
            conn.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _reader_refusal(path, str(exc)) from exc
        if version > len(MIGRATIONS):
            conn.close()
            raise StoreError(f"{path} has schema version {version}, newer than this pigateway "
                             f"knows ({len(MIGRATIONS)}); upgrade pigateway")
        note = None if version == len(MIGRATIONS) else (
            f"{path} has schema version {version}; the service migrates it to "
            f"{len(MIGRATIONS)} when it starts")
        return cls(path, conn, note)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._conn is None:
            return []
        return await asyncio.to_thread(self._fetch_now, self._conn, sql, params)

    def _fetch_now(self, conn: sqlite3.Connection, sql: str,
                   params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]
        except sqlite3.OperationalError as exc:
            if "no such" in str(exc):
                raise StoreError(f"{self.path} has an older schema ({exc}); run the service "
                                 "once to migrate it") from exc
            raise _translate(exc, self.path) from exc
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


def _stored_reading(conn: sqlite3.Connection | None) -> clock.Reading | None:
    """The gateway clock's row, read without writing (``None``: no file, or a schema from
    before the clock, whose deadlines are wall time, which a new clock starts equal to)."""
    if conn is None:
        return None
    try:
        return clock.load(conn)
    except sqlite3.OperationalError:  # no clock table yet
        return None


def _reader_refusal(path: Path, problem: str) -> StoreCorrupt:
    return StoreCorrupt(f"{path} is not a sound queue ({problem}); it was left as it is. "
                        "The service moves it aside and starts a fresh queue when it is "
                        "started or restarted")


class Store(Reads):
    """The queue. Open with ``await Store.open(config)``; use as an async context manager."""

    def __init__(self, config: StoreConfig, writer: aiosqlite.Connection,
                 raw_writer: sqlite3.Connection, reader: aiosqlite.Connection, *,
                 drainer: bool, gateway_clock: GatewayClock) -> None:
        self.config = config
        #: the clock of every ``expires_at`` in the file (see :mod:`pigateway.clock`)
        self.clock = gateway_clock
        self.path = config.path
        self.drainer = drainer
        self._writer = writer
        self._raw_writer = raw_writer  # used only on the writer's own thread
        self._reader = reader
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._put_event = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._data_version = 0
        #: What the transaction under way will have to say once it commits (dead-lettered,
        #: pruned): said after the COMMIT, never for work a rollback undid.
        self._after_commit: list[Callable[[], None]] = []

    # ---- lifecycle

    @classmethod
    async def open(cls, config: StoreConfig, *, drainer: bool = True) -> Store:
        """Open (creating, migrating, quarantining a corrupt file) and start the writer.

        A ``drainer`` (the service) holds an exclusive lock file so that two services never
        drain one queue, and puts back whatever was in flight when the last one died.
        Producers (``pigateway send``, the Python API) pass ``drainer=False``.
        """
        try:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            lock_fd = _take_drainer_lock(config.path) if drainer else None
        except OSError as exc:  # a read-only file system, a folder owned by someone else
            raise StoreError(f"cannot use {config.path.parent}: {exc}") from exc
        try:
            await _check_before_open(config.path, drainer=drainer)
            writer, raw_writer = await _connect(config)
            try:
                await _on_thread(writer, _migrate, raw_writer, config.path)
                reading = await _on_thread(writer, _clock_reading, raw_writer, config.path)
                reader, _ = await _connect(config)
            except sqlite3.Error as exc:  # a producer met damage its cheap check missed
                await writer.close()
                raise _translate(exc, config.path) from exc
            except BaseException:
                await writer.close()
                raise
        except BaseException:
            _release_lock(lock_fd)
            raise
        store = cls(config, writer, raw_writer, reader, drainer=drainer,
                    gateway_clock=GatewayClock(reading))
        store._lock_fd = lock_fd
        if drainer:
            resumed = await store._resume_in_flight()
            if resumed:
                log.warning("%d commands were in flight when pigateway last stopped; "
                            "they are queued again, first", resumed)
        store._data_version = await store._read_data_version()
        store._writer_task = asyncio.create_task(store._write_loop(), name="store-writer")
        if drainer:
            store._heartbeat_task = asyncio.create_task(store._heartbeat_loop(),
                                                        name="store-clock")
            try:
                await store.prune_dead()  # bounds lowered since, or dead letters aged out
            except BaseException:
                await store.close()
                raise
        return store

    async def close(self) -> None:
        """Finish pending writes and close both connections. Safe to call twice."""
        if self._closed:
            return
        if self._heartbeat_task is not None:
            # not awaited: nothing may stand between close() and stopping the writer
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
            # the last reading, so the next boot continues from the moment we stopped
            _consume(self._submit(clock.heartbeat))
        self._closed = True
        if self._writer_task is not None:
            self._jobs.put_nowait(None)
            # asyncio.wait, not await: a cancelled close() must stay cancelled (3.11)
            await asyncio.wait({self._writer_task})
        await self._writer.close()
        await self._reader.close()
        _release_lock(self._lock_fd)
        self._lock_fd = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- producing

    async def put(self, device: str, name: str, params: dict[str, Any] | None = None, *,
                  ttl: float | None = None, kind: str = "action", id: str | None = None,
                  also: Sequence[tuple[str, Sequence[Any]]] = (),
                  watch: bool = False) -> Command:
        """Queue one command; durable on return. ``also`` runs in the same transaction.
        ``watch``: keep a record of its delivery for :meth:`where` (:mod:`pigateway.delivery`)."""
        if watch:
            id = id or new_id()
            also = [*also, *delivery.watch_statements(id, time.time())]
        item = NewCommand(device=device, name=name, params={} if params is None else params,
                          ttl=ttl, kind=kind, id=id)
        commands = await self._submit_put([item], also)
        return commands[0]

    async def put_many(self, items: Sequence[NewCommand]) -> list[Command]:
        """Queue a list at once, all or nothing; durable on return."""
        if not items:
            return []
        return await self._submit_put(list(items), ())

    async def _submit_put(self, items: list[NewCommand],
                          also: Sequence[tuple[str, Sequence[Any]]]) -> list[Command]:
        now, gateway_now = time.time(), self.clock.now()
        # bad input fails here, in the caller, before it can spoil a shared commit
        rows = [prepare(item, self.config, now, gateway_now) for item in items]
        future: asyncio.Future[list[Command]] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(run=None, rows=rows, items=items, future=future, also=also))
        result = await future
        self._put_event.set()
        return result

    async def bury_new(self, items: Sequence[NewCommand], reason: str, detail: str) -> None:
        """Keep messages that never became commands (an ingested payload that is not one)
        as dead letters with ``reason``: for people to see and requeue by hand, never sent."""
        now, gateway_now = time.time(), self.clock.now()
        rows = [prepare(item, self.config, now, gateway_now) for item in items]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO dead_letters (id, kind, device, name, params, size, queued_at, "
                "expires_at, ttl, attempts, last_error, reason, detail, dead_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, ?, ?, ?)",
                [(*row, reason, detail, now) for row in rows])
            self._prune_dead(conn, len(rows))
        await self._call(run)

    # ---- draining

    async def claim(self, limit: int) -> list[Command]:
        """Mark up to ``limit`` of the oldest queued commands in flight and return them.

        Expired commands met on the way are dead-lettered as ``expired`` and not returned,
        at most :data:`SWEEP_CHUNK` per transaction: an expired backlog is buried chunk by
        chunk, each its own commit. After :data:`CLAIM_SWEEP_SECONDS` of that an empty claim
        comes back and :meth:`wait_for_work` returns at once, so the caller claims again.
        """
        if not self.drainer:
            raise StoreError("this store was opened as a producer; only a drainer claims")
        deadline = time.monotonic() + CLAIM_SWEEP_SECONDS
        while True:
            claimed, more_expired = await self._call(lambda conn: self._claim(conn, limit))
            if claimed or not more_expired:
                return claimed
            if time.monotonic() >= deadline:
                self._put_event.set()  # more to bury: the drain comes back at once
                return claimed

    async def ack(self, ids: Sequence[str], batch: str | None = None) -> int:
        """Delete delivered commands (call only after the broker acknowledged them); with
        ``batch``, keep a delivery record of each in the same transaction
        (:mod:`pigateway.delivery`: ``queue show``, ``send --wait``)."""
        def run(conn: sqlite3.Connection) -> int:
            deleted = self._delete(conn, ids)
            if batch is not None:
                now = time.time()
                if noted := delivery.record(conn, ids, batch, now):
                    delivery.prune(conn, now, noted)
            return deleted
        return await self._call(run)

    async def put_keyed(self, key: str, item: NewCommand) -> tuple[Command | None, str]:
        """Queue ``item`` unless producer ``key`` was used in the last
        :data:`pigateway.delivery.KEY_SECONDS`: then nothing is queued and the first
        command's id comes back (``(None, id)``); else ``(command, its id)``."""
        id_ = item.id or new_id()
        now = time.time()
        statements = [*delivery.key_statements(key, id_, now),
                      *delivery.watch_statements(id_, now)]
        try:
            commands = await self._submit_put([dataclasses.replace(item, id=id_)], statements)
        except StoreError as exc:
            if "producer_keys" not in str(exc):
                raise
            owner = await self._fetch(delivery.KEY_OWNER_SQL,
                                      (key, time.time() - delivery.KEY_SECONDS))
            if not owner:
                raise
            return None, str(owner[0][0])
        return commands[0], id_

    async def nack(self, ids: Sequence[str], error: str) -> None:
        """Put claimed commands back at the head; past ``max_attempts`` they are dead-lettered."""
        await self._call(lambda conn: self._nack(conn, ids, error))

    async def release(self, ids: Sequence[str]) -> None:
        """Put claimed commands back at the head without counting an attempt.

        For rows a drainer claimed but never sent (its link ended first): they were not
        tried, so they must not creep towards ``max_attempts``.
        """
        def run(conn: sqlite3.Connection) -> None:
            for chunk in _chunks(list(ids), 500):
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM inflight WHERE seq IN (SELECT seq FROM outbox "
                             f"WHERE id IN ({marks}))", chunk)
        await self._call(run)

    async def dead_letter(self, ids: Sequence[str], reason: str,
                          detail: str | None = None) -> None:
        """Move commands to the dead-letter table with a reason; logs one warning line."""
        await self._call(lambda conn: self._bury(conn, _seqs_sql(ids), list(ids), reason, detail))

    # ---- observing

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a put happened here or another process committed, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, POLL_INTERVAL)):
                    await self._put_event.wait()
                # consumed here, not cleared on entry: a put that committed after the
                # caller's last (empty) claim must wake it now, not at the next poll
                self._put_event.clear()
                return
            version = await self._read_data_version()
            if version != self._data_version:
                self._data_version = version
                return

    async def heartbeat(self) -> None:
        """Write a reading of the gateway clock (a new boot continues from the last one)."""
        self.clock.adopt(await self._call(clock.heartbeat))

    async def _heartbeat_loop(self) -> None:
        """The drainer's readings, every :data:`pigateway.clock.HEARTBEAT` seconds: one
        small row, committed with whatever else is being written then."""
        while True:
            await asyncio.sleep(clock.HEARTBEAT)
            try:
                await self.heartbeat()
            except StoreError as exc:  # the next one may pass; a reboot meanwhile loses a beat
                log.warning("could not write a reading of the gateway clock: %s", exc)

    async def ping(self) -> None:
        """Return once the writer task and its thread answer (for the watchdog).

        It takes no lock: a lock another process holds is waited out by each transaction
        for at most ``store.busy_timeout`` and then fails alone, so the ping is answered
        after at most that long (the watchdog allows it: :func:`pigateway.systemd.ping_bound`).
        A writer that does not come back (a hung disk) does not answer at all.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(run=_select_one, rows=None, future=future, bare=True))
        await future

    # ---- maintenance

    async def requeue_dead(self, id: str | None = None, *, expired: bool = False,
                           progress: Progress | None = None) -> int:
        """Move dead letters back to the tail of the queue, attempts reset; each keeps its
        own ttl, counted again from now (:func:`requeued_expiry`).

        All of them: every one but the ``expired``, in chunks, each its own commit (a stale
        command is never replayed to a device unasked; one may also have been delivered
        with its PUBACK lost). One by ``id``: an expired one only with ``expired=True``,
        else :class:`InvalidCommand` says how to ask.
        """
        if id is not None:
            return await self._call(lambda conn: self._requeue_one(conn, id, expired=expired))
        bound = await self._call(_max_rowid("dead_letters"))
        return await self._sweep(lambda conn: self._requeue_chunk(conn, bound), progress)

    async def purge(self, *, queued: bool, progress: Progress | None = None) -> int:
        """Delete dead letters, and with ``queued`` the whole queue too. Returns rows deleted.

        In chunks, each its own commit, so a running service keeps its writer; only rows
        that existed when the purge began are deleted (puts meanwhile are kept).
        """
        bound, last = await self._call(
            lambda conn: (_max_rowid("dead_letters")(conn), _max_rowid("outbox")(conn)))
        total = await self._sweep(lambda conn: _purge_dead_chunk(conn, bound), progress)
        if queued:
            total += await self._sweep(lambda conn: _purge_queued_chunk(conn, last),
                                       lambda done: progress(total + done) if progress else None)
        return total

    async def prune_dead(self) -> int:
        """Bring dead letters within their bounds now, in chunks (a drainer does it at open)."""
        return await self._sweep(lambda conn: self._prune_dead(conn, 0), None)

    async def _sweep(self, step: Callable[[sqlite3.Connection], int],
                     progress: Progress | None) -> int:
        """Run ``step`` (which handles at most :data:`SWEEP_CHUNK` rows) in its own
        transactions until it handles fewer: other writers' jobs commit in between."""
        total = 0
        while True:
            done = await self._call(step)
            total += done
            if progress is not None and done:
                progress(total)
            if done < SWEEP_CHUNK:
                return total

    async def sweep(self, statement: tuple[str, Sequence[Any]]) -> int:
        """Run a statement that deletes at most :data:`SWEEP_CHUNK` rows again and again,
        each time its own commit, until it deletes fewer; returns the rows deleted."""
        sql, params = statement
        return await self._sweep(lambda conn: conn.execute(sql, params).rowcount, None)

    async def write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run statements in one durable transaction through the writer."""
        await self.submit_write(statements)

    def submit_write(self, statements: Sequence[tuple[str, Sequence[Any]]]
                     ) -> asyncio.Future[None]:
        """Queue statements now (their place in the commit order is taken on this call);
        await the returned future for their commit."""
        def run(conn: sqlite3.Connection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)
        return self._submit(run)

    def submit_write_keeping_free(self, statements: Sequence[tuple[str, Sequence[Any]]],
                                  headroom: int) -> asyncio.Future[None]:
        """:meth:`submit_write` for a write that promises more writes (an accepted inbound
        command promises its result): refused with :class:`StoreFull` unless
        ``store.min_free_bytes`` plus ``headroom`` bytes stay free, like a put."""
        def run(conn: sqlite3.Connection) -> None:
            self._check_disk(conn, headroom)
            for sql, params in statements:
                conn.execute(sql, params)
        return self._submit(run)

    # ---- the writer: one task, one connection, one commit for many puts

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        self._jobs.put_nowait(job)

    def _submit(self, run: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(run=run, rows=None, future=future))
        return future

    async def _call(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(run)

    async def _write_loop(self) -> None:
        """Take every job waiting and commit them together: one transaction, one fsync."""
        while True:
            jobs = [await self._jobs.get()]
            while len(jobs) < GROUP_LIMIT and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            work = [job for job in jobs if job is not None]
            for job in [job for job in work if job.bare]:  # answered before any lock wait
                await self._run_bare(job)
            work = [job for job in work if not job.bare]
            if work:
                await self._commit(work)
            if None in jobs:  # close() asked us to stop
                return
                return

    async def _run_bare(self, job: _Job) -> None:
        assert job.run is not None
        try:
            _settle(job.future, result=await _on_thread(self._writer, job.run, self._raw_writer))
        except Exception as exc:
            _settle(job.future, error=_translate(exc, self.path)
                    if isinstance(exc, sqlite3.Error) else exc)

    async def _transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``run(conn)`` as one transaction, wholly on the writer connection's thread.

        One thread hop per commit instead of one per statement: aiosqlite's
        ``Connection._execute`` queues a function on the connection's own worker thread
        (its public verbs are built on it; aiosqlite is pinned below its next release for
        this). Measured with scripts/bench: one producer went from 0.27x to 0.40-0.45x of
        raw sqlite3 commits when each transaction became one call.
        """
        return await _on_thread(self._writer, _run_transaction, self._raw_writer, self.path, run)

    async def _commit(self, jobs: list[_Job], *, reclaimed: bool = False) -> None:
        """Run ``jobs`` in one transaction and hand each caller its own outcome."""
        started = time.monotonic()
        self._after_commit = []
        try:
            outcomes = await self._transaction(lambda conn: self._run_jobs(conn, jobs))
            COUNTERS.commit_seconds.observe(time.monotonic() - started)
        except Exception as exc:  # the commit itself failed: none of it happened
            outcomes = [exc] * len(jobs)
        else:
            said, self._after_commit = self._after_commit, []
            for say in said:
                say()
        full = [job for job, out in zip(jobs, outcomes, strict=True)
                if isinstance(out, StoreFull)]
        if full and not reclaimed:
            # the WAL keeps space the file system counts as used: hand it back, try again
            await _on_thread(self._writer, _truncate_wal, self._raw_writer)
            await self._commit(full, reclaimed=True)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if full and not reclaimed and isinstance(outcome, StoreFull):
                continue  # settled by the retry
            if isinstance(outcome, BaseException):
                _settle(job.future, error=outcome)
            else:
                _settle(job.future, result=outcome)

    def _run_jobs(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
        """Each job's result or error, in order; consecutive puts share one insert."""
        outcomes: list[Any] = []
        for segment in _segments(jobs):
            outcomes += self._run_segment(conn, segment)
        return outcomes

    def _run_segment(self, conn: sqlite3.Connection, segment: list[_Job]) -> list[Any]:
        """One savepoint: a failing job is undone alone and the others still commit.

        A group of puts that fails as a whole (a duplicate id, a failing ``also``) is tried
        again put by put, so only the culprit fails.
        """
        conn.execute("SAVEPOINT job")
        said = len(self._after_commit)
        try:
            if segment[0].run is not None:
                outcomes: list[Any] = [segment[0].run(conn)]
            else:
                outcomes = list(self._insert_group(conn, segment))
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            del self._after_commit[said:]  # undone: nothing to say about it
            if len(segment) > 1:
                return [out for job in segment for out in self._run_segment(conn, [job])]
            return [_translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc]
        conn.execute("RELEASE job")
        return outcomes

    def _check_disk(self, conn: sqlite3.Connection, headroom: int = 0) -> None:
        """Keep ``min_free_bytes`` free; pages free inside the file count as free.

        The file never shrinks: a drained backlog leaves its pages inside it, where new
        commands go first. Without counting them a queue that once filled the disk would
        refuse every command forever, even when empty.
        """
        if self.config.min_free_bytes <= 0:
            return
        need = self.config.min_free_bytes + headroom
        stat = os.statvfs(self.path.parent)
        free = stat.f_bavail * stat.f_frsize
        if free < need:
            free += (_first(conn, "PRAGMA freelist_count")[0]
                     * _first(conn, "PRAGMA page_size")[0])
        if free < need:
            raise StoreFull(f"only {free} bytes free under {self.path.parent}; pigateway keeps "
                            f"store.min_free_bytes={self.config.min_free_bytes} free. Queued "
                            "commands are kept; new ones are refused until space is freed")

    def _insert_group(self, conn: sqlite3.Connection,
                            group: list[_Job]) -> list[list[Command] | Exception]:
        self._check_disk(conn)
        count, size = _first(conn, "SELECT commands, bytes FROM totals WHERE id = 1")
        outcomes: list[list[Command] | Exception] = []
        rows: list[tuple[Any, ...]] = []
        for job in group:
            assert job.rows is not None
            prepared = job.rows
            need_count, need_bytes = len(prepared), sum(row[5] for row in prepared)
            if rows and (count + need_count > self.config.max_commands
                         or size + need_bytes > self.config.max_bytes):
                # drop-oldest may have to drop rows of this very group: write them first
                conn.executemany(_INSERT, rows)
                rows = []
            refused, freed_count, freed_bytes = self._make_room(
                conn, count, size, need_count, need_bytes)
            if refused is not None:
                outcomes.append(refused)
                continue
            count = count - freed_count + need_count
            size = size - freed_bytes + need_bytes
            rows.extend(prepared)
            for sql, params in job.also:
                conn.execute(sql, params)
            outcomes.append([
                Command(id=r[0], kind=r[1], device=r[2], name=r[3], params=item.params,
                        size=r[5], queued_at=r[6], expires_at=r[7], attempts=0,
                        last_error=None)
                for r, item in zip(prepared, job.items, strict=True)
            ])
        conn.executemany(_INSERT, rows)
        return outcomes

    def _make_room(self, conn: sqlite3.Connection, count: int, size: int,
                         need_count: int, need_bytes: int) -> tuple[Exception | None, int, int]:
        """Apply the overflow policy: (refusal or ``None``, commands freed, bytes freed)."""
        over_count = count + need_count - self.config.max_commands
        over_bytes = size + need_bytes - self.config.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return None, 0, 0
        limits = (f"store.max_commands={self.config.max_commands}, "
                  f"store.max_bytes={self.config.max_bytes}")
        if (self.config.overflow == "reject" or need_count > self.config.max_commands
                or need_bytes > self.config.max_bytes):
            return QueueFull(f"the queue is full ({count} commands, {size} bytes; {limits}); "
                             "the command was not queued"), 0, 0
        freed = self._drop_oldest(conn, max(over_count, 0), max(over_bytes, 0), need_count)
        if freed is None:
            return QueueFull(f"the queue is full and every queued command is in flight "
                             f"({limits}); the command was not queued"), 0, 0
        return None, *freed

    def _drop_oldest(self, conn: sqlite3.Connection, count: int, nbytes: int,
                     need_count: int) -> tuple[int, int] | None:
        """Dead-letter the oldest queued commands (never in-flight ones) to free room.

        A queue already over its limits (they were lowered) is not trimmed all at once:
        a put of ``need_count`` commands drops at most ``need_count`` plus
        :data:`SWEEP_CHUNK`, and is queued; the next puts go on trimming.
        """
        most = need_count + SWEEP_CHUNK
        rows = _all(conn, "SELECT seq, size FROM outbox WHERE seq NOT IN (SELECT seq FROM "
                    "inflight) ORDER BY seq LIMIT ?", (most,))
        dropped: list[int] = []
        freed = 0
        for seq, size in rows:
            if len(dropped) >= count and freed >= nbytes:
                break
            dropped.append(seq)
            freed += size
        if (len(dropped) < count or freed < nbytes) and len(rows) < most:
            return None  # not enough outside the in-flight rows
        for chunk in _chunks(dropped, SWEEP_CHUNK):
            self._bury_seqs(conn, chunk, "overflow",
                            "dropped to make room (store.overflow = drop-oldest)")
        return len(dropped), freed

    # ---- verbs, each inside the writer's transaction

    def _claim(self, conn: sqlite3.Connection, limit: int) -> tuple[list[Command], bool]:
        """Claim up to ``limit`` live rows, burying at most :data:`SWEEP_CHUNK` expired
        ones on the way: (claimed, whether the budget ran out with more rows to look at)."""
        claimed: list[Command] = []
        now, gateway_now = time.time(), self.clock.now()
        buried = 0
        # dead letters written by others (the inbox's records of unreadable messages) and
        # aged ones are pruned here too, a chunk at a time
        self._prune_dead(conn, 0)
        while len(claimed) < limit and buried < SWEEP_CHUNK:
            room = min(limit - len(claimed), SWEEP_CHUNK - buried)
            rows = _all(
                conn, f"SELECT {_COLUMNS} FROM outbox WHERE seq NOT IN (SELECT seq FROM "
                "inflight) ORDER BY seq LIMIT ?", (room,))
            if not rows:
                return claimed, False
            expired = {row[0] for row in rows if row[8] is not None and row[8] <= gateway_now}
            if expired:
                self._bury_seqs(conn, sorted(expired), "expired",
                                "its ttl ran out before it could be sent")
                buried += len(expired)
            live = [row for row in rows if row[0] not in expired]
            conn.executemany("INSERT INTO inflight (seq, claimed_at) VALUES (?, ?)",
                             [(row[0], now) for row in live])
            claimed.extend(_row_to_command(row) for row in live)
        return claimed, buried >= SWEEP_CHUNK

    def _delete(self, conn: sqlite3.Connection, ids: Sequence[str]) -> int:
        total = 0
        for chunk in _chunks(list(ids), 500):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM inflight WHERE seq IN (SELECT seq FROM outbox "
                               f"WHERE id IN ({marks}))", chunk)
            cursor = conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            total += cursor.rowcount
        return total

    def _nack(self, conn: sqlite3.Connection, ids: Sequence[str], error: str) -> None:
        for chunk in _chunks(list(ids), 500):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM inflight WHERE seq IN (SELECT seq FROM outbox "
                               f"WHERE id IN ({marks}))", chunk)
            conn.execute(f"UPDATE outbox SET attempts = attempts + 1, last_error = ? "
                               f"WHERE id IN ({marks})", (error, *chunk))
            spent = _all(conn, f"SELECT seq FROM outbox WHERE id IN ({marks}) AND "
                               "attempts >= ?", (*chunk, self.config.max_attempts))
            if spent:
                self._bury_seqs(conn, [row[0] for row in spent], "max-attempts",
                                      f"gave up after {self.config.max_attempts} attempts; "
                                      f"last error: {error}")

    def _bury(self, conn: sqlite3.Connection, where: str, params: Sequence[Any],
                    reason: str, detail: str | None) -> None:
        seqs = [row[0] for row in _all(conn, f"SELECT seq FROM outbox WHERE {where}",
                                             params)]
        self._bury_seqs(conn, seqs, reason, detail)

    def _bury_seqs(self, conn: sqlite3.Connection, seqs: Sequence[int], reason: str,
                   detail: str | None) -> None:
        """Move rows to ``dead_letters`` with a reason, keep dead letters within their
        bounds, and say so once in the log after the commit."""
        if not seqs:
            return
        now = time.time()
        buried: list[tuple[str, str]] = []
        for chunk in _chunks(list(seqs), SWEEP_CHUNK):
            marks = ",".join("?" * len(chunk))
            # not INSERT OR REPLACE: its implied delete fires no trigger, and the dead-letter
            # totals would drift
            conn.execute(f"DELETE FROM dead_letters WHERE id IN (SELECT id FROM outbox "
                         f"WHERE seq IN ({marks}))", chunk)
            conn.execute(
                "INSERT INTO dead_letters (id, kind, device, name, params, size, "
                "queued_at, expires_at, ttl, attempts, last_error, reason, detail, dead_at) "
                "SELECT id, kind, device, name, params, size, queued_at, expires_at, ttl, "
                f"attempts, last_error, ?, ?, ? FROM outbox WHERE seq IN ({marks})",
                (reason, detail, now, *chunk))
            conn.execute(f"DELETE FROM inflight WHERE seq IN ({marks})", chunk)
            buried += conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks}) "
                                   "RETURNING id, device", chunk).fetchall()
        self._after_commit.append(lambda: _log_buried(buried, reason, detail))
        self._prune_dead(conn, len(buried))

    def _prune_dead(self, conn: sqlite3.Connection, added: int) -> int:
        """Delete the oldest dead letters over ``store.max_dead_letters``,
        ``store.max_dead_bytes`` or older than ``store.dead_letter_ttl``: at most what was
        just ``added`` plus :data:`SWEEP_CHUNK` in this transaction, oldest first."""
        config = self.config
        count, nbytes = _first(conn, "SELECT dead_count, dead_bytes FROM totals WHERE id = 1")
        over_count = count - config.max_dead_letters
        over_bytes = nbytes - config.max_dead_bytes
        cutoff = time.time() - config.dead_letter_ttl if config.dead_letter_ttl > 0 else None
        if over_count <= 0 and over_bytes <= 0 and cutoff is None:
            return 0
        doomed: list[int] = []
        freed = 0
        cursor = conn.execute("SELECT rowid, size, dead_at FROM dead_letters "
                              "ORDER BY dead_at LIMIT ?", (added + SWEEP_CHUNK,))
        for rowid, size, dead_at in cursor:  # lazily: mostly the first row says "none"
            aged = cutoff is not None and dead_at < cutoff
            if not aged and len(doomed) >= over_count and freed >= over_bytes:
                break
            doomed.append(rowid)
            freed += size
        cursor.close()
        for chunk in _chunks(doomed, SWEEP_CHUNK):
            conn.execute(f"DELETE FROM dead_letters WHERE rowid IN ({','.join('?' * len(chunk))})",
                         chunk)
        if doomed:
            limits = (f"store.max_dead_letters={config.max_dead_letters}, "
                      f"store.max_dead_bytes={config.max_dead_bytes}, "
                      f"store.dead_letter_ttl={config.dead_letter_ttl:g}")
            self._after_commit.append(lambda: log.warning(
                "pruned the %d oldest dead letter(s) to keep within %s", len(doomed), limits))
        return len(doomed)

    def _requeue_one(self, conn: sqlite3.Connection, id_: str, *, expired: bool) -> int:
        row = conn.execute("SELECT reason FROM dead_letters WHERE id = ? AND "
                           "kind IN ('action', 'result', 'forward')", (id_,)).fetchone()
        if row is None:
            return 0
        if row[0] == "expired" and not expired:
            raise InvalidCommand(
                f"dead letter {id_} expired: its ttl ran out, and it may even have been "
                "delivered with the broker's PUBACK lost. A stale command is sent again only "
                "when asked explicitly: pigateway queue requeue-dead --id ID --expired")
        return self._requeue_rows(conn, "id = ?", (id_,))

    def _requeue_chunk(self, conn: sqlite3.Connection, bound: int) -> int:
        # only what can be sent: the inbound records (kind 'inbound', messages that had no
        # id to answer) stay where they are, as evidence; expired ones stay dead
        return self._requeue_rows(
            conn, "rowid IN (SELECT rowid FROM dead_letters WHERE rowid <= ? AND reason != "
            "'expired' AND kind IN ('action', 'result', 'forward') "
            "ORDER BY dead_at, queued_at LIMIT ?)",
            (bound, SWEEP_CHUNK))

    def _requeue_rows(self, conn: sqlite3.Connection, where: str,
                      params: Sequence[Any]) -> int:
        now, gateway_now = time.time(), self.clock.now()
        rows = _all(conn, "SELECT rowid, id, kind, device, name, params, size, queued_at, "
                    f"expires_at, ttl FROM dead_letters WHERE {where} "
                    "ORDER BY dead_at, queued_at", params)
        requeued = []
        for row in rows:
            ttl = own_ttl(row[7], row[8], row[9])
            requeued.append((*row[1:7], now, requeued_expiry(ttl, gateway_now), ttl))
        conn.executemany(_INSERT, requeued)
        for chunk in _chunks([row[0] for row in rows], SWEEP_CHUNK):
            conn.execute(f"DELETE FROM dead_letters WHERE rowid IN ({','.join('?' * len(chunk))})",
                         chunk)
        return len(rows)

    async def _resume_in_flight(self) -> int:
        return await self._transaction(lambda conn: conn.execute("DELETE FROM inflight").rowcount)

    # ---- reading

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return await _fetch_all(self._reader, sql, params)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc

    async def _read_data_version(self) -> int:
        """Asked of the writer connection, whose data_version moves only when *another*
        connection commits: our own claims and acks do not wake :meth:`wait_for_work`.
        (It runs on the writer's thread between two transactions, never inside one.)"""
        def read() -> int:
            return int(self._raw_writer.execute("PRAGMA data_version").fetchone()[0])
        return await _on_thread(self._writer, read)


# --------------------------------------------------------------------------- helpers


def own_ttl(queued_at: float, expires_at: float | None, ttl: float | None) -> float:
    """The ttl a command was put with (0: never expires). Rows from before the stored ttl
    (schema 3) had both times on the wall clock, so it is their difference."""
    if ttl is not None:
        return float(ttl)
    return 0.0 if expires_at is None else max(0.0, expires_at - queued_at)


def requeued_expiry(ttl: float, gateway_now: float) -> float | None:
    """When a requeued command expires: its own ``ttl`` counted again from the requeue
    (``gateway_now``, on the gateway clock); ``None`` for one that never expires."""
    return gateway_now + ttl if ttl > 0 else None


def _log_buried(buried: Sequence[tuple[str, str]], reason: str, detail: str | None) -> None:
    """One line for the lot; the journal indexes every id (COMMAND_ID=...) in it."""
    log.warning("dead-lettered %d command(s): %s (%s); see `pigateway queue ls --dead`",
                len(buried), reason, detail or "no detail",
                extra={"command_id": [row[0] for row in buried[:LOGGED_IDS]],
                       "device": sorted({row[1] for row in buried})[:LOGGED_IDS],
                       "dead_reason": reason})


def _max_rowid(table: str) -> Callable[[sqlite3.Connection], int]:
    """The newest row of ``table`` now: a sweep goes no further, so it ends even while
    rows keep arriving."""
    def read(conn: sqlite3.Connection) -> int:
        return int(_first(conn, f"SELECT coalesce(max(rowid), 0) FROM {table}")[0])
    return read


def _purge_dead_chunk(conn: sqlite3.Connection, bound: int) -> int:
    return conn.execute("DELETE FROM dead_letters WHERE rowid IN (SELECT rowid FROM "
                        "dead_letters WHERE rowid <= ? LIMIT ?)", (bound, SWEEP_CHUNK)).rowcount


def _purge_queued_chunk(conn: sqlite3.Connection, last_seq: int) -> int:
    seqs = [row[0] for row in _all(conn, "SELECT seq FROM outbox WHERE seq <= ? ORDER BY seq "
                                   "LIMIT ?", (last_seq, SWEEP_CHUNK))]
    marks = ",".join("?" * len(seqs))
    conn.execute(f"DELETE FROM inflight WHERE seq IN ({marks})", seqs)
    return conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs).rowcount



async def _on_thread(conn: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on ``conn``'s own worker thread, in one hop."""
    result = await conn._execute(fn, *args)  # type: ignore[no-untyped-call]
    return typing.cast(T, result)


def _select_one(conn: sqlite3.Connection) -> None:
    """The ping: the connection answers a statement that reads no table (takes no lock)."""
    conn.execute("SELECT 1").fetchall()


def _run_transaction(conn: sqlite3.Connection, path: Path,
                     run: Callable[[sqlite3.Connection], T]) -> T:
    """``BEGIN IMMEDIATE``, ``run``, ``COMMIT``; roll back and translate on any error."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        result = run(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(conn)
        raise _translate(exc, path) from exc
    except BaseException:
        _rollback(conn)
        raise
    return result


def _truncate_wal(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the file and cut it to zero bytes; best effort (a reader may hold it)."""
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _raw_connect(config: StoreConfig) -> sqlite3.Connection:
    """A connection set up the way every connection to the queue must be."""
    conn = sqlite3.connect(config.path, timeout=config.busy_timeout, isolation_level=None,
                           check_same_thread=False)
    try:
        # Small pages and a WAL of ~20 MB between checkpoints: each commit rewrites fewer
        # bytes of half-filled pages, and hot pages reach the database file less often.
        # Measured (scripts/bench, 100k commands, 64 producers): 2.3 KB -> 2.0 KB written
        # per command over its life (WAL writes each byte twice at put and at delete).
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


async def _connect(config: StoreConfig) -> tuple[aiosqlite.Connection, sqlite3.Connection]:
    """An aiosqlite connection, and the sqlite3 connection it runs on its own thread."""
    made: list[sqlite3.Connection] = []

    def connector() -> sqlite3.Connection:
        made.append(_raw_connect(config))
        return made[0]

    try:
        conn = await aiosqlite.Connection(connector, 64)
    except sqlite3.Error as exc:
        raise _translate(exc, config.path) from exc
    return conn, made[0]


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema forward to the newest version, one transaction per step."""
    version = int(_first(conn, "PRAGMA user_version")[0])
    conn.execute("SELECT name FROM sqlite_master").fetchall()  # a damaged schema fails here
    if version > len(MIGRATIONS):
        raise StoreError(f"{path} has schema version {version}, newer than this pigateway "
                         f"knows ({len(MIGRATIONS)}); upgrade pigateway")
    for number in range(version, len(MIGRATIONS)):
        def step(conn: sqlite3.Connection, number: int = number) -> None:
            if int(_first(conn, "PRAGMA user_version")[0]) > number:
                return  # another process migrated meanwhile
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        _run_transaction(conn, path, step)


def _clock_reading(conn: sqlite3.Connection, path: Path) -> clock.Reading:
    """This boot's reading of the gateway clock; the write lock only at a boot's first open."""
    stored = clock.load(conn)
    if stored is not None and stored.boot_id == clock.boot_id():
        return stored
    reading = _run_transaction(conn, path, clock.establish)
    if stored is not None and reading.boot_id != stored.boot_id:
        off = reading.offset - stored.reading
        log.info("a new boot: TTLs continue from the last reading of the last one; %s",
                 "the time the gateway was off counts once the wall clock is synchronised"
                 if reading.gap_from is not None else
                 f"the {off:.0f} s the gateway was off count too" if off > 0 else
                 "the time the gateway was off cannot be known and does not count")
    return reading


def _statements(script: str) -> Iterable[str]:
    """Split a migration script into statements (triggers contain ';' inside BEGIN..END)."""
    buffer = ""
    for line in script.strip().splitlines():
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


def _first(conn: sqlite3.Connection, sql: str,
           params: Sequence[Any] = ()) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return tuple(row)


def _all(conn: sqlite3.Connection, sql: str,
         params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(sql, params).fetchall()]


async def _fetch_all(conn: aiosqlite.Connection, sql: str,
                     params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    async with conn.execute(sql, params) as cursor:
        return [tuple(row) for row in await cursor.fetchall()]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _consume(future: asyncio.Future[Any]) -> None:
    """Let a future nobody awaits fail quietly: for the last reading of a closing drainer,
    whose loss costs the TTLs at most one heartbeat of time after a reboot."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


def _settle(future: asyncio.Future[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _segments(jobs: list[_Job]) -> Iterable[list[_Job]]:
    """Consecutive puts together (one insert for all), every other job alone."""
    run: list[_Job] = []
    for job in jobs:
        if job.rows is not None:
            run.append(job)
            continue
        if run:
            yield run
            run = []
        yield [job]
    if run:
        yield run


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _seqs_sql(ids: Sequence[str]) -> str:
    return f"id IN ({','.join('?' * len(ids))})" if ids else "0"


def _lock_path(path: Path) -> Path:
    """``<db>.lock`` beside the real file: every name of one queue (a symlink, a relative
    or ``..`` path) takes the same lock."""
    real = path.resolve()
    return real.with_name(real.name + ".lock")


def _take_drainer_lock(path: Path) -> int:
    """One drainer per queue: an exclusive, non-blocking lock on ``<db>.lock``."""
    lock_path = _lock_path(path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StoreError(f"another pigateway service is already draining {path} "
                         f"(it holds {lock_path}); stop it first") from exc
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
