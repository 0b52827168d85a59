"""The inbox table: commands from the broker, from receipt to their one recorded result.

A row moves ``pending`` -> ``running`` -> ``done``. ``done`` rows keep their result
document for ``inbound.dedupe_window`` seconds (never less than the broker's session can
deliver a message again: :func:`dedupe_horizon`), so a command delivered again (MQTT is
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

from pigateway.config import Config
from pigateway.ids import new_id
from pigateway.inputs import text_problem
from pigateway.store import SWEEP_CHUNK, Reads, Store
from pigateway.text import bounded, fit_json

Statement = tuple[str, Sequence[Any]]

#: ``device`` of a result whose command named no usable device.
NO_DEVICE = "-"
_MAX_DEVICE = 128

_COLUMNS = ("seq, id, device, name, params, received_at, expires_at, state, attempts, "
            "started_at, last_error, status, result, finished_at, ttl, done_on")


@dataclass(frozen=True)
class Entry:
    """One inbox row."""

    seq: int
    id: str
    device: str
    name: str
    params: dict[str, Any]
    received_at: float
    expires_at: float | None  # on the store's gateway clock (pigateway.clock), not the wall's
    state: str
    attempts: int
    started_at: float | None
    last_error: str | None
    status: str | None
    result: dict[str, Any] | None
    finished_at: float | None
    ttl: float | None = None  # as the command came (None also for rows of before migration 3)
    done_on: float | None = None  # when it was done, on the gateway clock (dedupe window)

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
        }


def _entry(row: Sequence[Any]) -> Entry:
    (seq, id_, device, name, params, received_at, expires_at, state, attempts, started_at,
     last_error, status, result, finished_at, ttl, done_on) = row
    return Entry(seq=seq, id=id_, device=device, name=name, params=json.loads(params),
                 received_at=received_at, expires_at=expires_at, state=state,
                 attempts=attempts, started_at=started_at, last_error=last_error,
                 status=status, result=None if result is None else json.loads(result),
                 finished_at=finished_at, ttl=ttl, done_on=done_on)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def result_document(command_id: str, status: str, detail: Any = None, *, max_bytes: int,
                    now: float | None = None) -> dict[str, Any]:
    """The wire contract's result: ``{"v":1,"id","status","detail"?,"finished_at"}``.

    It always fits ``max_bytes`` (``store.max_params_bytes``) as stored JSON: a text detail
    is :func:`~pigateway.text.bounded` and cut to the room left, and a detail that cannot be
    encoded or does not fit is replaced by a note saying so. So recording a result, which
    is what finishes a command, never fails because of what the command or handler said.
    """
    document: dict[str, Any] = {"v": 1, "id": command_id, "status": status}
    document["finished_at"] = round(time.time() if now is None else now, 3)
    if detail is None:
        return document
    room = max_bytes - _size(document) - len(',"detail":')
    document = {**document, "detail": _fitted(detail, room)}
    document["finished_at"] = document.pop("finished_at")  # the contract's key order
    return document


def _fitted(detail: Any, room: int) -> Any:
    """``detail`` as it can be stored in ``room`` bytes of JSON."""
    if not isinstance(detail, str):
        try:
            if _size(detail) <= room:
                return detail
            detail = f"(a detail of {_size(detail)} bytes was left out: it did not fit " \
                     "store.max_params_bytes)"
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
            detail = bounded(detail)
    return fit_json(bounded(detail), room)


def _size(value: Any) -> int:
    return len(_json(value).encode("utf-8"))


def outbox_device(device: Any) -> str:
    """The device a result is filed under in the outbox (a placeholder when unusable: by
    the same rule as ``store.prepare``, so filing a rejection can never be refused)."""
    if isinstance(device, str) and device.strip() and len(device) <= _MAX_DEVICE \
            and text_problem(device) is None:
        return device
    return NO_DEVICE


def dedupe_horizon(config: Config) -> float:
    """Seconds a finished command id is remembered: ``inbound.dedupe_window``, but never
    less than the broker can still deliver the message again.

    A message whose PUBACK was lost (the link dropped right after it) comes again when the
    session resumes, up to ``mqtt.session_expiry`` after the drop under MQTT 5, and the drop
    is noticed within about two keepalives. Forgetting the id before that would run the
    command twice. Under MQTT 3.1.1 the broker alone decides how long a session lives
    (mosquitto: ``persistent_client_expiration``), so the window is taken as configured:
    docs/handlers.md says to keep that broker setting within it.
    """
    window = config.inbound.dedupe_window
    if config.mqtt.protocol == "5" and config.mqtt.session_expiry > 0:  # 0: no session kept
        return max(window, float(config.mqtt.session_expiry + 2 * config.mqtt.keepalive))
    return window


# --------------------------------------------------------------------------- statements


def insert_pending(command_id: str, device: str, name: str, params: dict[str, Any], *,
                   expires_at: float | None, now: float, ttl: float | None = None) -> Statement:
    """``now`` (wall clock) is ``received_at``; ``expires_at`` is on the gateway clock."""
    return ("INSERT INTO inbox (id, device, name, params, received_at, expires_at, ttl) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (command_id, device, name, _json(params), now, expires_at, ttl))


def insert_done(command_id: str, device: str, name: str, document: dict[str, Any],
                now: float, *, done_on: float) -> Statement:
    """A command answered at once (rejected on receipt): recorded so a repeat is deduped.

    ``now`` is wall time; ``done_on`` the gateway clock's now (the dedupe window's start).
    """
    return ("INSERT INTO inbox (id, device, name, params, received_at, state, status, result, "
            "last_error, finished_at, done_on) VALUES (?, ?, ?, '{}', ?, 'done', ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (command_id, device, name, now, document["status"], _json(document),
             document.get("detail"), now, done_on))


def forget(command_id: str) -> Statement:
    return ("DELETE FROM inbox WHERE id = ?", (command_id,))


def mark_running(command_id: str, attempt: int, now: float) -> Statement:
    return ("UPDATE inbox SET state = 'running', attempts = ?, started_at = ? WHERE id = ?",
            (attempt, now, command_id))


def mark_failed_attempt(command_id: str, error: str) -> Statement:
    return ("UPDATE inbox SET state = 'pending', last_error = ? WHERE id = ?",
            (bounded(error), command_id))


def finish(command_id: str, document: dict[str, Any], *, done_on: float) -> Statement:
    """``done_on``: the gateway clock's now, where the dedupe window starts."""
    detail = document.get("detail")
    error = None if document["status"] == "ok" or detail is None else bounded(detail)
    return ("UPDATE inbox SET state = 'done', status = ?, result = ?, finished_at = ?, "
            "done_on = ?, last_error = coalesce(?, last_error) WHERE id = ?",
            (document["status"], _json(document), document["finished_at"], done_on, error,
             command_id))


