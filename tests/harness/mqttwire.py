"""MQTT packets byte by byte, for the hostile peer and raw publishers (no paho in here).

Written by hand on purpose: paho refuses to *write* much of what a broker lets through
(a string that is not UTF-8, a NUL, U+FEFF in a property...), and the tests need a second
opinion on the wire that does not share paho's decoder. Strings are ``str`` (encoded as
UTF-8) or ``bytes`` (sent exactly as given, valid or not). MQTT 5 unless ``v5=False``.

Only what the tests need: CONNECT/CONNACK, PUBLISH and its acknowledgements, SUBSCRIBE/
SUBACK, UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP, DISCONNECT, and a reader of whole packets.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    8, 9, 10, 11, 12, 13, 14)
NAMES = {CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
         PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
         SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
         PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT"}

#: MQTT 5 property identifiers the tests use.
PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC = 0x01, 0x02, 0x03, 0x08
SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_QOS = 0x11, 0x21, 0x24
TOPIC_ALIAS_MAXIMUM, REASON_STRING, USER_PROPERTY, MAXIMUM_PACKET_SIZE = 0x22, 0x1F, 0x26, 0x27
#: The longest string (or topic) MQTT can carry: a two-byte length.
MAX_STRING = 65535

Text = str | bytes


# --------------------------------------------------------------------------- primitives


def varint(value: int) -> bytes:
    """A Variable Byte Integer (1-4 bytes)."""
    if not 0 <= value <= 268_435_455:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The Variable Byte Integer at ``at``: its value and the offset after it."""
    value = shift = 0
    for _ in range(4):
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
    raise ValueError("a variable byte integer longer than 4 bytes")


def string(text: Text) -> bytes:
    """A length-prefixed string: ``str`` as UTF-8 (surrogates passed through), ``bytes`` as is."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if len(raw) > MAX_STRING:
        raise ValueError(f"a string of {len(raw)} bytes does not fit MQTT's two-byte length")
    return struct.pack("!H", len(raw)) + raw


# --------------------------------------------------------------------------- properties


def prop_byte(ident: int, value: int) -> bytes:
    return varint(ident) + bytes([value])


def prop_int16(ident: int, value: int) -> bytes:
    return varint(ident) + struct.pack("!H", value)


def prop_int32(ident: int, value: int) -> bytes:
    return varint(ident) + struct.pack("!I", value)


def prop_string(ident: int, value: Text) -> bytes:
    return varint(ident) + string(value)


def user_property(key: Text, value: Text) -> bytes:
    return varint(USER_PROPERTY) + string(key) + string(value)


def content_type(value: Text) -> bytes:
    return prop_string(CONTENT_TYPE, value)


def reason_string(value: Text) -> bytes:
    return prop_string(REASON_STRING, value)


def receive_maximum(value: int) -> bytes:
    return prop_int16(RECEIVE_MAXIMUM, value)


def maximum_packet_size(value: int) -> bytes:
    return prop_int32(MAXIMUM_PACKET_SIZE, value)


def properties(*items: bytes) -> bytes:
    """A property block: its length, then the properties as given (in that order)."""
    body = b"".join(items)
    return varint(len(body)) + body


# --------------------------------------------------------------------------- packets


def packet(kind: int, body: bytes, flags: int = 0) -> bytes:
    """A whole packet: fixed header (type, flags, remaining length) and ``body``."""
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def connect(client_id: Text, *, v5: bool = True, clean: bool = True, keepalive: int = 60,
            props: bytes = b"") -> bytes:
    """A CONNECT without will, user name or password."""
    body = string("MQTT") + bytes([5 if v5 else 4, 0x02 if clean else 0x00])
    body += struct.pack("!H", keepalive)
    if v5:
        body += properties(props)
    return packet(CONNECT, body + string(client_id))


def connack(code: int = 0, *, session_present: bool = False, v5: bool = True,
            props: bytes = b"") -> bytes:
    body = bytes([1 if session_present else 0, code])
    return packet(CONNACK, body + (properties(props) if v5 else b""))


def publish(topic: Text, payload: bytes, *, qos: int = 0, mid: int | None = None,
            v5: bool = True, props: bytes = b"", retain: bool = False, dup: bool = False,
            raw_props: bytes | None = None) -> bytes:
    """A PUBLISH. ``raw_props`` replaces the whole property block (length included), so a
    test can send one whose length lies."""
    body = string(topic)
    if qos:
        if mid is None:
            raise ValueError("a QoS 1/2 PUBLISH needs a packet id")
        body += struct.pack("!H", mid)
    if v5:
        body += properties(props) if raw_props is None else raw_props
    flags = (0x08 if dup else 0) | qos << 1 | (1 if retain else 0)
    return packet(PUBLISH, body + payload, flags)


def ack(kind: int, mid: int, code: int = 0, *, v5: bool = True, props: bytes = b"") -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP; the short form when there is nothing but the id."""
    body = struct.pack("!H", mid)
    if v5 and (code or props):
        body += bytes([code]) + (properties(props) if props else b"")
    return packet(kind, body, 0x02 if kind == PUBREL else 0)


