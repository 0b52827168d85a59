"""What text from people and clients may be: one set of rules for every way in.

``pigateway send``, the control socket, the Python API and the config all take text from
outside. What ``json.loads`` accepts is more than can be stored, re-encoded or sent on:
``1e400`` and ``NaN`` (not finite), ``"\\ud800"`` (a lone surrogate, not UTF-8), a
5,000-digit integer (``int`` refuses to print it), 4,000 nested ``[`` (a RecursionError).
Names that travel in topics, log lines and table cells must not carry control characters.
Here each of those is a typed error (:class:`~pigateway.errors.InvalidCommand`) that says
what is wrong, never a builtin exception, and every shown value is bounded.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Iterator
from typing import Any, Final

from pigateway.errors import InvalidCommand, InvalidJson

#: Nesting depth of JSON taken from the command line at most (receivers need far less;
#: Python's own recursion limit is about 1,000).
MAX_DEPTH: Final = 64
#: Digits of a JSON integer at most: more cannot be printed again by ``int`` (4,300), and
#: no device needs them.
MAX_INT_DIGITS: Final = 1000
#: Bytes of an MQTT topic name at most (a two-byte length prefix on the wire).
MAX_TOPIC_BYTES: Final = 65535

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TOKEN = re.compile(r'\\.|["\[\]{}]', re.S)


class _Shown(reprlib.Repr):
    """``repr`` cut short: long strings, deep structures and huge numbers stay small."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = limit
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of a 5,000-digit int raises ValueError
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


def shown(value: Any, limit: int = 80) -> str:
    """A ``repr`` of ``value`` of at most about ``limit`` characters, fit for a message."""
    return _Shown(limit).repr(value)


# --------------------------------------------------------------------------- names


def text_problem(text: str) -> str | None:
    """What keeps ``text`` from travelling as a name (None: nothing): a control character
    (it would forge log lines and break topics and tables) or a lone surrogate (not UTF-8:
    SQLite, MQTT and the journal cannot take it)."""
    if found := _CONTROL.search(text):
        return f"has a control character (U+{ord(found.group()):04X} at {found.start()})"
    if (at := _surrogate_at(text)) is not None:
        return f"has a lone surrogate (U+{ord(text[at]):04X} at {at}), which is not UTF-8"
    return None


def travels(text: str) -> bool:
    """Whether ``text`` has no :func:`text_problem`, for a caller that needs the answer more
    often than the words (every put): one scan for controls, none for an ASCII text."""
    return _CONTROL.search(text) is None and _surrogate_at(text) is None


def _surrogate_at(text: str) -> int | None:
    """Where ``text``'s first surrogate is (None: it has none). Strict UTF-8 refuses exactly
    the surrogates, and an ASCII text (a flag, not a scan) has none. No regular expression:
    one with the surrogate range costs every process ~1 ms to compile (a table of 65,536
    entries), a fifth of ``pigateway send``'s own code."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def topic_problem(topic: str) -> str | None:
    """What keeps ``topic`` from being an MQTT topic name one can publish to (None: nothing)."""
    if not topic:
        return "is empty"
    if "+" in topic or "#" in topic:
        return "has an MQTT wildcard ('+' or '#'), which only subscriptions may use"
    problem = text_problem(topic)
    if problem is not None:
        return problem
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"is over {MAX_TOPIC_BYTES} bytes (UTF-8), the most MQTT allows"
    return None


# --------------------------------------------------------------------------- JSON


class _Refused(Exception):
    """Raised inside the decoder's hooks; turned into :class:`InvalidCommand` at once."""


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON (numbers must be finite)")


def _finite(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise _Refused(f"{shown(text, 40)} is too large for a number (not finite)")
    return number


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits is too long "
                       f"(at most {MAX_INT_DIGITS})")
    return int(text)


def depth(text: str) -> int:
    """How deep the JSON ``text`` nests (``{}`` is 1), found without parsing it: deep input
    must be refused before ``json.loads`` recurses into it."""
    deepest = level = 0
    in_string = False
    for token in _TOKEN.finditer(text):  # one pass: no regex backtracking over quotes
        mark = token.group()
        if mark == '"':
            in_string = not in_string
        elif not in_string and mark in "[{":
            level += 1
            deepest = max(deepest, level)
        elif not in_string and mark in "]}":
            level -= 1
    return deepest


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode JSON that can be stored and sent on: :class:`InvalidJson` when ``data`` is not
    JSON, :class:`InvalidCommand` when it is but cannot be kept (too deep, not finite, a
    huge integer, a lone surrogate)."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    found = depth(text)
    if found > max_depth:
        raise InvalidCommand(f"nested {found} deep; at most {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite,
                           parse_int=_integer)
    except _Refused as exc:
        raise InvalidCommand(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # what the hooks do not see; bounded text
        raise InvalidCommand(f"cannot be decoded: {shown(str(exc), 120)}") from None
    for string in _strings(value):
        at = _surrogate_at(string)
        if at is not None:
            raise InvalidCommand(f"the string {shown(string, 40)} has a lone surrogate "
                                 f"(U+{ord(string[at]):04X}), which is not UTF-8")
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string in decoded JSON, keys too (iterative: the depth is already bounded)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
