"""Inbound MQTT packets cut from a buffer filled in chunks, and the two common ones decoded.

paho reads every packet with three ``recv`` calls (its first byte, its length, its body),
builds an ``MQTTMessage`` and a paho ``Properties`` for every inbound PUBLISH (whose
constructor builds its name tables and scans them for every attribute it sets) and a
``ReasonCode`` and a ``Properties`` for every PUBACK. At the rates ingest forwards (a
PUBLISH in and a PUBACK back for every message) that was about a fifth of the service's
CPU per message. :mod:`pigateway.mqtt.client` reads the socket up to :data:`CHUNK` bytes
at a time into a :class:`PacketBuffer` and cuts packets from it; of those:

- a QoS 1 or 2 PUBLISH whose every property is one a device sets (expiry, content type,
  user properties, payload format, response topic, correlation data, subscription
  identifier), none of them a string MQTT forbids, is decoded here (:func:`plain_publish`);
- a PUBACK that says success and carries no properties is read here (:func:`plain_puback`);
- every other packet, and any of those two that is not that plain (a topic alias, a
  U+FEFF or a NUL in a string, bytes that are not UTF-8, a failure code, a reason string),
  goes to paho's own handling, byte for byte as paho's reader would have handed it over:
  the refusals and repairs of :mod:`pigateway.mqtt.client` apply to it unchanged.

Light on purpose (no aiomqtt or paho): only ``mqtt/client.py`` touches the library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from pigateway.mqtt.forwarded import Extras
from pigateway.mqtt.readahead import Message

#: Bytes asked of the socket at a time (more when one packet is bigger).
CHUNK: Final = 65536
#: The properties that may come more than once (User Property, Subscription Identifier).
MAY_REPEAT: Final = (0x26, 0x0B)
#: Characters MQTT forbids in a UTF-8 string that paho refuses (surrogates never decode).
FORBIDDEN: Final = ("\x00", "\ufeff")
#: The packet type of a PUBLISH, the one packet a broker may send past our limit.
PUBLISH: Final = 3
#: PUBACK reason codes read here: success, and "no matching subscribers" (a success too).
PLAIN_PUBACK_CODES: Final = (0x00, 0x10)


#: Bytes kept of a packet over the buffer's limit (after its fixed header), the rest read
#: past: a PUBLISH's topic (64 KiB at most) and packet id are in them, all its
#: acknowledgement and its record need.
CUT_KEPT: Final = 65_536 + 8


class ProtocolError(Exception):
    """A remaining length longer than four bytes, or a packet other than a PUBLISH over our
    limit: the link is broken."""


class Cut(bytes):
    """The first :data:`CUT_KEPT` bytes of a packet over the buffer's limit (after its
    fixed header): the rest was read past and never held. ``size``: the whole packet's."""

    size: int

    def __new__(cls, data: bytes, size: int) -> Cut:
        self = super().__new__(cls, data)
        self.size = size
        return self


