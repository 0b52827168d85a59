"""The inbox table: commands from the broker, from receipt to their one recorded result.

A row moves ``pending`` -> ``running`` -> ``done``. ``done`` rows keep their result
document for ``inbound.dedupe_window`` seconds, so a command delivered again (MQTT is
at-least-once) is answered from the record instead of being run twice. The table lives in
the store's SQLite file (migration 2 of :data:`pigateway.store.MIGRATIONS`); every write
goes through the store's writer, so it is durable when the call returns.

The one rule that makes results exactly-once: a result enters the outbox in the SAME
transaction that marks its row ``done`` (:func:`record`). A crash before that commit
leaves the row ``pending``/``running`` and the command runs again; a crash after it
leaves both the result and the record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pigateway.ids import new_id
from pigateway.store import Reads, Store

Statement = tuple[str, Sequence[Any]]

#: ``device`` of a result whose command named no usable device.
NO_DEVICE = "-"
_MAX_DEVICE = 128

_COLUMNS = ("seq, id, device, name, params, received_at, expires_at, state, attempts, "
            "started_at, last_error, status, result, finished_at")


@dataclass(frozen=True)
class Entry:
    """One inbox row."""

    seq: int
    id: str
    device: str
    name: str
    params: dict[str, Any]
    received_at: float
    expires_at: float | None
    state: str
    attempts: int
    started_at: float | None
    last_error: str | None
    status: str | None
    result: dict[str, Any] | None
    finished_at: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``pigateway inbox ls --json``."""
        return {
            "id": self.id, "device": self.device, "name": self.name, "params": self.params,
            "state": self.state, "status": self.status, "attempts": self.attempts,
            "received_at": self.received_at, "expires_at": self.expires_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "last_error": self.last_error, "result": self.result,
        }


def _entry(row: Sequence[Any]) -> Entry:
    (seq, id_, device, name, params, received_at, expires_at, state, attempts, started_at,
     last_error, status, result, finished_at) = row
    return Entry(seq=seq, id=id_, device=device, name=name, params=json.loads(params),
                 received_at=received_at, expires_at=expires_at, state=state,
                 attempts=attempts, started_at=started_at, last_error=last_error,
                 status=status, result=None if result is None else json.loads(result),
                 finished_at=finished_at)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def result_document(command_id: str, status: str, detail: Any = None, *,
                    now: float | None = None) -> dict[str, Any]:
    """The wire contract's result: ``{"v":1,"id","status","detail"?,"finished_at"}``."""
    document: dict[str, Any] = {"v": 1, "id": command_id, "status": status}
    if detail is not None:
        document["detail"] = detail
    document["finished_at"] = round(time.time() if now is None else now, 3)
    return document


def outbox_device(device: Any) -> str:
    """The device a result is filed under in the outbox (a placeholder when unusable)."""
    if isinstance(device, str) and device.strip() and len(device) <= _MAX_DEVICE:
        return device
    return NO_DEVICE


# --------------------------------------------------------------------------- statements


def insert_pending(command_id: str, device: str, name: str, params: dict[str, Any], *,
                   expires_at: float | None, now: float) -> Statement:
    return ("INSERT INTO inbox (id, device, name, params, received_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (command_id, device, name, _json(params), now, expires_at))


def insert_done(command_id: str, device: str, name: str, document: dict[str, Any],
                now: float) -> Statement:
    """A command answered at once (rejected on receipt): recorded so a repeat is deduped."""
    return ("INSERT INTO inbox (id, device, name, params, received_at, state, status, result, "
            "last_error, finished_at) VALUES (?, ?, ?, '{}', ?, 'done', ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (command_id, device, name, now, document["status"], _json(document),
             document.get("detail"), now))


def forget(command_id: str) -> Statement:
    return ("DELETE FROM inbox WHERE id = ?", (command_id,))


def mark_running(command_id: str, attempt: int, now: float) -> Statement:
    return ("UPDATE inbox SET state = 'running', attempts = ?, started_at = ? WHERE id = ?",
            (attempt, now, command_id))


def mark_failed_attempt(command_id: str, error: str) -> Statement:
    return ("UPDATE inbox SET state = 'pending', last_error = ? WHERE id = ?",
            (error, command_id))


def finish(command_id: str, document: dict[str, Any]) -> Statement:
    detail = document.get("detail")
    error = None if document["status"] == "ok" else (None if detail is None else str(detail))
    return ("UPDATE inbox SET state = 'done', status = ?, result = ?, finished_at = ?, "
            "last_error = coalesce(?, last_error) WHERE id = ?",
            (document["status"], _json(document), document["finished_at"], error, command_id))


def recover() -> Statement:
    """Commands that were running when the process died run again (attempts are kept)."""
    return ("UPDATE inbox SET state = 'pending' WHERE state = 'running'", ())


def prune(before: float) -> Statement:
    """Forget finished commands older than the dedupe window (bounds the table)."""
    return ("DELETE FROM inbox WHERE state = 'done' AND finished_at < ?", (before,))


def dead_letter(reason: str, payload: bytes, now: float) -> Statement:
    """A record of a message that had no readable id, so no result could answer it."""
    preview = payload[:256].decode("utf-8", errors="backslashreplace")
    params = _json({"payload": preview, "bytes": len(payload)})
    return ("INSERT INTO dead_letters (id, kind, device, name, params, size, queued_at, "
            "expires_at, attempts, last_error, reason, detail, dead_at) "
            "VALUES (?, 'inbound', ?, 'invalid', ?, ?, ?, NULL, 0, NULL, 'invalid', ?, ?)",
            (new_id(), NO_DEVICE, params, len(payload), now, reason, now))


# --------------------------------------------------------------------------- reads and writes


async def find(store: Store, command_id: str) -> Entry | None:
    rows = await store.read(f"SELECT {_COLUMNS} FROM inbox WHERE id = ?", (command_id,))
    return _entry(rows[0]) if rows else None


async def pending(store: Store, after_seq: int, limit: int) -> list[Entry]:
    """Pending commands after ``after_seq``, in the order they were received."""
    rows = await store.read(f"SELECT {_COLUMNS} FROM inbox WHERE state = 'pending' AND seq > ? "
                            "ORDER BY seq LIMIT ?", (after_seq, limit))
    return [_entry(row) for row in rows]


async def listing(store: Reads, limit: int) -> list[Entry]:
    """Unfinished commands first (in run order), then the newest finished ones."""
    rows = await store.read(
        f"SELECT {_COLUMNS} FROM inbox ORDER BY state = 'done', "
        "CASE WHEN state = 'done' THEN -seq ELSE seq END LIMIT ?", (limit,))
    return [_entry(row) for row in rows]


async def record(store: Store, device: str, document: dict[str, Any],
                 also: Sequence[Statement]) -> None:
    """Queue the result for the broker and run ``also`` in the same durable transaction."""
    await store.put(outbox_device(device), "result", document, kind="result", also=also)
