"""Our Maximum Packet Size: what one inbound packet may cost a gateway with 512 MB.

A compliant MQTT 5 broker (mosquitto) never sends us a packet over the Maximum Packet Size
our CONNECT carries: it drops that message for us. Under MQTT 3.1.1, or from a broker that
ignores it, our reader sees the packet's length in its fixed header and never holds its
body: a PUBLISH is read past a chunk at a time and handed on as that message's failure
(acknowledged once recorded, so a persistent session does not send it again at every
reconnect); any other packet that size ends the link. The limit comes from the config's
own payload bounds (:func:`pigateway.mqtt.codes.packet_limit`).
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from harness import mqttwire as w
from harness.broker import Mosquitto
from harness.hostile import HostileBroker
from pigateway.config import from_dict
from pigateway.errors import UplinkError
from pigateway.ingest import Ingest
from pigateway.mqtt import Settings, connect
from pigateway.mqtt.codes import MQTT_MAX_PACKET, packet_limit
from pigateway.mqtt.packets import TooLarge
from pigateway.mqtt.readahead import READ_AHEAD_BYTES
from pigateway.state import GatewayState
from pigateway.store import Store
from pigateway.uplink import Uplink

#: the limit these tests connect with
LIMIT = 64 * 1024
#: what the hostile broker claims, and then sends, as one PUBLISH's remaining length
HUGE = 32 * 1024 * 1024
#: bytes the hostile broker writes at a time (the loop between stays bounded)
PIECE = 1024 * 1024


def _publish_head(topic: str, mid: int, size: int, *, v5: bool) -> tuple[bytes, int]:
    """A QoS 1 PUBLISH's fixed and variable header whose remaining length says ``size``;
    its payload (``size`` minus the header) is sent after it, in pieces."""
    variable = w.string(topic) + mid.to_bytes(2, "big") + (b"\x00" if v5 else b"")
    return bytes([0x32]) + w.varint(size) + variable, len(variable)


async def _stream_zeros(broker: HostileBroker, count: int) -> None:
    sent = 0
    for _ in range(count // PIECE + 1):
        if sent >= count:
            break
        piece = min(PIECE, count - sent)
        await broker.send(bytes(piece))
        sent += piece


def _publisher(port: int) -> paho.Client:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="big-publisher",
                         protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


async def test_a_compliant_broker_drops_a_message_over_our_maximum_packet_size_for_us(
        mosquitto: Mosquitto) -> None:
    """mosquitto honours the Maximum Packet Size of our CONNECT: the 1 MB message never
    reaches us (nothing to read past, nothing held), the small one after it does."""
    settings = Settings("127.0.0.1", mosquitto.port, client_id="limited", protocol="5",
                        persistent=True, session_expiry=60, max_packet_size=LIMIT)
    async with connect(settings, bound=5) as client:
        assert await client.subscribe("big/#", qos=1)
        publisher = _publisher(mosquitto.port)
        try:
            publisher.publish("big/1", b"x" * (1024 * 1024), qos=1).wait_for_publish(5)
            publisher.publish("big/2", b"small", qos=1).wait_for_publish(5)
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        message = await asyncio.wait_for(anext(client.messages()), 5)
        assert (message.topic, message.payload) == ("big/2", b"small")
        client.ack(message)


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
async def test_a_publish_over_our_limit_is_read_past_unheld_and_fails_alone(v5: bool) -> None:
    """A broker that ignores our limit (or MQTT 3.1.1, which has none) sends a 32 MB
    PUBLISH: it comes as that message's failure (its size and why), never held whole (the
    Python heap's peak stays a few chunks), is acknowledged when taken, and the link goes on
    to the next message."""
    async with HostileBroker() as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="big", persistent=True,
                            protocol="5" if v5 else "3.1.1", session_expiry=60,
                            max_packet_size=LIMIT)
        async with connect(settings, bound=5) as client:
            await client.subscribe("t/#", qos=1)
            head, variable = _publish_head("t/huge", 1, HUGE, v5=v5)
            tracemalloc.start()
            try:
                await broker.send(head)
                await _stream_zeros(broker, HUGE - variable)
                await broker.send(w.publish("t/next", b"{}", qos=1, mid=2, v5=v5))
                got = [await asyncio.wait_for(anext(client.messages()), 10) for _ in range(2)]
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 4 * 1024 * 1024, f"{peak} bytes held for one packet"
            assert got[0].topic == "t/huge"
            too_large = got[0].undecodable
            assert isinstance(too_large, TooLarge)
            assert too_large.size == HUGE + 1 + len(w.varint(HUGE))
            assert str(LIMIT) in too_large.describe()
            assert got[1].payload == b"{}" and got[1].undecodable is None
            for message in got:
                client.ack(message)
            assert await broker.wait_for(lambda: len(broker.from_client(w.PUBACK)) == 2, 5)
            assert not client.lost


async def test_any_other_packet_over_our_limit_ends_the_link_unread() -> None:
    """A SUBACK that says it is 200 MB is no broker's: the link ends at its header (a
    protocol error, the connection closed), before any of its body is read."""
    async with HostileBroker() as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="odd", protocol="5",
                            max_packet_size=LIMIT)
        async with connect(settings, bound=5) as client:
            await broker.send(bytes([0x90]) + w.varint(200 * 1024 * 1024) + b"\x00\x01")
            with pytest.raises(UplinkError):
                await asyncio.wait_for(anext(client.messages()), 5)
            assert client.lost
        assert await broker.wait_for(lambda: broker.session.closed, 5)


async def test_the_limits_come_from_the_configs_payload_bounds(tmp_path: Path) -> None:
    """Twice the largest payload a connection takes, plus room for the longest topic and
    its properties; never past MQTT's own largest packet. Ingest's bound is what the store
    takes of a message, the uplink's what inbound takes of a command."""
    assert packet_limit(64 * 1024) == 2 * 64 * 1024 + 128 * 1024
    assert packet_limit(10**9) == MQTT_MAX_PACKET
    config = from_dict({"gateway_id": "gw", "store": {"path": str(tmp_path / "q.db"),
                                                      "max_params_bytes": 1000,
                                                      "min_free_bytes": 0},
                        "inbound": {"max_payload_bytes": 2000}, "local": {"port": 1884},
                        "ingest": [{"topic": "a/#"}]})
    async with await Store.open(config.store) as store:
        state = GatewayState()
        assert Ingest(config, store, state)._settings().max_packet_size == packet_limit(1000)
        uplink = Uplink(config, store, state, on_command=lambda *_: None)  # type: ignore[arg-type,return-value]
        assert uplink._settings().max_packet_size == packet_limit(2000)


