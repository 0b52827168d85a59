"""Inbound packets read in chunks and the plain PUBLISH read without paho: the same messages.

A connection reads the socket a chunk at a time and decodes a plain QoS 1/2 PUBLISH itself
(``pigateway.mqtt.stream``); anything else goes to paho as before. Each packet here is sent
by a scripted broker over a real socket to a real connection twice: once as the service
reads it, once with the plain reading turned off (paho decodes everything). The messages
must be the same, field by field; what is not plain must reach the consumer as paho makes it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest

from harness import mqttwire as w
from harness.hostile import HostileBroker
from pigateway.errors import UplinkError
from pigateway.mqtt import Message, Settings, connect
from pigateway.mqtt import client as mqtt
from pigateway.mqtt.stream import CUT_KEPT, Cut, PacketBuffer, ProtocolError, plain_publish

CASES: dict[str, bytes] = {
    "bare": w.publish("t/1", b'{"on": 1}', qos=1, mid=1),
    "retained, QoS 2": w.publish("t/2", b"x", qos=2, mid=2, retain=True),
    "device's properties": w.publish(
        "t/3", b"\xff\x00 binary", qos=1, mid=3,
        props=w.prop_int32(0x02, 3600) + w.content_type("application/json")
        + w.user_property("a", "1") + w.user_property("a", "2") + w.prop_byte(0x01, 1)
        + w.prop_string(0x08, "reply/here")),
    "empty payload": w.publish("t/4", b"", qos=1, mid=4),
    "unicode topic": w.publish("t/ü/☃", b"{}", qos=1, mid=5),
    # not plain: paho reads them, as before
    "topic alias": w.publish("t/6", b"{}", qos=1, mid=6, props=w.prop_int16(0x23, 1)),
    "U+FEFF in a user property": w.publish("t/7", b"{}", qos=1, mid=7,
                                           props=w.user_property("k", "\ufeffv")),
    "content type twice": w.publish("t/8", b"{}", qos=1, mid=8,
                                    props=w.content_type("a") + w.content_type("b")),
    "QoS 0": w.publish("t/9", b"{}", qos=0),
    "topic not UTF-8": w.publish(b"t/\xff", b"{}", qos=1, mid=10),
}


async def _received(packet: bytes, plain: bool, monkeypatch: pytest.MonkeyPatch) -> Message:
    with monkeypatch.context() as patch:
        if not plain:
            patch.setattr(mqtt, "plain_publish", lambda *_: None)
        async with HostileBroker() as broker:
            settings = Settings("127.0.0.1", broker.port, client_id="stream", protocol="5",
                                persistent=True, session_expiry=60)
            async with connect(settings, bound=5) as client:
                await broker.send(packet)
                return await asyncio.wait_for(anext(client.messages()), 5)


@pytest.mark.parametrize("name", list(CASES))
async def test_a_publish_comes_as_paho_would_make_it(name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ours = await _received(CASES[name], True, monkeypatch)
    pahos = await _received(CASES[name], False, monkeypatch)
    assert ours == pahos
    if name == "device's properties":
        assert ours.extras.user_properties == (("a", "1"), ("a", "2"))
        assert ours.extras.content_type == "application/json" and ours.extras.expiry == 3600


@pytest.mark.parametrize("name", ["topic alias", "U+FEFF in a user property",
                                  "content type twice", "QoS 0", "topic not UTF-8"])
def test_what_is_not_plain_is_left_to_paho(name: str) -> None:
    packet = CASES[name]
    buffer = PacketBuffer()
    buffer.feed(packet)
    found = buffer.next()
    assert found is not None
    assert plain_publish(*found, v5=True) is None


def test_packets_cut_at_every_byte_come_whole_and_in_order() -> None:
    stream = b"".join(CASES.values()) + w.ack(w.PUBACK, 9) + w.pingresp()
    buffer = PacketBuffer()
    got: list[tuple[int, bytes]] = []
    for byte in stream:
        buffer.feed(bytes([byte]))
        while (packet := buffer.next()) is not None:
            got.append(packet)
    assert not buffer.whole()
    assert b"".join(bytes([first]) + w.varint(len(body)) + body for first, body in got) == stream


@pytest.mark.parametrize("step", [1, 7, 4096, 70_000, 300_000])
def test_a_publish_over_the_limit_comes_cut_whatever_the_reads(step: int) -> None:
    """However the socket's reads split the stream, a PUBLISH over the limit comes out as
    its first CUT_KEPT bytes (a Cut, with its whole size), the packets around it whole, and
    the buffer never holds more than the limit and a read."""
    big = w.publish("t/big", bytes(200_000), qos=1, mid=5)
    stream = w.publish("t/a", b"1", qos=1, mid=4) + big + w.ack(w.PUBACK, 9)
    buffer = PacketBuffer(limit=100_000)
    got: list[tuple[int, bytes]] = []
    held = 0
    for at in range(0, len(stream), step):
        buffer.feed(stream[at:at + step])
        held = max(held, len(buffer._data))
        while (packet := buffer.next()) is not None:
            got.append(packet)
    assert [first >> 4 for first, _ in got] == [3, 3, 4]
    cut = got[1][1]
    assert isinstance(cut, Cut) and cut.size == len(big)
    assert bytes(cut) == big[4:4 + CUT_KEPT]
    assert got[2][1] == b"\x00\x09"
    assert held <= 100_000 + step


def test_any_other_packet_over_the_limit_breaks_the_link_at_its_header() -> None:
    buffer = PacketBuffer(limit=1000)
    buffer.feed(bytes([0x90]) + w.varint(5000))
    with pytest.raises(ProtocolError):
        buffer.next()


def test_a_remaining_length_over_four_bytes_breaks_the_link() -> None:
    buffer = PacketBuffer()
    buffer.feed(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    with pytest.raises(ProtocolError):
        buffer.next()


def test_joined_writes_keep_order_and_leave_qos0_and_disconnect_alone() -> None:
    def queued(command: int, data: bytes, qos: int = 1, pos: int = 0) -> dict[str, Any]:
        return {"command": command, "mid": 0, "qos": qos, "pos": pos,
                "to_process": len(data) - pos, "packet": data, "info": None}

    queue = deque([queued(0x40, b"AAAA", pos=2), queued(0x30, b"BB"), queued(0x30, b"q0", qos=0),
                   queued(0x40, b"CC"), queued(0xE0, b"DD"), queued(0x62, b"EE")])
    mqtt._join(queue)
    assert [(p["packet"], p["pos"], p["to_process"]) for p in queue] == [
        (b"AABB", 0, 4), (b"q0", 0, 2), (b"CC", 0, 2), (b"DD", 0, 2), (b"EE", 0, 2)]
    assert [p["command"] & 0xF0 for p in queue] == [0x40, 0x30, 0x40, 0xE0, 0x40]


async def _after_a_broken_packet(raw: bytes, plain: bool,
                                 monkeypatch: pytest.MonkeyPatch) -> tuple[bool, bool]:
    """(whether the publish waiting for its PUBACK failed, whether the socket was closed
    within 5 s) after the broker answered it with ``raw``."""
    with monkeypatch.context() as patch:
        if not plain:
            patch.setattr(mqtt, "plain_puback", lambda *_: None)
            patch.setattr(mqtt, "plain_publish", lambda *_: None)
        async with HostileBroker(decide=lambda _: None) as broker:
            settings = Settings("127.0.0.1", broker.port, client_id="broken", protocol="5")
            failed = False
            async with connect(settings, bound=5) as client:
                session = await broker.connected()
                sending = asyncio.ensure_future(client.deliver("t", b"x", timeout=5))
                assert await broker.wait_for(lambda: bool(broker.published))
                await broker.send(raw)
                try:
                    await sending
                except UplinkError:
                    failed = True
            closed = await broker.wait_for(lambda: session.closed, 5)
            return failed, closed


BROKEN: dict[str, bytes] = {
    "PUBACK of no byte": w.packet(w.PUBACK, b""),
    "PUBACK of one byte": w.packet(w.PUBACK, b"\x00"),
    # a read's budget of packets spent, then a length of five bytes waits in the buffer
    "length of five bytes after a budget of packets": w.pingresp() * mqtt.READ_BUDGET
    + bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
}


@pytest.mark.parametrize("name", list(BROKEN))
@pytest.mark.parametrize("plain", [True, False], ids=["ours", "paho's"])
async def test_a_broken_packet_ends_the_link_and_closes_its_socket(
        name: str, plain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packet paho's reader calls malformed ends the link as paho ends it: the publish
    waiting fails and the socket is closed (never a link marked lost whose socket stays
    open, read and pinged, for the broker to keep sending to)."""
    assert await _after_a_broken_packet(BROKEN[name], plain, monkeypatch) == (True, True)


