"""Both inbound links under the harness's hostile broker, through the real reader: whatever a
PUBLISH's properties hold (U+FEFF, NUL, a surrogate, bytes that are not UTF-8, 64 KB, a
property length that lies), on a topic up to MQTT's length limit, at QoS 1 or 2, each
message is acknowledged, recorded once it is, and the link stays up. QoS 2 deliveries cut at
every step lose nothing and wedge nothing.

The oracle for "paho refuses it" is paho's own decoder; the packets are the harness's.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet
from paho.mqtt.enums import MQTTProtocolVersion

from harness import gateway
from harness import mqttwire as w
from harness.hostile import Cut, HostileBroker
from harness.uplink_helpers import running_uplink
from harness.waits import until, wait_until
from pigateway.config import Config, from_dict
from pigateway.inbound import Inbound
from pigateway.ingest import Ingest
from pigateway.mqtt import Settings, connect
from pigateway.state import GatewayState, Link
from pigateway.store import Store
from pigateway.wire import topic

#: 64 KB of text: named in a recipe, built when the packet is (so a failure prints a name)
BIG = "<64 KB>"
ODD: list[str | bytes] = ["\ufeff", "\ufeffhello", "a\x00b", "\ud800", b"\xff\xfe",
                          b"\xc3", "é", "", BIG]
odd_text = st.one_of(st.sampled_from(ODD), st.text(max_size=12), st.binary(max_size=12))
#: one property as a recipe: ("user", key, value), ("type", value) or ("expiry", seconds)
one_property = st.one_of(
    st.tuples(st.just("user"), odd_text, odd_text),
    st.tuples(st.just("type"), odd_text),
    st.tuples(st.just("expiry"), st.integers(1, 2**32 - 1)),
)
#: a property block as a recipe: honest ("props", [...]) or a length that lies ("lie", junk)
property_block = st.one_of(
    st.tuples(st.just("props"), st.lists(one_property, max_size=3)),
    st.tuples(st.just("lie"), st.binary(max_size=4)),
)
#: what must be tried whatever hypothesis draws: each string paho refuses, 64 KB, a lie
NAMED: list[Any] = [("props", [("user", "k", "\ufeff")]), ("props", [("type", "\ufeff")]),
                    ("props", [("user", "a\x00b", "v")]), ("props", [("type", b"\xff")]),
                    ("props", [("user", "big", BIG)]), ("lie", b"ab")]
FAST = {"backoff_initial": 0.05, "backoff_max": 0.3, "batch_delay": 0.05}


def _text(value: str | bytes) -> str | bytes:
    return "x" * w.MAX_STRING if value == BIG else value


def _property(recipe: tuple[Any, ...]) -> bytes:
    if recipe[0] == "user":
        return w.user_property(_text(recipe[1]), _text(recipe[2]))
    if recipe[0] == "type":
        return w.content_type(_text(recipe[1]))
    return w.prop_int32(w.MESSAGE_EXPIRY, recipe[1])


def block(recipe: tuple[Any, ...]) -> bytes:
    """The property block (length included) a recipe names."""
    if recipe[0] == "lie":
        return w.varint(5000) + recipe[1]
    return w.properties(*(_property(item) for item in recipe[1]))


EXAMPLES = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def paho_refuses(packet: bytes) -> bool:
    _, at = w.read_varint(packet, 1)
    try:
        paho_packet.decode_publish(packet[0], packet[at:], MQTTProtocolVersion.MQTTv5)
    except Exception:
        return True
    return False


# --------------------------------------------------------------------------- ingest


def ingest_config(folder: Path, port: int, qos: int = 2) -> Config:
    data = gateway.settings(folder, gateway_id="gw-test", port=1, prefix="pg",
                            gpio={"enabled": False}, uplink=FAST,
                            local={"host": "127.0.0.1", "port": port, "keepalive": 5})
    data["ingest"] = [{"topic": "dev/#", "qos": qos}]
    return from_dict(data)


class IngestRun:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.state = GatewayState()
        self.ingest = Ingest(cfg, store, self.state)
        self.task = asyncio.create_task(self.ingest.run())

    async def stop(self) -> None:
        await self.ingest.stop(1.0)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _ingest_scenario(messages: list[tuple[int, Any, int]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with HostileBroker() as broker:
            cfg = ingest_config(Path(folder), broker.port)
            async with await Store.open(cfg.store) as store:
                run = IngestRun(cfg, store)
                try:
                    assert await broker.subscribed(10)
                    refused = 0
                    for n, (length, props, qos) in enumerate(messages):
                        mid = broker.new_mid()
                        where = "dev/" + "t" * (length - 4)
                        data = w.publish(where, json.dumps({"n": n}).encode(), qos=qos,
                                         mid=mid, raw_props=block(props))
                        refused += paho_refuses(data)
                        last = await broker.deliver(data, mid, qos, timeout=10)
                        assert last is not None, f"message {n} was never acknowledged"
                        assert last.kind == (w.PUBACK if qos == 1 else w.PUBCOMP)
                        assert last.ack_code() == 0
                    assert len(broker.sessions) == 1, "a message ended the link"
                    assert run.ingest.taken == len(messages)
                    dead = await store.list_dead()
                    assert sum(d.command.name == "undecodable" for d in dead) == refused
                    assert len(dead) + (await store.stats()).depth == len(messages)
                finally:
                    await run.stop()


#: a local topic by its length in bytes ("dev/ttt..."), up to MQTT's limit
topic_length = st.one_of(st.integers(5, 40), st.just(w.MAX_STRING))


@EXAMPLES
@example([(w.MAX_STRING, NAMED[0], 2),
          *((5, props, 1 + n % 2) for n, props in enumerate(NAMED))])
@given(st.lists(st.tuples(topic_length, property_block, st.sampled_from([1, 2])),
                min_size=1, max_size=4))
def test_ingest_takes_every_message_whatever_its_properties(
        messages: list[tuple[int, Any, int]]) -> None:
    asyncio.run(_ingest_scenario(messages))


# --------------------------------------------------------------------------- uplink


def uplink_config(folder: Path, port: int) -> Config:
    return gateway.config(folder, gateway_id="gw-test", port=port, prefix="pg",
                          mqtt={"keepalive": 5}, uplink=FAST, gpio={"enabled": False},
                          devices={"lamp": {"handler": "log"}})


async def _uplink_scenario(messages: list[tuple[Any, int]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        async with HostileBroker() as broker:
            cfg = uplink_config(Path(folder), broker.port)
            inbound: list[Inbound] = []

            async def on_command(payload: bytes) -> None:
                await inbound[0].accept(payload)

            async with running_uplink(cfg, on_command=on_command) as run:
                inbound.append(Inbound(cfg, run.store))
                assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
                assert await broker.subscribed(10)
                where = topic(cfg, "commands")
                refused: dict[str, bool] = {}
                for n, (props, qos) in enumerate(messages):
                    mid = broker.new_mid()
                    payload = json.dumps({"v": 1, "id": f"c-{n}", "device": "lamp",
                                          "name": "on", "params": {}}).encode()
                    data = w.publish(where, payload, qos=qos, mid=mid, raw_props=block(props))
                    refused[f"c-{n}"] = paho_refuses(data)
                    last = await broker.deliver(data, mid, qos, timeout=10)
                    assert last is not None, f"command {n} was never acknowledged"
                    assert last.ack_code() == 0
                assert len(broker.sessions) == 1, "a message ended the link"
                for command_id, undecodable in refused.items():
                    entry = await run.store.inbox.find(command_id)
                    found = await run.store.list_dead()
                    if entry is None:  # no id could be found: a dead letter
                        assert undecodable and found, f"{command_id} was not recorded"
                        continue
                    rejected = entry.status == "rejected" and "decode" in str(entry.result)
                    assert rejected == undecodable, (command_id, entry)


@EXAMPLES
@example([(props, 1 + n % 2) for n, props in enumerate(NAMED)])
@given(st.lists(st.tuples(property_block, st.sampled_from([1, 2])), min_size=1, max_size=4))
def test_the_uplink_takes_every_command_whatever_its_properties(
        messages: list[tuple[Any, int]]) -> None:
    asyncio.run(_uplink_scenario(messages))


# --------------------------------------------------------------------------- QoS 2 cuts


@pytest.mark.parametrize("undecodable", [False, True], ids=["plain", "undecodable"])
@pytest.mark.parametrize("cut", ["publish", "pubrec", "pubrel"])
async def test_a_qos2_delivery_cut_at_any_step_is_recorded_and_completes(
        tmp_path: Path, cut: Cut, undecodable: bool) -> None:
    """The broker resends what MQTT says it resends after a cut (the PUBLISH before a
    PUBREC, else the PUBREL): the message is recorded (at least once), and its flow ends
    with a PUBCOMP; nothing waits for ever."""
    async with HostileBroker() as broker:
        cfg = ingest_config(tmp_path, broker.port)
        async with await Store.open(cfg.store) as store:
            run = IngestRun(cfg, store)
            try:
                assert await broker.subscribed(10)
                props = w.user_property("k", "\ufeff" if undecodable else "v")
                mid = broker.new_mid()
                data = w.publish("dev/q2", b'{"q":2}', qos=2, mid=mid, props=props)
                await broker.deliver(data, mid, 2, cut=cut, timeout=5)
                await broker.connected(2)
                assert await wait_until(lambda: run.state.local == Link.ONLINE, 10)
                recorded = run.ingest.taken
                if cut == "publish" or not broker.from_client(w.PUBREC, mid):
                    again = w.publish("dev/q2", b'{"q":2}', qos=2, mid=mid, props=props,
                                      dup=True)
                    last = await broker.deliver(again, mid, 2, timeout=10)
                else:
                    await broker.send(w.ack(w.PUBREL, mid))
                    assert await broker.wait_for(
                        lambda: bool(broker.from_client(w.PUBCOMP, mid, 2)), 10), \
                        "the PUBREL sent again after the cut was never completed"
                    last = broker.from_client(w.PUBCOMP, mid, 2)[-1]
                assert last is not None and last.kind == w.PUBCOMP
                assert await until(_at_least_one(store), 10), \
                    f"the message was lost (taken before the cut: {recorded})"
            finally:
                await run.stop()


def _at_least_one(store: Store) -> Any:
    async def check() -> bool:
        stats = await store.stats()
        return stats.depth + len(await store.list_dead()) >= 1
    return check


# --------------------------------------------------------------------------- the broker's own


@pytest.mark.parametrize("code", [0x00, 0x10, 0x97, 0x87])
@pytest.mark.parametrize("reason", ["\ufeff", "a\x00b", b"\xff"], ids=["U+FEFF", "NUL", "bytes"])
async def test_a_puback_paho_cannot_decode_still_answers_its_publish(
        code: int, reason: str | bytes) -> None:
    """A PUBACK whose Reason String paho refuses answers its publish with its code all the
    same (the drain's delete or refusal); the link stays up."""
    async with HostileBroker(decide=lambda p: None) as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="odd-puback", protocol="5")
        async with connect(settings_, bound=5) as client:
            sending = asyncio.create_task(client.deliver("t", b"x", timeout=5))
            assert await broker.wait_for(lambda: bool(broker.published), 5)
            mid = broker.published[-1][1].mid
            assert mid is not None
            await broker.send(w.ack(w.PUBACK, mid, code, props=w.reason_string(reason)))
            assert await sending == (None if code < 0x80 else code)
            assert not client.lost
        assert len(broker.sessions) == 1


