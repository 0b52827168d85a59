"""An inbound PUBLISH the MQTT library could not decode, read by our own rules instead.

Brokers let through what paho refuses: mosquitto 2.0 passes a user property or content type
holding U+FEFF (which MQTT 5 allows), and paho's decoder raises ``MalformedPacket`` on it.
Left to paho, that one message ends the link, and a persistent session sends it again first
at every reconnect: a wedge. :mod:`pigateway.mqtt` reads what it needs of such a packet here
(QoS from the fixed header; topic and packet id, which precede the properties; the payload
when the property length can be trusted), acknowledges it through paho's own flow once its
consumer recorded it, and hands the consumer an :class:`Undecodable` payload: the raw packet
bytes, bounded, and why. The inbound path answers it ``rejected`` (or dead-letters it), ingest
dead-letters it; either way it fails alone.

Light on purpose (no aiomqtt or paho): :mod:`pigateway.inbound` and
:mod:`pigateway.ingest` import it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, cast

from pigateway.text import bounded

#: Bytes of an undecodable packet kept (in its record) at most.
RAW_KEPT: Final = 4096
#: Characters of the decoder's complaint kept at most.
REASON_KEPT: Final = 300
#: The topic a plain copy carries when the original's cannot be used (MQTT 3.1.1 forbids
#: an empty one): U+FFFD, which matches no subscription of ours.
NO_TOPIC: Final = "\ufffd".encode()


class Undecodable(bytes):
    """The raw bytes (the first :data:`RAW_KEPT`) of an inbound PUBLISH the MQTT library
    could not decode, as the message's payload: a consumer that does not look at the type
    still sees no valid command in it (the bytes start with the topic's length)."""

    reason: str
    size: int
    payload: bytes | None

    def __new__(cls, raw: bytes, reason: str, payload: bytes | None) -> Undecodable:
        self = super().__new__(cls, raw[:RAW_KEPT])
        self.reason = bounded(reason, REASON_KEPT)
        #: the packet's whole size (after the fixed header)
        self.size = len(raw)
        #: the application payload, when the property length could be trusted
        self.payload = payload
        return self

    def describe(self) -> str:
        """Why, for a rejected result, a dead letter and the log."""
        return (f"the MQTT packet could not be decoded by the MQTT library ({self.reason}); "
                f"{self.size} bytes, the first {len(self)} kept")


class TooLarge(Undecodable):
    """An inbound PUBLISH over our Maximum Packet Size, read past and never held: its first
    bytes and its size, so its record says what came and its consumer refuses it as it
    refuses any other packet it cannot read (:func:`pigateway.mqtt.codes.packet_limit`)."""

    limit: int

    def __new__(cls, raw: bytes, size: int, limit: int) -> TooLarge:
        self = cast(TooLarge, super().__new__(
            cls, raw, f"over this connection's limit of {limit} bytes", None))
        #: the packet's whole size, fixed header included (what the limit counts)
        self.size = size
        self.limit = limit
        return self

    def describe(self) -> str:
        return (f"the MQTT packet is {self.size} bytes, over this connection's Maximum "
                f"Packet Size of {self.limit} bytes; it was read past, the first "
                f"{len(self)} bytes kept")


@dataclass(frozen=True)
class PublishHead:
    """What can be read of a PUBLISH without trusting its properties."""

    qos: int
    mid: int
    topic: bytes
    #: None when the property length runs past the packet
    payload: bytes | None

    def plain(self, v5: bool) -> bytes:
        """The packet body again with no properties (and the payload, if it was found): one
        the MQTT library decodes, so the message takes the library's own QoS flow."""
        topic = self.topic or NO_TOPIC
        body = struct.pack("!H", len(topic)) + topic
        if self.qos:
            body += struct.pack("!H", self.mid)
        if v5:
            body += b"\x00"
        return body + (self.payload or b"")


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """The Variable Byte Integer at ``at`` and the offset after it; None if it is cut off
    or longer than four bytes."""
    value = shift = 0
    for _ in range(4):
        if at >= len(data):
            return None
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
    return None


def publish_head(header: int, body: bytes, v5: bool) -> PublishHead | None:
    """The QoS, topic, packet id and (if it can be found) payload of a PUBLISH whose fixed
    header's first byte is ``header`` and whose remaining bytes are ``body``.

    None when even the packet id cannot be read (a QoS of 3, a topic length past the end):
    such a packet cannot be acknowledged, and breaks the link as the protocol says.
    """
    qos = (header >> 1) & 3
    if qos == 3 or len(body) < 2:
        return None
    (size,) = struct.unpack_from("!H", body)
    at = 2 + size
    if at + (2 if qos else 0) > len(body):
        return None
    topic = body[2:at]
    mid = 0
    if qos:
        (mid,) = struct.unpack_from("!H", body, at)
        at += 2
        if mid == 0:  # no packet id is 0: nothing can acknowledge it
            return None
    payload: bytes | None = body[at:]
    if v5:
        length = _varint(body, at)
        payload = None if length is None or length[1] + length[0] > len(body) \
            else body[length[1] + length[0]:]
    return PublishHead(qos, mid, topic, payload)


#: Packet types whose properties :func:`without_properties` can drop: CONNACK (its numbers
#: kept), PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT (the broker's own packets).
CONNACK, PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, DISCONNECT = 2, 4, 5, 7, 9, 11, 14
#: The size of each MQTT 5 property that is a number, by identifier (4: a Variable Byte
#: Integer); every other property is a string, a string pair or binary data.
NUMBERS: Final = {0x01: 1, 0x17: 1, 0x19: 1, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1,
                  0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x02: 4, 0x11: 4, 0x18: 4, 0x27: 4,
                  0x0B: -1}
#: Identifiers of the properties that hold two strings (User Property) rather than one.
PAIRS: Final = {0x26}


def numbers_only(block: bytes) -> bytes | None:
    """A property block (its length first) with only its numeric properties: the limits a
    CONNACK sets kept, the strings the MQTT library may refuse dropped. None when the
    block cannot be walked (a length that runs past it, an unknown identifier)."""
    head = _varint(block, 0)
    if head is None or head[1] + head[0] > len(block):
        return None
    at, end = head[1], head[1] + head[0]
    kept = b""
    while at < end:
        ident = _varint(block, at)
        if ident is None:
            return None
        start, at = at, ident[1]
        size = NUMBERS.get(ident[0])
        if size is not None:
            value = _varint(block, at) if size < 0 else (0, at + size)
            if value is None or value[1] > end:
                return None
            at = value[1]
            kept += block[start:at]
            continue
        for _ in range(2 if ident[0] in PAIRS else 1):  # a string or binary: skipped
            if at + 2 > end:
                return None
            at += 2 + int.from_bytes(block[at:at + 2], "big")
        if at > end:
            return None
    return _length(len(kept)) + kept


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def without_properties(kind: int, body: bytes) -> bytes | None:
    """An MQTT 5 acknowledgement, CONNACK or DISCONNECT ``body`` without the properties the
    MQTT library may refuse (a Reason String, a User Property...): the packet id and reason
    code(s) kept, and a CONNACK's numbers (Receive Maximum, Maximum Packet Size...). None
    when there is nothing to drop, or the codes cannot be found."""
    if kind == CONNACK:
        block = numbers_only(body[2:]) if len(body) > 2 else None
        return None if block is None else body[:2] + block
    if kind in (PUBACK, PUBREC, PUBCOMP):
        return body[:3] + b"\x00" if len(body) > 3 else None
    if kind == DISCONNECT:
        return body[:1] + b"\x00" if len(body) > 1 else None
    if kind in (SUBACK, UNSUBACK):
        length = _varint(body, 2)
        if length is None or length[0] == 0 or length[1] + length[0] > len(body):
            return None
        return body[:2] + b"\x00" + body[length[1] + length[0]:]
    return None