async def test_many_packets_under_the_limit_are_held_within_a_byte_bound() -> None:
    """The same bound for many packets: ingest reads up to ``2 x local.window`` (512)
    messages ahead of its commits, each up to the packet limit; at 200 KB each that was
    100 MB held. Reading pauses at READ_AHEAD_BYTES of payloads held, and every message
    still comes, in order, once taken."""
    size, count = 200_000, 120
    async with HostileBroker() as broker:
        settings = Settings("127.0.0.1", broker.port, client_id="many", persistent=True,
                            protocol="5", session_expiry=60, read_ahead=512)
        async with connect(settings, bound=5) as client:
            await client.subscribe("t/#", qos=1)
            sender = asyncio.create_task(_deliver_many(broker, size, count))
            await asyncio.sleep(1.0)  # nobody takes: the read-ahead fills as far as it may
            held = client.waiting
            assert held * size <= READ_AHEAD_BYTES + size, f"{held} messages held"
            got = []
            while len(got) < count:
                message = await asyncio.wait_for(anext(client.messages()), 10)
                client.ack(message)
                got.append(int(message.topic.rsplit("/", 1)[1]))
            await sender
            assert got == list(range(count))


async def _deliver_many(broker: HostileBroker, size: int, count: int) -> None:
    for n in range(count):
        await broker.send(w.publish(f"t/{n}", bytes(size), qos=1, mid=n + 1))
