"""The inbox: commands from the broker, from receipt to their one recorded result.

A row (:class:`Entry`) moves ``pending`` -> ``running`` -> ``done``. ``done`` rows keep their
result document for the dedupe horizon
(:func:`pigateway.inbound.workers.dedupe_horizon`), so a command delivered again (MQTT is
at-least-once) is answered from the record instead of being run twice. The table is
migration 2 of :data:`pigateway.store.schema.MIGRATIONS`; the result document is
:func:`pigateway.wire.result_document`. Every write goes through the store's writer, so it
is durable when the call returns. The one rule that makes results exactly-once: a result
enters the outbox in the SAME transaction that marks its row ``done`` (:meth:`Inbox.finish`).
A crash before that commit leaves the row ``pending``/``running`` and the command runs
again; a crash after it leaves both the result and the record.
"""

from __future__ import annotations

import sqlite3
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pigateway import wire
from pigateway.inputs import text_problem
from pigateway.store.ids import new_id
from pigateway.store.outbox import SWEEP_CHUNK
from pigateway.store.values import Unreadable, stored_object
from pigateway.text import bounded

if typing.TYPE_CHECKING:
    from pigateway.store.queue import Store

#: ``device`` of a result whose command named no usable device.
NO_DEVICE = "-"
_MAX_DEVICE = 128