def _raw_publish(first: int, body: bytes) -> bytes:
    return bytes([first]) + w.varint(len(body)) + body


#: Inbound packets at the edges of the plain reading, each compared with paho's outcome.
EDGES: dict[str, tuple[bytes, bool]] = {  # (packet, MQTT 5)
    "QoS 3": (_raw_publish(0x36, w.string("t") + b"\x00\x01\x00{}"), True),
    "DUP and retain": (w.publish("t", b"{}", qos=1, mid=3, dup=True, retain=True), True),
    "packet id 0": (_raw_publish(0x32, w.string("t") + b"\x00\x00\x00{}"), True),
    "topic past the body": (_raw_publish(0x32, b"\x00\x09t\x00\x01"), True),
    "properties past the body": (w.publish("t", b"", qos=1, mid=4, raw_props=b"\x05\x01"), True),
    "properties length over 4 bytes": (w.publish("t", b"{}", qos=1, mid=5,
                                                 raw_props=b"\xff\xff\xff\xff\x01"), True),
    "property cut short": (w.publish("t", b"", qos=1, mid=6, raw_props=b"\x03\x02\x00"), True),
    "empty payload, 3.1.1": (w.publish("t", b"", qos=1, mid=7, v5=False), False),
    "retained QoS 2, 3.1.1": (w.publish("t/2", b"x", qos=2, mid=8, v5=False, retain=True),
                              False),
    "non-minimal remaining length": (b"\x32\x88\x00" + w.string("t") + b"\x00\x09\x00{}", True),
}