@pytest.mark.parametrize("reason", ["\ufeff busy", "a\x00b", b"\xff"],
                         ids=["U+FEFF", "NUL", "bytes"])
async def test_a_disconnect_paho_cannot_decode_keeps_its_reason_code(reason: str | bytes) -> None:
    """A server DISCONNECT whose Reason String paho refuses still says "slow down" (0x89):
    the uplink's backoff keeps growing, as for a plain one."""
    async with HostileBroker() as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="odd-disconnect", protocol="5")
        async with connect(settings_, bound=5) as client:
            await broker.disconnect(0x89, reason=reason)
            assert await broker.wait_for(lambda: client.lost, 5)
            assert client.slow_down == "DISCONNECT reason code 0x89 (server busy)"


async def test_a_suback_paho_cannot_decode_still_confirms_the_subscription() -> None:
    async with HostileBroker() as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="odd-suback", protocol="5")
        async with connect(settings_, bound=5) as client:
            original = broker._answer

            async def odd_suback(session: Any, found: w.Packet) -> bool:
                if found.kind != w.SUBSCRIBE:
                    return await original(session, found)
                mid, _ = w.parse_subscribe(found)
                await session.send(w.suback(mid, [1], props=w.reason_string("\ufeff")))
                return True
            broker._answer = odd_suback  # type: ignore[method-assign]
            async with asyncio.timeout(5):
                await client.subscribe("t/#", qos=1)
            assert not client.lost