@dataclass(frozen=True)
class Entry:
    """One inbox row."""

    seq: int
    id: str
    device: str
    name: str
    params: dict[str, Any]
    received_at: float
    expires_at: float | None  # on the store's gateway clock (pigateway.store.clock), not the wall's
    state: str
    attempts: int
    started_at: float | None
    last_error: str | None
    status: str | None
    result: dict[str, Any] | None
    finished_at: float | None
    ttl: float | None = None  # as the command came (None also for rows of before migration 3)
    done_on: float | None = None  # when it was done, on the gateway clock (dedupe window)
    #: why its stored params (or result) cannot be read (bit rot, a salvaged or hand-edited
    #: file); None: they read. Such a command is answered ``rejected``, never run.
    unreadable: str | None = None

    def done_since(self) -> float:
        """When it was done, on the gateway clock (rows of before migration 3: their wall
        time, which the gateway clock started equal to)."""
        return self.done_on if self.done_on is not None else (self.finished_at or 0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``pigateway inbox ls --json``."""
        return {
            "id": self.id, "device": self.device, "name": self.name, "params": self.params,
            "state": self.state, "status": self.status, "attempts": self.attempts,
            "received_at": self.received_at, "expires_at": self.expires_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "last_error": self.last_error, "result": self.result,
            **({"unreadable": self.unreadable} if self.unreadable else {}),
        }


def outbox_device(device: Any) -> str:
    """The device a result is filed under in the outbox (a placeholder when unusable: by
    the same rule as ``store.prepare``, so filing a rejection can never be refused)."""
    if isinstance(device, str) and device.strip() and len(device) <= _MAX_DEVICE \
            and text_problem(device) is None:
        return device
    return NO_DEVICE

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[tuple[Any, ...]]]]
#: The next command of a lane to mark running with a result: (id, attempt, wall time).
Next = tuple[str, int, float]

_COLUMNS = ("seq, id, device, name, params, received_at, expires_at, state, attempts, "
            "started_at, last_error, status, result, finished_at, ttl, done_on")
_MARK_RUNNING = "UPDATE inbox SET state = 'running', attempts = ?, started_at = ? WHERE id = ?"


class InboxReads:
    """What any view of the queue reads of the inbox (``pigateway inbox ls`` too)."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch

    async def find(self, command_id: str) -> Entry | None:
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM inbox WHERE id = ?", (command_id,))
        return _entry(rows[0]) if rows else None

    async def pending(self, after_seq: int, limit: int) -> list[Entry]:
        """Pending commands after ``after_seq``, in the order they were received."""
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM inbox WHERE state = 'pending' AND "
                                 "seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [_entry(row) for row in rows]

    async def listing(self, limit: int) -> list[Entry]:
        """Unfinished commands first (in run order), then the newest finished ones."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM inbox ORDER BY state = 'done', "
            "CASE WHEN state = 'done' THEN -seq ELSE seq END LIMIT ?", (limit,))
        return [_entry(row) for row in rows]


class Inbox(InboxReads):
    """The service's inbox: reads, and writes through the store's writer."""

    def __init__(self, store: Store) -> None:
        super().__init__(store._fetch)
        self._store = store

    async def receive(self, command_id: str, device: str, name: str, params: dict[str, Any],
                      *, expires_at: float | None, ttl: float | None, now: float,
                      headroom: int, replace: bool = False) -> Entry | None:
        """Insert a pending command unless its id is there: ``None`` when it was inserted,
        else the entry received before (untouched). With ``replace`` the one before is
        forgotten first (a stale record). ``now`` (wall) is ``received_at``; ``expires_at``
        is on the gateway clock. Refused with :class:`~pigateway.errors.StoreFull` unless
        ``store.min_free_bytes`` plus ``headroom`` bytes stay free: an accepted command
        promises its result. Concurrent calls keep their order and share one commit (the
        job is queued before the first ``await``)."""
        row = (command_id, device, name, wire.encode(params), now, expires_at, ttl)

        def run(conn: sqlite3.Connection) -> Entry | None:
            return _insert(conn, self._store, row, headroom, replace)
        return await self._store._submit(run)

    async def receive_running(self, command_id: str, device: str, name: str,
                              params: dict[str, Any], *, expires_at: float | None,
                              ttl: float | None, now: float, headroom: int,
                              ) -> tuple[Entry | None, Entry | None]:
        """:meth:`receive`, and a new row marked running (attempt 1) in the same commit:
        for a command its device's idle lane runs at once, which saves the round trip
        the commit of :meth:`mark_running` (an fsync). Returns (the entry received before,
        or None; the new row as received, or None when it was not inserted or the mark
        failed: the row is then pending and runs the usual way)."""
        row = (command_id, device, name, wire.encode(params), now, expires_at, ttl)

        def run(conn: sqlite3.Connection) -> tuple[Entry | None, Entry | None]:
            before = _insert(conn, self._store, row, headroom, replace=False)
            if before is not None:
                return before, None
            received = _entry(conn.execute(f"SELECT {_COLUMNS} FROM inbox WHERE id = ?",
                                           (command_id,)).fetchone())
            conn.execute("SAVEPOINT mark_running")
            try:
                conn.execute(_MARK_RUNNING, (1, now, command_id))
            except sqlite3.Error:  # the insert stands; the lane marks it itself, waiting
                conn.execute("ROLLBACK TO mark_running")  # out the store (its own commit)
                conn.execute("RELEASE mark_running")
                return None, None
            conn.execute("RELEASE mark_running")
            return None, received
        return await self._store._submit(run)

    async def forget(self, command_id: str) -> None:
        await self._store._call(
            lambda conn: conn.execute("DELETE FROM inbox WHERE id = ?", (command_id,)))

    async def reject(self, command_id: str, device: str, document: dict[str, Any], *,
                     now: float, done_on: float) -> None:
        """Answer a command at once (rejected on receipt) and record it done, in one
        transaction, so a repeat is deduped. ``now`` is wall time; ``done_on`` the gateway
        clock's now (the dedupe window's start)."""
        def record_done(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO inbox (id, device, name, params, received_at, state, status, "
                "result, last_error, finished_at, done_on) "
                "VALUES (?, ?, ?, '{}', ?, 'done', ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (command_id, device, "-", now, document["status"], wire.encode(document),
                 document.get("detail"), now, done_on))
        await self._store._put_result(device, document, record_done)

    async def answer_again(self, entry: Entry) -> None:
        """Queue ``entry``'s stored result again (its command was received again)."""
        assert entry.result is not None
        await self._store._put_result(entry.device, entry.result, None)

    async def finish(self, command_id: str, device: str, document: dict[str, Any], *,
                     done_on: float, then_running: Next | None = None) -> None:
        """Queue the result and mark the row ``done`` in ONE transaction (``done_on``: the
        gateway clock's now, where the dedupe window starts); ``then_running`` (the lane's
        next command) is marked running in the same commit, which saves it one fsync."""
        detail = document.get("detail")
        error = None if document["status"] == "ok" or detail is None else bounded(detail)

        def record_done(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE inbox SET state = 'done', status = ?, result = ?, finished_at = ?, "
                "done_on = ?, last_error = coalesce(?, last_error) WHERE id = ?",
                (document["status"], wire.encode(document), document["finished_at"], done_on,
                 error, command_id))
            if then_running is not None:
                next_id, attempt, started = then_running
                conn.execute(_MARK_RUNNING, (attempt, started, next_id))
        await self._store._put_result(device, document, record_done)

    async def mark_running(self, command_id: str, attempt: int, now: float) -> None:
        await self._store._call(
            lambda conn: conn.execute(_MARK_RUNNING, (attempt, now, command_id)))

    async def note_failed_attempt(self, command_id: str, error: str) -> None:
        await self._store._call(lambda conn: conn.execute(
            "UPDATE inbox SET state = 'pending', last_error = ? WHERE id = ?",
            (bounded(error), command_id)))

    async def recover(self) -> int:
        """Commands that were running when the process died run again (attempts are kept)."""
        return await self._store._call(lambda conn: conn.execute(
            "UPDATE inbox SET state = 'pending' WHERE state = 'running'").rowcount)

    async def prune(self, before: float, *, chunks: int | None = None) -> int:
        """Forget finished commands done before ``before`` on the gateway clock (the dedupe
        window; bounds the table), a sweep chunk per commit; at most ``chunks`` chunks
        (``None``: all). Rows of before migration 3 go by their wall time."""
        def chunk(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE state = 'done' "
                "AND (done_on < ? OR (done_on IS NULL AND finished_at < ?)) LIMIT ?)",
                (before, before, SWEEP_CHUNK)).rowcount
        return await self._store._sweep(chunk, None, chunks=chunks)

    async def record_unreadable(self, reason: str, payload: bytes, now: float) -> None:
        """The dead letter of a message that had no readable id, so no result could answer
        it (kind ``inbound``: kept as evidence, never requeued)."""
        preview = bounded(payload[:256].decode("utf-8", errors="backslashreplace"), 1024)
        params = wire.encode({"payload": preview, "bytes": len(payload)})
        row = (new_id(), NO_DEVICE, params, len(payload), now, bounded(reason), now,
               self._store.clock.now())
        await self._store._call(lambda conn: conn.execute(
            "INSERT INTO dead_letters (id, kind, device, name, params, size, queued_at, "
            "expires_at, attempts, last_error, reason, detail, dead_at, dead_on) "
            "VALUES (?, 'inbound', ?, 'invalid', ?, ?, ?, NULL, 0, NULL, 'invalid', ?, ?, ?)",
            row))


