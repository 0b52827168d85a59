"""What an inbox row means: commands from the broker, from receipt to their one result.

A row moves ``pending`` -> ``running`` -> ``done``. ``done`` rows keep their result
document for ``inbound.dedupe_window`` seconds (never less than the broker's session can
deliver a message again: :func:`dedupe_horizon`), so a command delivered again (MQTT is
at-least-once) is answered from the record instead of being run twice. The table lives in
the store's SQLite file; its verbs (``store.inbox.receive``, ``finish``, ...) are in
:mod:`pigateway.store.inbox`. This module holds what needs no SQL: the row
(:class:`Entry`), result documents, and the dedupe horizon.

The one rule that makes results exactly-once: a result enters the outbox in the SAME
transaction that marks its row ``done`` (:meth:`pigateway.store.inbox.Inbox.finish`). A
crash before that commit leaves the row ``pending``/``running`` and the command runs
again; a crash after it leaves both the result and the record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pigateway import wire
from pigateway.config import Config
from pigateway.inputs import text_problem
from pigateway.text import bounded, fit_json

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
    return len(wire.encode(value).encode("utf-8"))


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