class PacketBuffer:
    """Bytes read from the socket, cut into whole packets (first byte, body) in order.

    A packet whose fixed header says it is over ``limit`` bytes (our Maximum Packet Size)
    is never held, so one packet costs at most ``limit`` bytes of memory whatever its
    header says (MQTT allows 256 MB): a PUBLISH's first :data:`CUT_KEPT` bytes come out as
    a :class:`Cut` once the rest has been read past; any other packet that size is no
    broker's, and raises :class:`ProtocolError` at its header.
    """

    __slots__ = ("_at", "_cut", "_data", "_skip", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self._data = bytearray()
        self._at = 0
        self.limit = limit
        #: bytes of a packet over the limit still to read past
        self._skip = 0
        #: that packet, handed out once its last byte is read past
        self._cut: tuple[int, Cut] | None = None

    def feed(self, data: bytes) -> None:
        if self._skip:
            past = min(self._skip, len(data))
            self._skip -= past
            data = data[past:]
        self._data += data

    def clear(self) -> None:
        self._data = bytearray()
        self._at = 0

    def wanted(self) -> int:
        """Bytes to ask the socket for: a chunk, or the rest of a bigger packet (one over
        the limit is read a chunk at a time)."""
        head = None if self._skip else self._head()
        if isinstance(head, tuple) and not self._over(head):
            return max(CHUNK, head[1] + head[2] - (len(self._data) - self._at))
        return CHUNK

    def whole(self) -> bool:
        """Whether a whole packet waits (the socket's readiness will not say so); a broken
        length counts as one: the next :meth:`next` raises it, and the link ends there."""
        if self._cut is not None:
            return not self._skip
        try:
            head = self._head()
            if head is None:
                return False
            size = min(head[2], CUT_KEPT) if self._over(head) else head[2]
        except ProtocolError:
            return True
        return len(self._data) - self._at >= head[1] + size

    def next(self) -> tuple[int, bytes] | None:
        """The next whole packet (its first byte, the bytes after its length), or None; a
        packet over the limit as a :class:`Cut`, once read past."""
        if self._cut is not None:
            if self._skip:
                return None
            cut, self._cut = self._cut, None
            return cut
        head = self._head()
        if head is None:
            return None
        if self._over(head):
            return self._read_past(*head)
        first, start, length = head
        end = self._at + start + length
        data = self._data
        if end > len(data):
            return None
        body = bytes(data[self._at + start:end])
        self._drop(end)
        return first, body

    def _over(self, head: tuple[int, int, int]) -> bool:
        if self.limit is None or head[1] + head[2] <= self.limit:
            return False
        if head[0] >> 4 != PUBLISH:
            raise ProtocolError(f"a packet of type {head[0] >> 4} and {head[1] + head[2]} "
                                f"bytes, over our Maximum Packet Size of {self.limit}")
        return True

    def _read_past(self, first: int, start: int, length: int) -> tuple[int, bytes] | None:
        """A packet over the limit: its first :data:`CUT_KEPT` bytes kept (once they are
        here), the rest dropped as it comes (:meth:`feed`)."""
        kept = min(length, CUT_KEPT)
        at = self._at + start
        data = self._data
        if len(data) - at < kept:
            return None
        cut = Cut(bytes(data[at:at + kept]), start + length)
        end = min(len(data), at + length)
        self._skip = at + length - end
        self._drop(end)
        if self._skip:
            self._cut = (first, cut)
            return None
        return first, cut

    def _drop(self, end: int) -> None:
        """Forget the bytes before ``end`` (now and then, not at every packet)."""
        if end == len(self._data):
            self.clear()
        else:
            self._at = end
            if end >= CHUNK:
                del self._data[:end]
                self._at = 0

    def _head(self) -> tuple[int, int, int] | None:
        """(first byte, offset of the body, body length) of the next packet, if its fixed
        header is all there; :class:`ProtocolError` for a length over four bytes."""
        data, at = self._data, self._at
        length = shift = 0
        for offset in range(1, 5):
            if at + offset >= len(data):
                return None
            byte = data[at + offset]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return data[at], offset + 1, length
            shift += 7
        raise ProtocolError("a remaining length longer than four bytes")


Read = tuple[Any, int] | None


def _string(body: bytes, at: int, end: int) -> Read:
    """A UTF-8 string paho takes (none of :data:`FORBIDDEN`) and the offset after it."""
    if at + 2 > end:
        return None
    stop = at + 2 + (body[at] << 8 | body[at + 1])
    if stop > end:
        return None
    try:
        text = body[at + 2:stop].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if any(bad in text for bad in FORBIDDEN) else (text, stop)


def _pair(body: bytes, at: int, end: int) -> Read:
    first = _string(body, at, end)
    second = None if first is None else _string(body, first[1], end)
    return None if first is None or second is None else ((first[0], second[0]), second[1])


def _binary(body: bytes, at: int, end: int) -> Read:
    stop = at + 2 + (body[at] << 8 | body[at + 1]) if at + 2 <= end else end + 1
    return None if stop > end else (None, stop)


def _varint(body: bytes, at: int, end: int) -> Read:
    value = shift = 0
    for offset in range(4):
        if at + offset >= end:
            return None
        byte = body[at + offset]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + offset + 1
        shift += 7
    return None


def _number(size: int) -> Callable[[bytes, int, int], Read]:
    def read(body: bytes, at: int, end: int) -> Read:
        stop = at + size
        return None if stop > end else (int.from_bytes(body[at:stop], "big"), stop)
    return read


#: MQTT 5 property identifiers a plain PUBLISH may carry, each with its reader (a value and
#: the offset after it). A Topic Alias (0x23) is not plain: its topic lives in paho's table.
PUBLISH_PROPERTIES: Final[dict[int, Callable[[bytes, int, int], Read]]] = {
    0x01: _number(1), 0x02: _number(4), 0x03: _string, 0x08: _string, 0x09: _binary,
    0x0B: _varint, 0x26: _pair}
#: Their identifiers of expiry, content type and user property.
EXPIRY, CONTENT_TYPE, USER_PROPERTY = 0x02, 0x03, 0x26


def _properties(body: bytes, at: int, end: int, retain: bool) -> Extras | None:
    """The extras of a PUBLISH's property block ``body[at:end]``; None: not plain."""
    values: dict[int, Any] = {}
    users: list[tuple[str, str]] = []
    while at < end:
        ident = body[at]
        read = PUBLISH_PROPERTIES.get(ident)
        if read is None or (ident in values and ident not in MAY_REPEAT):
            return None  # not plain, or twice what may come once (paho refuses that)
        found = read(body, at + 1, end)
        if found is None:
            return None
        values[ident], at = found
        if ident == USER_PROPERTY:
            users.append(found[0])
    return Extras(retain, values.get(CONTENT_TYPE), tuple(users), values.get(EXPIRY))


def _publish_head(first: int, body: bytes) -> tuple[str, int, int, int] | None:
    """Topic, packet id, QoS of a QoS 1 or 2 PUBLISH and the offset after them."""
    qos = (first >> 1) & 3
    if qos not in (1, 2) or len(body) < 4:
        return None
    at = 2 + (body[0] << 8 | body[1])
    if at + 2 > len(body) or at == 2:
        return None  # cut off, or an empty topic (a Topic Alias: paho's table)
    try:
        topic = body[2:at].decode("utf-8")
    except UnicodeDecodeError:
        return None
    mid = body[at] << 8 | body[at + 1]
    return None if mid == 0 else (topic, mid, qos, at + 2)


def plain_publish(first: int, body: bytes, v5: bool) -> Message | None:
    """A QoS 1 or 2 PUBLISH as a :class:`Message`, as paho and ``mqtt/client.py`` would
    have made it; None when it is not plain (see the module's docstring): paho takes it."""
    head = _publish_head(first, body)
    if head is None:
        return None
    topic, mid, qos, at = head
    retain = bool(first & 1)
    if not v5:
        return Message(topic, body[at:], mid, qos, _RETAINED if retain else _PLAIN)
    length = _varint(body, at, len(body))
    if length is None or length[1] + length[0] > len(body):
        return None
    end = length[1] + length[0]
    extras = (_RETAINED if retain else _PLAIN) if end == length[1] else \
        _properties(body, length[1], end, retain)
    return None if extras is None else Message(topic, body[end:], mid, qos, extras)


#: The extras of a message that carries none (shared: frozen).
_PLAIN: Final = Extras()
_RETAINED: Final = Extras(retain=True)


def plain_puback(body: bytes, v5: bool) -> tuple[int, int] | None:
    """(packet id, reason code) of a PUBACK that says success (:data:`PLAIN_PUBACK_CODES`)
    with no properties; None for any other (one shorter than a packet id too): paho reads
    it, and ends the link on what it calls malformed."""
    size = len(body)
    if size == 2:
        return body[0] << 8 | body[1], 0
    if not v5 or not 3 <= size <= 4 or body[2] not in PLAIN_PUBACK_CODES or (size == 4 and body[3]):
        return None
    return body[0] << 8 | body[1], body[2]
