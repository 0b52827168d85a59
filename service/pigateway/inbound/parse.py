"""Parsing a command from the broker: the wire contract's checks, each naming its field.

A command that does not fit the contract (including what ``json.loads`` takes but nothing
can store: ``1e400``, lone surrogates) becomes a :class:`~pigateway.errors.RejectedCommand`
with a bounded reason naming the field; pure, no I/O.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pigateway import wire
from pigateway.config import MANAGE_VERBS, Config
from pigateway.errors import RejectedCommand
from pigateway.mqtt.packets import Undecodable
from pigateway.text import bounded, encodable, quoted

VERSION = wire.VERSION
FIELDS = ("v", "id", "device", "name", "params", "ttl")
MAX_ID = 128
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_TTL = 366 * 24 * 3600.0
#: Bytes a stored result adds beyond its document (row, index entries, WAL frame).
RESULT_ROW_BYTES = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class Limits:
    """What :func:`parse_command` accepts: sizes from ``[inbound]``, devices from the config."""

    max_bytes: int
    max_depth: int
    devices: Collection[str]

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(max_bytes=config.inbound.max_payload_bytes,
                   max_depth=config.inbound.max_depth, devices=frozenset(config.devices))


@dataclass(frozen=True)
class InboundCommand:
    """A command that fits the contract ``{"v":1,"id","device","name","params","ttl"?}``."""

    id: str
    device: str
    name: str
    params: dict[str, Any]
    ttl: float | None = None


def parse_command(payload: bytes, limits: Limits) -> InboundCommand:
    """Check one message against the wire contract; raise :class:`RejectedCommand` saying
    what is wrong (with the id and device when they could be read). The reason is
    :func:`~pigateway.text.bounded`, so it can always be recorded and logged."""
    try:
        return _parse(payload, limits)
    except RejectedCommand as exc:
        raise RejectedCommand(bounded(exc.reason), command_id=exc.command_id,
                              device=exc.device) from None


def _parse(payload: bytes, limits: Limits) -> InboundCommand:
    document = _decode(payload, limits)
    if not isinstance(document, dict):
        raise RejectedCommand(f"the payload must be a JSON object, got {_kind(document)}")
    command_id = readable_id(document)
    device = document.get("device")
    ours = device if isinstance(device, str) and device in limits.devices else None
    try:
        return _validate(document, limits)
    except RejectedCommand as exc:  # the answer is filed under the device only if it is ours
        raise RejectedCommand(exc.reason, command_id=command_id, device=ours) from None


def readable_id(document: dict[str, Any]) -> str | None:
    """The command's id when it is usable in a result: 1-128 printable characters that
    UTF-8 can encode (a lone surrogate cannot be stored or sent)."""
    value = document.get("id")
    if (isinstance(value, str) and 0 < len(value) <= MAX_ID and not _CONTROL.search(value)
            and encodable(value)):
        return value
    return None


def _decode(payload: bytes, limits: Limits) -> Any:
    if len(payload) > limits.max_bytes:
        raise RejectedCommand(f"the payload is {len(payload)} bytes; the limit is "
                              f"{limits.max_bytes} (inbound.max_payload_bytes)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedCommand(f"the payload is not UTF-8: {exc.reason} at byte {exc.start}") \
            from None
    try:
        document = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RejectedCommand(f"the payload is not JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
    except RecursionError:
        raise RejectedCommand(_too_deep(limits)) from None
    except ValueError as exc:  # NaN/Infinity, integers over Python's digit limit
        raise RejectedCommand(f"the payload is not JSON: {exc}") from None
    if _deeper_than(document, limits.max_depth):
        raise RejectedCommand(_too_deep(limits))
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(limits: Limits) -> str:
    return (f"the payload is nested more than {limits.max_depth} levels deep "
            "(inbound.max_depth)")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest more than ``limit`` levels (the document is level 1)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) \
            else None
        if children is None:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _check_storable(document: dict[str, Any], limits: Limits) -> None:
    """What ``json.loads`` takes but no store or encoder does: numbers beyond a double
    (``1e400`` becomes infinity) and lone surrogates (``"\\ud800"``), in any key or value."""
    found = _unstorable(document)
    if found is not None:
        where, problem = found
        raise RejectedCommand(f"{where} holds {problem}")


def _unstorable(document: dict[str, Any]) -> tuple[str, str] | None:
    """(where, what) of the first value that cannot be stored, in document order."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return _field(path), "a number out of range (JSON numbers here fit a double)"
        if isinstance(value, str) and not encodable(value):
            return _field(path), "a lone surrogate escape, which is not Unicode text"
        if isinstance(value, dict):
            for key in value:
                if not encodable(key):
                    where = f"a key of the field {quoted(path)}" if path else "a field name"
                    return where, "a lone surrogate escape, which is not Unicode text"
            children = [(f"{path}.{key}" if path else key, child)
                        for key, child in value.items()]
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{n}]", child) for n, child in enumerate(value)]))
    return None


def _field(path: str) -> str:
    return f"the field {quoted(path)}"


def _validate(document: dict[str, Any], limits: Limits) -> InboundCommand:
    for check in _CHECKS:
        check(document, limits)
    ttl = document.get("ttl")
    return InboundCommand(id=document["id"], device=document["device"], name=document["name"],
                          params=document["params"], ttl=None if ttl is None else float(ttl))


