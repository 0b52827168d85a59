"""Ids for commands and batches: ULIDs, sortable by time and unique across processes."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of Crockford characters, so an id is 13 lookups of 10 bits each.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_SHIFTS = range(120, -10, -10)
_RANDOM_MASK = (1 << 80) - 1
#: Bytes of the random part. Read from os.urandom, which is what secrets.randbits reads;
#: the secrets module would cost ``pigateway send`` ~5 ms of imports (hmac, hashlib, random).
_RANDOM_BYTES = 10
_last_id = [0, 0]  # (ms, random) of the last id made now by this process


def new_id(now: float | None = None) -> str:
    """A ULID: 26 characters of Crockford base32, sortable by creation time.

    48 bits of milliseconds then 80 random bits, so ids are unique across processes.
    Within one millisecond the random part counts up, so the ids one process makes sort
    in the order it made them. ``now`` (unix seconds) makes an id of that moment instead.
    """
    if now is not None:
        return _encode(int(now * 1000), _random())
    ms = time.time_ns() // 1_000_000
    if ms <= _last_id[0]:
        ms, rand = _last_id[0], (_last_id[1] + 1) & _RANDOM_MASK
    else:
        rand = _random()
    _last_id[0], _last_id[1] = ms, rand
    return _encode(ms, rand)


def _random() -> int:
    """80 random bits from the kernel's CSPRNG."""
    return int.from_bytes(os.urandom(_RANDOM_BYTES), "big")


def _encode(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])
