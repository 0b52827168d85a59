"""An MQTT-aware TCP proxy on 127.0.0.1 that answers chosen PUBLISHes with a chosen PUBACK code.

mosquitto never answers a PUBLISH with 0x97 (quota exceeded), 0x89 (server busy) and most
other MQTT 5 refusals, so this proxy plays the broker for the publishes ``decide`` picks:
such a PUBLISH is not forwarded (a refusing broker does not deliver it) and the client
gets a PUBACK with ``decide``'s reason code at once. Everything else goes both ways
unchanged, whole packets at a time, so an injected PUBACK never splits another packet.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.netproxy import LoopbackRelay

#: ``decide(connection number from 1, topic, payload)``: a reason code to refuse with, or None.
Decide = Callable[[int, str, bytes], int | None]

PUBLISH = 3
CONNECT = 1
PUBACK = 4


@dataclass(frozen=True)
class Refused:
    connection: int
    code: int
    topic: str
    payload: bytes


async def read_packet(reader: asyncio.StreamReader) -> bytes | None:
    """One whole MQTT packet (fixed header included), or None at the end of the stream."""
    try:
        head = await reader.readexactly(1)
        length, shift, raw = 0, 0, b""
        for _ in range(4):  # the remaining length is at most four bytes
            byte = await reader.readexactly(1)
            raw += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        return head + raw + await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A variable byte integer at ``at``: its value and the offset after it."""
    value, shift = 0, 0
    for _ in range(4):
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, at


def connect_version(packet: bytes) -> int:
    """The protocol level a CONNECT asks for (4: MQTT 3.1.1, 5: MQTT 5)."""
    _, at = _varint(packet, 1)
    return packet[at + 6]  # after the protocol name "MQTT" (2 + 4 bytes)


def parse_publish(packet: bytes, version: int) -> tuple[str, int | None, bytes]:
    """The topic, packet id (None for QoS 0) and payload of a PUBLISH packet."""
    qos = (packet[0] >> 1) & 3
    _, at = _varint(packet, 1)
    (size,) = struct.unpack_from("!H", packet, at)
    topic = packet[at + 2:at + 2 + size].decode()
    at += 2 + size
    packet_id = None
    if qos:
        (packet_id,) = struct.unpack_from("!H", packet, at)
        at += 2
    if version == 5:
        props, at = _varint(packet, at)
        at += props
    return topic, packet_id, packet[at:]


def disconnect(code: int) -> bytes:
    """An MQTT 5 DISCONNECT from the server with a reason code and no properties."""
    return struct.pack("!BBBB", 0xE0, 2, code, 0)


def puback(packet_id: int, code: int) -> bytes:
    """An MQTT 5 PUBACK with a reason code and no properties (remaining length 3)."""
    return struct.pack("!BBHB", 0x40, 3, packet_id, code)


class RefusingProxy(LoopbackRelay):
    """Forwards 127.0.0.1:``port`` to ``target_port``; refuses what ``decide`` picks."""

    def __init__(self, target_port: int, decide: Decide, *, disconnect: bool = False) -> None:
        """``disconnect``: answer a refused PUBLISH with a DISCONNECT carrying the code (a
        cloud broker's 0x96 message rate too high, 0x89 server busy) and close, instead of
        a PUBACK with it."""
        super().__init__(target_port)
        self.decide = decide
        self.disconnect = disconnect
        #: monotonic time each connection came in
        self.connected_at: list[float] = []
        self.refused: list[Refused] = []
        #: QoS 1 publishes forwarded to the broker and not yet acknowledged, per connection
        self.unacked: dict[int, set[int]] = {}
        #: the most of them there ever were at once (the client's Receive Maximum at work)
        self.max_unacked = 0
        #: (monotonic time, topic) of every PUBLISH forwarded to the broker
        self.published: list[tuple[float, str]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connected_at.append(time.monotonic())
        number = self.connections
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._relay([writer, up_writer], [self._upstream(number, reader, up_writer, writer),
                                          self._pump(number, up_reader, writer)])

    async def _upstream(self, number: int, reader: asyncio.StreamReader,
                        broker: asyncio.StreamWriter, client: asyncio.StreamWriter) -> None:
        """Client to broker, one packet at a time; a refused PUBLISH is answered here."""
        version = 4
        try:
            for _ in range(10_000_000):  # bounded: far more packets than any test sends
                packet = await read_packet(reader)
                if packet is None:
                    break
                kind = packet[0] >> 4
                if kind == CONNECT:
                    version = connect_version(packet)
                elif kind == PUBLISH:
                    topic, packet_id, payload = parse_publish(packet, version)
                    code = self.decide(number, topic, payload) if packet_id else None
                    if code is not None and packet_id is not None:
                        self.refused.append(Refused(number, code, topic, payload))
                        if self.disconnect:
                            client.write(disconnect(code))
                            await client.drain()
                            break
                        client.write(puback(packet_id, code))
                        await client.drain()
                        continue
                    self.published.append((time.monotonic(), topic))
                    if packet_id is not None:
                        self._sent(number, packet_id)
                broker.write(packet)
                await broker.drain()
        except OSError:
            pass
        finally:
            broker.close()
            client.close()

    def _sent(self, number: int, packet_id: int) -> None:
        waiting = self.unacked.setdefault(number, set())
        waiting.add(packet_id)
        self.max_unacked = max(self.max_unacked, len(waiting))

    async def _pump(self, number: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Broker to client, whole packets only (so an injected PUBACK lands between them)."""
        try:
            for _ in range(10_000_000):
                packet = await read_packet(reader)
                if packet is None:
                    break
                if packet[0] >> 4 == PUBACK:
                    _, at = _varint(packet, 1)
                    (packet_id,) = struct.unpack_from("!H", packet, at)
                    self.unacked.get(number, set()).discard(packet_id)
                writer.write(packet)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
