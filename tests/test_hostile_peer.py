"""The hostile MQTT peer of the harness (tests/harness/hostile.py, mqttwire.py) does what it
says: its packets are what paho writes where paho can write them, its CONNACK limits reach
the client, its PUBACK codes are the client's, its limits are enforced, its QoS 2 flow runs,
and what it puts through a real mosquitto arrives byte for byte."""

from __future__ import annotations

import asyncio

import pytest
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.properties import Properties

from harness import mqttwire as w
from harness.broker import Mosquitto
from harness.hostile import HostileBroker, RawClient
from pigateway.errors import PacketTooLarge
from pigateway.mqtt import Settings, connect


def _decoded(data: bytes) -> paho_packet.PublishPacket:
    """paho's own decoder over one of our PUBLISH packets."""
    _, at = w.read_varint(data, 1)
    return paho_packet.decode_publish(data[0], data[at:], MQTTProtocolVersion.MQTTv5)


def test_a_publish_is_what_paho_decodes() -> None:
    data = w.publish("a/b", b"{}", qos=1, mid=7, retain=True,
                     props=w.content_type("text/plain") + w.user_property("k", "v"))
    got = _decoded(data)
    assert (got.topic, got.mid, got.qos, got.retain, got.payload) == (b"a/b", 7, 1, True, b"{}")
    assert isinstance(got.properties, Properties)
    assert got.properties.ContentType == "text/plain"
    assert got.properties.UserProperty == [("k", "v")]


@pytest.mark.parametrize("value", ["\ufeff", "a\x00b", b"\xff\xfe", "\ud800"],
                         ids=["U+FEFF", "NUL", "not-UTF-8", "surrogate"])
def test_the_strings_paho_refuses_can_be_written(value: str | bytes) -> None:
    data = w.publish("t", b"x", qos=1, mid=1, props=w.user_property("k", value))
    with pytest.raises((MalformedPacket, UnicodeDecodeError)):
        _decoded(data)
    parsed = w.parse_publish(w.Packet(data[0] >> 4, data[0] & 15, data[2:]))
    assert parsed.payload == b"x" and parsed.mid == 1


def test_varints_round_trip_at_their_bounds() -> None:
    for value in (0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455):
        assert w.read_varint(w.varint(value), 0) == (value, len(w.varint(value)))
    with pytest.raises(ValueError):
        w.varint(268_435_456)


async def test_the_connack_limits_reach_the_client_and_puback_codes_come_back() -> None:
    async with HostileBroker(receive_maximum=1, maximum_packet_size=256,
                             decide=lambda p: 0x97 if p.payload == b"refuse" else 0) as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="c1", protocol="5")
        async with connect(settings, bound=5) as client:
            assert client.limits.receive_maximum == 1
            assert client.max_packet_size == 256
            assert await client.deliver("t", b"take", timeout=5) is None
            assert await client.deliver("t", b"refuse", timeout=5) == 0x97
        assert [p.payload for _, p in broker.published] == [b"take", b"refuse"]
        assert broker.max_unacked == 1 and broker.largest < 256


async def test_a_strict_broker_disconnects_a_publish_over_its_packet_size() -> None:
    """The harness enforces what it advertised (DISCONNECT 0x95), for a client that does not
    check: a raw one. Ours checks first and never sends such a PUBLISH."""
    async with HostileBroker(maximum_packet_size=64) as broker:
        async with RawClient(broker.port, "c2") as raw:
            assert await raw.publish("t", b"x" * 100, timeout=5) is None
        assert broker.enforced == [0x95]


async def test_our_client_refuses_a_publish_over_the_brokers_packet_size_unsent() -> None:
    async with HostileBroker(maximum_packet_size=64) as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="c2b", protocol="5")
        async with connect(settings, bound=5) as client:
            with pytest.raises(PacketTooLarge, match="64 bytes"):
                await client.publish_now("t", b"x" * 100, 1, False, timeout=5)
            assert await client.deliver("t", b"small", timeout=5) is None
        assert broker.enforced == []
        assert [p.payload for _, p in broker.published] == [b"small"]


async def test_a_qos2_delivery_runs_to_pubcomp_and_can_be_cut() -> None:
    async with HostileBroker() as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="c3", protocol="5")
        async with connect(settings, bound=5) as client:
            await client.subscribe("t/#", qos=2)
            mid = broker.new_mid()
            last = await broker.deliver(w.publish("t/1", b"two", qos=2, mid=mid), mid, 2)
            assert last is not None and last.kind == w.PUBCOMP
            got = await asyncio.wait_for(anext(client.messages()), 5)
            assert got.payload == b"two" and got.qos == 2
            mid = broker.new_mid()
            cut = await broker.deliver(w.publish("t/2", b"cut", qos=2, mid=mid), mid, 2,
                                       cut="pubrec")
            assert cut is not None and cut.kind == w.PUBREC
            assert await broker.wait_for(lambda: client.lost, 5)


async def test_mosquitto_passes_u_feff_in_a_user_property(mosquitto: Mosquitto) -> None:
    """The broker lets through what paho refuses: the reason the reader must not trust paho."""
    props = w.user_property("note", "\ufeffhello") + w.content_type("\ufefftext")
    async with RawClient(mosquitto.port, "raw-sub") as sub:
        await sub.send(w.subscribe(1, ("odd/#", 1)))
        answer = await sub.read(5)
        assert answer is not None and answer.kind == w.SUBACK
        async with RawClient(mosquitto.port, "raw-pub") as pub:
            assert await pub.publish("odd/1", b"{}", props=props) == 0
        got = await sub.read(5)
    assert got is not None and got.kind == w.PUBLISH
    publish = w.parse_publish(got)
    assert props in publish.props and publish.payload == b"{}"