def _insert(conn: sqlite3.Connection, store: Store, row: tuple[Any, ...], headroom: int,
            replace: bool) -> Entry | None:
    """Insert a pending command unless its id is there (see :meth:`Inbox.receive`)."""
    store._outbox.check_disk(conn, headroom)
    if replace:
        conn.execute("DELETE FROM inbox WHERE id = ?", (row[0],))
    inserted = conn.execute(
        "INSERT INTO inbox (id, device, name, params, received_at, expires_at, ttl) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING", row).rowcount
    if inserted:
        return None
    return _entry(conn.execute(f"SELECT {_COLUMNS} FROM inbox WHERE id = ?",
                               (row[0],)).fetchone())


def _entry(row: Sequence[Any]) -> Entry:
    (seq, id_, device, name, params, received_at, expires_at, state, attempts, started_at,
     last_error, status, result, finished_at, ttl, done_on) = row
    decoded_params, params_problem = _document(params)
    decoded_result, result_problem = (None, None) if result is None else _document(result)
    problem = params_problem or result_problem
    return Entry(seq=seq, id=id_, device=device, name=name, params=decoded_params or {},
                 received_at=received_at, expires_at=expires_at, state=state,
                 attempts=attempts, started_at=started_at, last_error=last_error,
                 status=status, result=decoded_result, finished_at=finished_at, ttl=ttl,
                 done_on=done_on, unreadable=problem)


def _document(stored: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A stored JSON object, or why it does not read (:func:`stored_object`, as the
    outbox's claim reads its rows): one row's bit rot is that row's failure, never every
    scan's after it."""
    try:
        return stored_object(stored), None
    except Unreadable as exc:
        return None, str(exc)