async def _outcome(packet: bytes, v5: bool, plain: bool,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """What the consumer got for ``packet``: ("message", it) or ("ended", None)."""
    with monkeypatch.context() as patch:
        if not plain:
            patch.setattr(mqtt, "plain_publish", lambda *_: None)
        async with HostileBroker() as broker:
            settings = Settings("127.0.0.1", broker.port, client_id="edges",
                                protocol="5" if v5 else "3.1.1", persistent=True,
                                session_expiry=60)
            async with connect(settings, bound=5) as client:
                await broker.send(packet)
                try:
                    message = await asyncio.wait_for(anext(client.messages()), 3)
                except (UplinkError, TimeoutError) as exc:
                    return ("ended" if isinstance(exc, UplinkError) else "nothing", None)
                return ("message", message)


@pytest.mark.parametrize("name", list(EDGES))
async def test_an_edge_of_the_plain_reading_ends_as_pahos_reading_does(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    packet, v5 = EDGES[name]
    ours = await _outcome(packet, v5, True, monkeypatch)
    pahos = await _outcome(packet, v5, False, monkeypatch)
    assert ours == pahos


async def test_packets_left_in_the_buffer_at_a_pause_come_after_it_once_each() -> None:
    """A burst in one write, read in one chunk, with the read-ahead pausing after two: the
    rest wait in our buffer (no socket readiness will announce them) and come, once each
    and in order, as the consumer takes and acknowledges; the broker gets every PUBACK."""
    burst = b"".join(w.publish(f"t/{n}", b"%d" % n, qos=1, mid=n) for n in range(1, 41))
    async with HostileBroker() as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="burst", protocol="5",
                            persistent=True, session_expiry=60, read_ahead=2)
        async with connect(settings, bound=5) as client:
            await broker.send(burst)
            got: list[int] = []
            messages = client.messages()
            for _ in range(40):
                message = await asyncio.wait_for(anext(messages), 5)
                got.append(message.mid)
                client.ack(message)
                await asyncio.sleep(0)
            assert got == list(range(1, 41))
            assert await broker.wait_for(lambda: len(broker.from_client(w.PUBACK)) == 40)
            assert sorted(p.mid for p in broker.from_client(w.PUBACK)) == list(range(1, 41))
            assert client.waiting == 0


async def test_joined_writes_cut_by_a_full_send_buffer_arrive_whole_and_in_order() -> None:
    """Hundreds of publishes queued while the broker reads nothing: the joined writes stop
    part-way at a full send buffer and go on from there; the broker, reading at last, finds
    every PUBLISH whole, once, in order, and each publish gets its PUBACK."""
    count, size = 400, 20000  # 8 MB: past any loopback send buffer
    hold = asyncio.Event()
    seen: list[w.Packet] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await w.read_packet(reader)
        assert first is not None and first.kind == w.CONNECT
        writer.write(w.connack(props=w.receive_maximum(65535)))
        await writer.drain()
        await hold.wait()  # nothing read: the client's send buffer fills
        while len([p for p in seen if p.kind == w.PUBLISH]) < count:
            found = await w.read_packet(reader)
            if found is None:
                return
            seen.append(found)
            if found.kind == w.PUBLISH:
                writer.write(w.ack(w.PUBACK, w.parse_publish(found).mid or 0))
        await writer.drain()
        await asyncio.sleep(5)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = Settings("127.0.0.1", port, client_id="joined", protocol="5",
                            max_inflight=count)
        async with connect(settings, bound=5) as client:
            sends = [asyncio.ensure_future(client.deliver(f"t/{n}", bytes([n % 256]) * size,
                                                          timeout=20)) for n in range(count)]
            await asyncio.sleep(0.5)
            hold.set()
            assert await asyncio.wait_for(asyncio.gather(*sends), 20) == [None] * count
    finally:
        server.close()
    publishes = [w.parse_publish(p) for p in seen if p.kind == w.PUBLISH]
    assert [p.topic for p in publishes] == [f"t/{n}".encode() for n in range(count)]
    assert all(p.payload == bytes([n % 256]) * size for n, p in enumerate(publishes))


def _puback(body: bytes) -> bytes:
    return bytes([0x40]) + w.varint(len(body)) + body


#: PUBACK bodies after the packet id, at the edges of the plain reading.
PUBACKS: dict[str, bytes] = {
    "no code": b"",
    "success code": b"\x00",
    "no matching subscribers": b"\x10",
    "success, empty properties": b"\x00\x00",
    "success, properties length lies": b"\x00\x05",
    "success, a reason string": b"\x00" + w.properties(w.reason_string("fine")),
    "not authorized": b"\x87",
    "quota exceeded, empty properties": b"\x97\x00",
    "unknown code": b"\x42",
}


async def _delivered(tail: bytes, plain: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    """What ``deliver`` returned (the failure code or None), or the error's type."""
    with monkeypatch.context() as patch:
        if not plain:
            patch.setattr(mqtt, "plain_puback", lambda *_: None)
        async with HostileBroker(decide=lambda _: None) as broker:
            settings = Settings("127.0.0.1", broker.port, client_id="pubacks", protocol="5")
            async with connect(settings, bound=5) as client:
                sending = asyncio.ensure_future(client.deliver("t", b"x", timeout=3))
                assert await broker.wait_for(lambda: bool(broker.published))
                mid = broker.published[-1][1].mid or 0
                await broker.send(_puback(mid.to_bytes(2, "big") + tail))
                try:
                    return await sending
                except UplinkError as exc:
                    return type(exc).__name__


@pytest.mark.parametrize("name", list(PUBACKS))
async def test_a_puback_at_the_edges_means_what_pahos_reading_says(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await _delivered(PUBACKS[name], True, monkeypatch) == \
        await _delivered(PUBACKS[name], False, monkeypatch)
