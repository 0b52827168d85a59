"""A forwarded message as a queue row: the device's own message, kept whole.

:mod:`pigateway.ingest` turns a message from the local broker into a row of kind
``forward`` (:func:`pack`); the drain turns the row back into one PUBLISH (:func:`unpack`).
The row's ``params`` is a small JSON object, so a forwarded message shares every rule of the
queue (bounds, overflow, TTL, dead letters, attempts): ``t`` the uplink topic, ``p`` the
payload when it is UTF-8 text (stored as is: no size penalty) or ``b`` its base64 otherwise,
``r`` the retain flag, ``ct`` the MQTT 5 content type, ``up`` the user properties, ``x``
the message expiry it came with. The command id travels as the user property
:data:`ID_PROPERTY` (MQTT 5 only).

Light on purpose (no aiomqtt): ``pigateway send`` and the batcher import it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

#: The user property that carries a forwarded message's command id to the receiver.
ID_PROPERTY: Final = "pigateway-id"
#: The user property on what pigateway itself publishes to the local broker: ingest never
#: takes such a message back in (no loops, across connections).
ORIGIN_PROPERTY: Final = "pigateway-origin"


@dataclass(frozen=True)
class Extras:
    """What a message carries besides topic and payload (MQTT 5 properties, retain)."""

    retain: bool = False
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    #: MQTT 5 Message Expiry Interval, seconds
    expiry: int | None = None


@dataclass(frozen=True)
class Forward:
    """One message to publish on the uplink as it came."""

    topic: str
    payload: bytes
    extras: Extras


def pack(topic: str, payload: bytes, extras: Extras) -> dict[str, Any]:
    """The row ``params`` of a message for ``topic`` (the uplink topic)."""
    params: dict[str, Any] = {"t": topic}
    try:
        params["p"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        params["b"] = base64.b64encode(payload).decode("ascii")
    if extras.retain:
        params["r"] = 1
    if extras.content_type is not None:
        params["ct"] = extras.content_type
    users = _without_ours(extras.user_properties)
    if users:
        params["up"] = [list(pair) for pair in users]
    if extras.expiry is not None:
        params["x"] = extras.expiry
    return params


def unpack(params: dict[str, Any], *, ttl_left: float | None = None,
           command_id: str | None = None) -> Forward:
    """The message a row holds. ``ttl_left``: the seconds its queue TTL has left, sent as
    the message expiry when it came with one. ``command_id`` goes in :data:`ID_PROPERTY`.
    A row that does not hold a message (written by hand?) raises ``ValueError``.
    """
    topic = params.get("t")
    if not isinstance(topic, str) or not topic:
        raise ValueError("a forward row without its topic 't'")
    if "p" in params:
        payload = str(params["p"]).encode("utf-8")
    else:
        try:
            payload = base64.b64decode(str(params.get("b", "")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"a forward row with a bad payload: {exc}") from exc
    users = _without_ours((str(k), str(v)) for k, v in params.get("up", []))
    if command_id is not None:
        users = (*users, (ID_PROPERTY, command_id))
    expiry = params.get("x")
    if isinstance(expiry, int) and ttl_left is not None:
        expiry = max(1, int(ttl_left))
    return Forward(topic, payload, Extras(
        retain=bool(params.get("r")), content_type=params.get("ct"),
        user_properties=users, expiry=expiry if isinstance(expiry, int) else None))


def _without_ours(users: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A device's user properties without :data:`ID_PROPERTY`: the one a forward carries is
    its command's id, which receivers dedupe by; a device's own (the same on every message)
    would make every forward after the first look like a repeat. (``pigateway-origin`` is
    ingest's loop guard: a message with ours is never taken in.)"""
    return tuple(pair for pair in users if pair[0] != ID_PROPERTY)