def subscribe(mid: int, *topics: tuple[Text, int], v5: bool = True) -> bytes:
    body = struct.pack("!H", mid) + (properties() if v5 else b"")
    for topic, options in topics:
        body += string(topic) + bytes([options])
    return packet(SUBSCRIBE, body, 0x02)


def suback(mid: int, codes: list[int], *, v5: bool = True, props: bytes = b"") -> bytes:
    body = struct.pack("!H", mid) + (properties(props) if v5 else b"")
    return packet(SUBACK, body + bytes(codes))


def unsuback(mid: int, count: int, *, v5: bool = True) -> bytes:
    body = struct.pack("!H", mid) + (properties() + bytes(count) if v5 else b"")
    return packet(UNSUBACK, body)


def pingresp() -> bytes:
    return packet(PINGRESP, b"")


def pingreq() -> bytes:
    return packet(PINGREQ, b"")


def disconnect(code: int = 0, *, v5: bool = True, props: bytes = b"") -> bytes:
    if not v5:
        return packet(DISCONNECT, b"")
    return packet(DISCONNECT, bytes([code]) + properties(props))


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Packet:
    """One packet as read: its type, the fixed header's flags, the bytes after the length."""

    kind: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, f"type {self.kind}")

    @property
    def size(self) -> int:
        """The packet's whole size on the wire (what Maximum Packet Size limits)."""
        return 1 + len(varint(len(self.body))) + len(self.body)

    @property
    def mid(self) -> int:
        """The packet id of an acknowledgement, SUBSCRIBE, UNSUBSCRIBE (first two bytes)."""
        return int(struct.unpack_from("!H", self.body)[0])

    def ack_code(self) -> int:
        """The reason code of PUBACK/PUBREC/PUBREL/PUBCOMP (0 when it is left out)."""
        return self.body[2] if len(self.body) > 2 else 0


@dataclass(frozen=True)
class Publish:
    """A PUBLISH taken apart (properties left as their raw bytes)."""

    topic: bytes
    qos: int
    mid: int | None
    props: bytes
    payload: bytes
    retain: bool
    dup: bool


def parse_publish(found: Packet, *, v5: bool = True) -> Publish:
    body = found.body
    (size,) = struct.unpack_from("!H", body)
    topic = body[2:2 + size]
    at = 2 + size
    qos = (found.flags >> 1) & 3
    mid = None
    if qos:
        (mid,) = struct.unpack_from("!H", body, at)
        at += 2
    props = b""
    if v5:
        length, start = read_varint(body, at)
        props, at = body[start:start + length], start + length
    return Publish(topic, qos, mid, props, body[at:], bool(found.flags & 1),
                   bool(found.flags & 8))


def parse_connect(found: Packet) -> tuple[int, bytes, bool]:
    """(protocol level, client id, clean start) of a CONNECT."""
    body = found.body
    (name_len,) = struct.unpack_from("!H", body)
    at = 2 + name_len
    level, flags = body[at], body[at + 1]
    at += 4  # level, flags, keepalive
    if level == 5:
        length, at = read_varint(body, at)
        at += length
    (id_len,) = struct.unpack_from("!H", body, at)
    return level, body[at + 2:at + 2 + id_len], bool(flags & 0x02)


def parse_subscribe(found: Packet, *, v5: bool = True) -> tuple[int, list[tuple[bytes, int]]]:
    """(packet id, [(filter, options)]) of a SUBSCRIBE or UNSUBSCRIBE (options 0)."""
    body = found.body
    (mid,) = struct.unpack_from("!H", body)
    at = 2
    if v5:
        length, at = read_varint(body, at)
        at += length
    filters = []
    while at < len(body):
        (size,) = struct.unpack_from("!H", body, at)
        topic = body[at + 2:at + 2 + size]
        at += 2 + size
        options = 0
        if found.kind == SUBSCRIBE:
            options = body[at]
            at += 1
        filters.append((topic, options))
    return mid, filters


async def read_packet(reader: asyncio.StreamReader) -> Packet | None:
    """The next whole packet, or None at the end of the stream (or a reset)."""
    try:
        head = await reader.readexactly(1)
        length = shift = 0
        for _ in range(4):
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Packet(head[0] >> 4, head[0] & 0x0F, body)
