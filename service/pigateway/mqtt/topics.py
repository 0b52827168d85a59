"""The MQTT topic-filter grammar, the one the service uses everywhere.

``+`` takes one level, ``#`` the rest (also none); a topic that starts with ``$`` (the
broker's own, ``$SYS/...``) matches no filter that starts with a wildcard (MQTT 4.7.2).
Pure text: importing it loads no MQTT library.
"""

from __future__ import annotations

from typing import Final


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter ``pattern`` (``+`` one level, ``#`` the rest).

    ``$`` topics match no filter that starts with a wildcard (MQTT 4.7.2).
    """
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    want, have = pattern.split("/"), topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(have) or (level != "+" and level != have[index]):
            return False
    return len(want) == len(have)


#: Stands for a part of a topic known only at run time (a command's name) in
#: :func:`filter_may_match`; a level that holds it may become one level or several.
NAME_SLOT: Final = "\x00name\x00"


def filter_may_match(pattern: str, topic: str) -> bool:
    """Whether the MQTT filter ``pattern`` can match a topic made from ``topic``, where each
    level holding :data:`NAME_SLOT` may become any one or more levels (a command name may
    hold a '/'). Errs on the side of a match: it guards against loops."""
    return _may_match(pattern.split("/"), topic.split("/"))


def _may_match(want: list[str], have: list[str]) -> bool:
    if not want:
        return not have
    if want[0] == "#":
        return True
    if not have:
        return False
    if NAME_SLOT in have[0]:  # takes 1..n of the filter's levels, whatever they say
        return any("#" in want[:taken] or _may_match(want[taken:], have[1:])
                   for taken in range(1, len(want) + 1))
    if want[0] not in ("+", have[0]):
        return False
    return _may_match(want[1:], have[1:])
