"""Bounded text: the one way a user-derived string becomes a reason, detail, error or log line.

A message from the broker can carry anything ``json.loads`` accepts: 60 KB keys, control
characters, lone surrogates (``"\\ud800"``) that no UTF-8 encoder takes. Whatever the
service writes about such a message (a rejection reason, a handler's error, ``last_error``,
a journal line) goes through :func:`bounded` first, so recording it cannot fail: the result
is printable, encodable and short. :func:`fit_json` then cuts a text to a byte budget of its
JSON form, which is what a stored result has to fit (``store.max_params_bytes``).
:func:`format_age` is the one way a duration is shown to people (``STATUS=``, the CLI),
:func:`format_size` a size and :func:`plural` a count.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Final

#: Characters of a reason or detail at most (a result stays far below max_params_bytes).
MAX_TEXT: Final = 500
#: Characters of a user-derived value quoted inside a log line or a reason.
MAX_QUOTE: Final = 80
_MARK: Final = "..."


@functools.cache
def _unprintable() -> re.Pattern[str]:
    """C0/C1 controls (newlines too: one record is one line), DEL, and lone surrogates;
    compiled on first use: a class with the surrogate range costs its compile ~1 ms (a
    table of 65,536 entries), which ``pigateway send`` never needs."""
    return re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def bounded(value: object, limit: int = MAX_TEXT) -> str:
    """``str(value)`` with every unprintable or unencodable character escaped (``\\x00``,
    ``\\ud800``) and cut to ``limit`` characters (ending ``...`` when cut)."""
    text = value if isinstance(value, str) else _str(value)
    if len(text) > 4 * limit:  # escaping grows a text at most 6x: only look at what can stay
        text = text[:4 * limit]
    text = _unprintable().sub(_escape, text)
    if len(text) <= limit:
        return text
    if limit <= len(_MARK):
        return text[:max(0, limit)]
    return text[:limit - len(_MARK)] + _MARK


def quoted(value: object, limit: int = MAX_QUOTE) -> str:
    """A user-derived value inside a sentence: ``'bounded text'``."""
    return f"'{bounded(value, limit)}'"


def encodable(text: str) -> bool:
    """Whether ``text`` can be stored (UTF-8 takes it: no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def fit_json(text: str, max_bytes: int) -> str:
    """``text`` cut (ending ``...``) so its JSON string form is at most ``max_bytes`` bytes
    of UTF-8; ``""`` when not even that fits. ``text`` must already be :func:`bounded`."""
    for _ in range(32):  # each cut shrinks by at least one character: bounded, and few
        size = len(json.dumps(text, ensure_ascii=False).encode())
        if size <= max_bytes:
            return text
        keep = min(len(text) - 1 - len(_MARK), len(text) * max_bytes // size - len(_MARK))
        if keep <= 0:
            return ""
        text = text[:keep] + _MARK
    return ""


def _str(value: object) -> str:
    try:
        return str(value)
    except Exception as exc:  # a __str__ that fails must not fail the record of it
        return f"<{type(value).__name__} that cannot be shown: {type(exc).__name__}>"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def format_size(count: float) -> str:
    """Bytes for people, in binary units as ``df -h`` and ``ls -lh`` show them: ``0 B``,
    ``812 B``, ``256 KiB``, ``1.5 MiB``, ``77.9 GiB``: every size a person reads (the CLI,
    a refusal's message) goes through here, never a raw byte count."""
    value = float(max(0, count))
    if value < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}".replace(".0 ", " ")


def plural(count: int, one: str, many: str | None = None) -> str:
    """``1 command``, ``2 commands``, ``1,204 commands`` (``many`` for irregular plurals):
    every count a person reads, in the CLI and the journal."""
    return f"{count:,} {one if count == 1 else (many or one + 's')}"


def json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words (``an array``, ``a string``), for a message
    that says what was expected instead: never Python's ``list`` or ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), (int | float, "a number"))
    return next((kind for python, kind in kinds if isinstance(value, python)), "not JSON")


def format_age(seconds: float) -> str:
    """A short human duration: ``12s``, ``3m``, ``2h 5m``, ``3d 4h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