def _required(document: dict[str, Any], field: str) -> Any:
    if field not in document:
        raise RejectedCommand(f"the field {field!r} is missing")
    return document[field]


def _check_version(document: dict[str, Any], limits: Limits) -> None:
    version = _required(document, "v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RejectedCommand(f"the field 'v' must be the number {VERSION}, got {_kind(version)}")
    if version != VERSION:
        raise RejectedCommand(f"unsupported version v={version}; this gateway speaks v={VERSION}")


def _check_fields(document: dict[str, Any], limits: Limits) -> None:
    unknown = sorted(set(document) - set(FIELDS))
    if unknown:
        raise RejectedCommand(f"unknown field {quoted(unknown[0])}; a v{VERSION} command has "
                              f"only {', '.join(FIELDS)}")


def _check_id(document: dict[str, Any], limits: Limits) -> None:
    value = _required(document, "id")
    if readable_id(document) is None:
        raise RejectedCommand(f"the field 'id' must be a string of 1-{MAX_ID} printable "
                              f"characters, got {_kind(value)}")


def _check_device(document: dict[str, Any], limits: Limits) -> None:
    value = _required(document, "device")
    if not isinstance(value, str):
        raise RejectedCommand(f"the field 'device' must be a string, got {_kind(value)}")
    if value not in limits.devices:
        known = ", ".join(sorted(limits.devices)[:20]) or "(none configured)"
        raise RejectedCommand(f"unknown device {quoted(value)}; this gateway has: {known}")


def _check_name(document: dict[str, Any], limits: Limits) -> None:
    value = _required(document, "name")
    if not isinstance(value, str) or not NAME.match(value):
        raise RejectedCommand("the field 'name' must be 1-64 of letters, digits, '_', '.', ':', "
                              f"'-', got {_kind(value)}")


def _check_params(document: dict[str, Any], limits: Limits) -> None:
    value = _required(document, "params")
    if not isinstance(value, dict):
        raise RejectedCommand(f"the field 'params' must be a JSON object, got {_kind(value)}")


def _check_ttl(document: dict[str, Any], limits: Limits) -> None:
    value = document.get("ttl")
    if value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not math.isfinite(value) or not 0 < value <= MAX_TTL:
        raise RejectedCommand(f"the field 'ttl' must be seconds > 0 and <= {MAX_TTL:.0f}, "
                              f"got {_kind(value)}")


_CHECKS = (_check_storable, _check_version, _check_fields, _check_id, _check_device,
           _check_name, _check_params, _check_ttl)


#: The inbox lane of manage commands (:mod:`pigateway.manage`); no device is named so.
MANAGE_DEVICE = "@gateway"
MANAGE_FIELDS = ("v", "id", "name", "params")


def parse_manage(payload: bytes, limits: Limits, allow: Collection[str]) -> InboundCommand:
    """Check one message of the ``manage`` topic: a command's document without ``device``
    and ``ttl``, whose ``name`` is a verb of ``allow`` (``manage.allow``). Refused as
    :func:`parse_command` refuses, in the same bounded words."""
    try:
        return _parse_manage(payload, limits, allow)
    except RejectedCommand as exc:
        raise RejectedCommand(bounded(exc.reason), command_id=exc.command_id) from None


def _parse_manage(payload: bytes, limits: Limits, allow: Collection[str]) -> InboundCommand:
    document = _decode(payload, limits)
    if not isinstance(document, dict):
        raise RejectedCommand(f"the payload must be a JSON object, got {_kind(document)}")
    command_id = readable_id(document)
    try:
        for check in (_check_storable, _check_version, _check_manage_fields, _check_id,
                      _check_params):
            check(document, limits)
        name = _required(document, "name")
        if not isinstance(name, str) or name not in MANAGE_VERBS:
            raise RejectedCommand(f"unknown verb {_kind(name)}; the verbs are "
                                  f"{', '.join(MANAGE_VERBS)}")
        if name not in allow:
            raise RejectedCommand(f"the verb {name!r} is not allowed here (manage.allow: "
                                  f"{', '.join(allow) or 'none'})")
    except RejectedCommand as exc:
        raise RejectedCommand(exc.reason, command_id=command_id) from None
    return InboundCommand(id=document["id"], device=MANAGE_DEVICE, name=name,
                          params=document["params"])


def _check_manage_fields(document: dict[str, Any], limits: Limits) -> None:
    unknown = sorted(set(document) - set(MANAGE_FIELDS))
    if unknown:
        raise RejectedCommand(f"unknown field {quoted(unknown[0])}; a v{VERSION} manage "
                              f"command has only {', '.join(MANAGE_FIELDS)}")


def undecodable_refusal(packet: Undecodable, limits: Limits) -> RejectedCommand:
    """Why a message the MQTT library could not decode is refused, filed under its command
    id when its payload could be found and names one (so the sender gets a ``rejected``
    result); without an id it is dead-lettered with its raw bytes."""
    command_id = device = None
    if packet.payload is not None:
        try:
            command = parse_command(packet.payload, limits)
            command_id, device = command.id, command.device
        except RejectedCommand as exc:
            command_id, device = exc.command_id, exc.device
    return RejectedCommand(bounded(packet.describe()), command_id=command_id, device=device)


def _kind(value: Any) -> str:
    """A value as a person reading the contract would name it, shortened."""
    shown = bounded(json.dumps(value, ensure_ascii=False, default=str)[:400], 40)
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {shown}"
