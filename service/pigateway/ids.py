"""Ids for commands and batches: ULIDs, sortable by time and unique across processes."""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of Crockford characters, so an id is 13 lookups of 10 bits each.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = range(120, -10, -10)
_RANDOM_MASK = (1 << 80) - 1
_last_id = [0, 0]  # (ms, random) of the last id made now by this process


def new_id(now: float | None = None) -> str:
    """A ULID: 26 characters of Crockford base32, sortable by creation time.

    48 bits of milliseconds then 80 random bits, so ids are unique across processes.
    Within one millisecond the random part counts up, so the ids one process makes sort
    in the order it made them. ``now`` (unix seconds) makes an id of that moment instead.
    """
    if now is not None:
        return _encode(int(now * 1000), secrets.randbits(80))
    ms = time.time_ns() // 1_000_000
    if ms <= _last_id[0]:
        ms, rand = _last_id[0], (_last_id[1] + 1) & _RANDOM_MASK
    else:
        rand = secrets.randbits(80)
    _last_id[0], _last_id[1] = ms, rand
    return _encode(ms, rand)


def _encode(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])