def recover() -> Statement:
    """Commands that were running when the process died run again (attempts are kept)."""
    return ("UPDATE inbox SET state = 'pending' WHERE state = 'running'", ())


def prune(before: float) -> Statement:
    """Forget up to one sweep chunk of finished commands done before ``before`` on the
    gateway clock (the dedupe window; bounds the table); run it with :meth:`Store.sweep`,
    which repeats it, each chunk its own commit. Rows of before migration 3 go by their
    wall time."""
    return ("DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE state = 'done' AND "
            "(done_on < ? OR (done_on IS NULL AND finished_at < ?)) LIMIT ?)",
            (before, before, SWEEP_CHUNK))


def dead_letter(reason: str, payload: bytes, now: float) -> Statement:
    """A record of a message that had no readable id, so no result could answer it."""
    preview = bounded(payload[:256].decode("utf-8", errors="backslashreplace"), 1024)
    params = _json({"payload": preview, "bytes": len(payload)})
    return ("INSERT INTO dead_letters (id, kind, device, name, params, size, queued_at, "
            "expires_at, attempts, last_error, reason, detail, dead_at) "
            "VALUES (?, 'inbound', ?, 'invalid', ?, ?, ?, NULL, 0, NULL, 'invalid', ?, ?)",
            (new_id(), NO_DEVICE, params, len(payload), now, bounded(reason), now))


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
