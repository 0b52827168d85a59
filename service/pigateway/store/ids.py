"""Ids for commands and batches: ULIDs, sortable by time and unique across processes."""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of Crockford characters, so an id is 13 lookups of 10 bits each.
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_RANDOM_MASK = (1 << 80) - 1
#: The random part is encoded as two halves of 40 bits (4 pairs each): small integers,
#: where shifting the whole 130-bit id cost a put ~15,000 instructions an id.
_HALF = 40
_HALF_MASK = (1 << _HALF) - 1
#: Bytes of the random part. Read from os.urandom, which is what secrets.randbits reads;
#: the secrets module would cost ``pigateway send`` ~5 ms of imports (hmac, hashlib, random).
_RANDOM_BYTES = 10
_last_id = [0, 0]  # (ms, random) of the last id made now by this process
_head = [(-1, "")]  # (ms, its first ten characters) of the last ids made


def new_id(now: float | None = None) -> str:
    """A ULID: 26 characters of Crockford base32, sortable by creation time.

    48 bits of milliseconds then 80 random bits, so ids are unique across processes.
    Within one millisecond the random part counts up, so the ids one process makes sort
    in the order it made them. ``now`` (unix seconds) makes an id of that moment instead.
    """
    if now is not None:
        return _encode(int(now * 1000), _random())
    return new_ids(1)[0]


def new_ids(count: int) -> list[str]:
    """``count`` ids made now: what as many calls of :func:`new_id` would return, in that
    order (one millisecond, the random part counting up), at a fraction of the cost: the
    clock and the kernel are asked once for the lot, and an id is its last two characters
    appended to the 24 before them, which change once in 1,024 ids."""
    if count <= 0:
        return []
    ms = time.time_ns() // 1_000_000
    if ms <= _last_id[0]:
        ms, rand = _last_id[0], (_last_id[1] + 1) & _RANDOM_MASK
    else:
        rand = _random()
    _last_id[0], _last_id[1] = ms, (rand + count - 1) & _RANDOM_MASK
    made_at, head = _head[0]
    if made_at != ms:  # the first ten characters, made once a millisecond
        head = _encode_ms(ms)
        _head[0] = (ms, head)
    if count == 1:  # a put of one: no blocks
        return [head + _encode_half(rand >> _HALF) + _encode_half(rand & _HALF_MASK)]
    ids: list[str] = []
    value, end = rand, rand + count
    while value < end:  # a block of up to 1,024 ids that differ in their last two characters
        bits = value & _RANDOM_MASK  # past the 80 bits: wrap, as new_id's count did
        stem = head + _encode_half(bits >> _HALF) + _encode_half(bits & _HALF_MASK)[:6]
        block = min(end, (value | 1023) + 1) - value
        ids += [stem + pair for pair in _PAIRS[bits & 1023:(bits & 1023) + block]]
        value += block
    return ids


def _random() -> int:
    """80 random bits from the kernel's CSPRNG."""
    return int.from_bytes(os.urandom(_RANDOM_BYTES), "big")


def _encode(ms: int, rand: int) -> str:
    return _encode_ms(ms) + _encode_half(rand >> _HALF) + _encode_half(rand & _HALF_MASK)


def _encode_ms(ms: int) -> str:
    """The first 10 characters: the 48 bits of milliseconds (after 2 bits of zeros)."""
    return "".join([_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])


def _encode_half(bits: int) -> str:
    """8 characters: 40 bits of the random part."""
    return (_PAIRS[bits >> 30] + _PAIRS[(bits >> 20) & 1023] + _PAIRS[(bits >> 10) & 1023]
            + _PAIRS[bits & 1023])