@pytest.mark.parametrize("odd", [w.reason_string("\ufeff"), w.user_property("a\x00b", "v"),
                                 w.prop_string(0x12, b"\xff")],
                         ids=["reason-U+FEFF", "user-NUL", "assigned-id-bytes"])
async def test_a_connack_paho_cannot_decode_still_connects_with_its_limits(odd: bytes) -> None:
    """A CONNACK with a string property paho refuses connects all the same, and the limits
    it sets (Receive Maximum 1, Maximum Packet Size 256) hold: only the strings are lost."""
    async with HostileBroker(receive_maximum=1, maximum_packet_size=256,
                             connack_props=odd) as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="odd-connack", protocol="5")
        async with connect(settings_, bound=5) as client:
            assert client.limits.receive_maximum == 1
            assert client.max_packet_size == 256
            assert await client.deliver("t", b"x", timeout=5) is None


async def test_an_exception_while_a_message_is_handed_over_fails_that_message_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only a decode: any exception while a message is handed over (here both of our
    own readings of it, the plain one and the one after paho's decoder, made to fail for
    one topic) is that message's failure: it comes as undecodable, is acknowledged when
    taken, and the next one comes as it is."""
    from pigateway.mqtt import client as mqtt  # noqa: PLC0415

    real, real_plain = mqtt._extras, mqtt.plain_publish

    def failing(message: Any) -> Any:
        if message.topic == "t/bad":
            raise RuntimeError("a bug while reading the properties")
        return real(message)

    def failing_plain(first: int, body: bytes, v5: bool) -> Any:
        if b"t/bad" in body[:8]:
            raise RuntimeError("a bug while reading the packet")
        return real_plain(first, body, v5)
    monkeypatch.setattr(mqtt, "_extras", failing)
    monkeypatch.setattr(mqtt, "plain_publish", failing_plain)
    async with HostileBroker() as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="bug", protocol="5",
                             persistent=True, session_expiry=60)
        async with connect(settings_, bound=5) as client:
            await client.subscribe("t/#", qos=1)
            for n, where in enumerate(("t/bad", "t/good"), start=1):
                await broker.send(w.publish(where, b"{}", qos=1, mid=n))
            got = [await asyncio.wait_for(anext(client.messages()), 5) for _ in range(2)]
            assert [m.topic for m in got] == ["t/bad", "t/good"]
            bad = got[0].undecodable
            assert bad is not None and "a bug while reading" in bad.reason
            assert got[1].undecodable is None and got[1].payload == b"{}"
            for message in got:
                client.ack(message)
            assert await broker.wait_for(lambda: len(broker.from_client(w.PUBACK)) == 2, 5)
            assert not client.lost


async def test_under_mqtt_311_a_publish_paho_refuses_fails_alone() -> None:
    """MQTT 3.1.1 has no properties; what paho refuses there is an empty topic. It comes as
    undecodable (its topic U+FFFD, matching no subscription of ours), the link stays."""
    async with HostileBroker() as broker:
        settings_ = Settings("127.0.0.1", broker.port, client_id="v3", protocol="3.1.1",
                             persistent=True)
        async with connect(settings_, bound=5) as client:
            await client.subscribe("t/#", qos=1)
            await broker.send(w.publish("", b"{}", qos=1, mid=1, v5=False))
            await broker.send(w.publish("t/1", b"{}", qos=1, mid=2, v5=False))
            got = [await asyncio.wait_for(anext(client.messages()), 5) for _ in range(2)]
            assert got[0].undecodable is not None and got[0].topic == "\ufffd"
            assert got[1].undecodable is None and got[1].topic == "t/1"
            for message in got:
                client.ack(message)
            assert await broker.wait_for(lambda: len(broker.from_client(w.PUBACK)) == 2, 5)
            assert not client.lost
