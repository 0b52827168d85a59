"""One packet, one failure: a message the broker cannot take fails alone.

Every outgoing PUBLISH is measured whole (topic, payload, properties) against the broker's
Maximum Packet Size and MQTT's own limits before it is written; one over them is
dead-lettered ``too-large`` naming the limit, and the link, the rest of the queue and the
service go on. A publish that fails in any other way fails its own batch (an attempt, then
a dead letter), never the link or the service. And when a link drops (a broker that
cannot say its limit, MQTT 3.1.1, just closes it), only what can have caused the drop is
charged an attempt, not every batch in flight behind it. Real mosquitto throughout, its
``max_packet_size`` option setting the limit it states (MQTT 5) and enforces (both).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import GATEWAY
from harness.mqttproxy import RefusingProxy
from harness.uplink_helpers import drained, make_config, running_uplink, subscribed, wait_until
from harness.wire_subscriber import WireSubscriber
from pigateway.mqtt import forwarded
from pigateway.store import NewCommand

pytestmark = pytest.mark.broker

LIMIT = 4096


class ForwardSubscriber(WireSubscriber):
    """The contract's subscriber, also keeping the topic of every forwarded message."""

    forwards: list[str]

    def take(self, topic: str, payload: bytes) -> None:
        if "/forward/" in topic:
            self.forwards = [*getattr(self, "forwards", []), topic.split("/forward/", 1)[1]]
            self.arrived.set()
            return
        super().take(topic, payload)

    def forwarded(self) -> list[str]:
        return list(getattr(self, "forwards", []))


def forward(prefix: str, topic: str, payload: bytes) -> NewCommand:
    """A row as ingest makes it of a local message on ``topic`` (``prefix``: the contract's)."""
    return NewCommand(topic[:128], "forward", forwarded.pack(
        f"{prefix}/{GATEWAY}/forward/{topic}", payload, forwarded.Extras()), kind="forward")


def rows(prefix: str) -> list[NewCommand]:
    """Small commands and forwards before and after one forward of 6,000 bytes."""
    small = [NewCommand(f"dev{n}", "set", {"n": n}) for n in range(6)]
    before = [forward(prefix, f"sensor/{n}", b"x" * 100) for n in range(4)]
    after = [forward(prefix, f"sensor/{n + 4}", b"y" * 100) for n in range(4)]
    return [*small[:3], *before, forward(prefix, "camera/1", b"z" * 6000), *after, *small[3:]]


@pytest.fixture
def limited(tmp_path: Path) -> Mosquitto:
    broker = Mosquitto(tmp_path / "limited", extra=[f"max_packet_size {LIMIT}"])
    broker.start()
    try:
        yield broker  # type: ignore[misc]
    finally:
        broker.kill()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_forward_over_the_brokers_packet_size_fails_alone(
        tmp_path: Path, limited: Mosquitto, unique_prefix: str, protocol: str) -> None:
    """MQTT 5: the broker states its limit, so the big forward is never sent: ``too-large``
    naming the limit, one link, nothing charged. MQTT 3.1.1: the broker drops the link at it;
    it alone is charged each time and ends ``max-attempts``; the small forwards and the
    commands in flight behind it are delivered, none dead."""
    proxy = await RefusingProxy(limited.port, lambda *_: None).start()
    try:
        async with subscribed(limited.port, unique_prefix, kind=ForwardSubscriber) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=8,
                              mqtt={"protocol": protocol}, store={"max_attempts": 3})
            async with running_uplink(cfg) as run:
                put = await run.store.put_many(rows(unique_prefix))
                assert await drained(run.store, 30)
                dead = await run.store.list_dead(100)
                big = next(c.id for c in put if c.device == "camera/1")
                small = [c.id for c in put if c.kind == "action"]
                assert await sub.wait_for(len(small), 10)
                assert await wait_until(lambda: len(set(sub.forwarded())) == 8, 10)
                assert not run.task.done()
    finally:
        await proxy.close()
    assert [d.command.id for d in dead] == [big]
    if protocol == "5":
        assert dead[0].reason == "too-large"
        assert str(LIMIT) in (dead[0].detail or "")
        assert proxy.connections == 1
    else:
        assert dead[0].reason == "max-attempts"
    assert "camera/1" not in sub.forwarded()


async def test_a_topic_over_mqtts_limit_is_dead_lettered_and_the_drain_goes_on(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A local topic near 65,535 bytes makes an uplink topic over MQTT's limit (a gateway
    that raised ``store.max_params_bytes`` to forward images takes it): ``too-large``
    naming the limit; the command behind it is delivered and the uplink keeps running."""
    async with subscribed(mosquitto.port, unique_prefix) as sub:
        cfg = make_config(tmp_path, mosquitto.port, unique_prefix,
                          store={"max_params_bytes": 1024 * 1024})
        async with running_uplink(cfg) as run:
            long = await run.store.put_many([forward(unique_prefix, "t" * 65_530, b"hello")])
            after = await run.store.put("lamp", "on")
            assert await sub.wait_for(1, 10)
            assert await drained(run.store, 10)
            dead = await run.store.list_dead(10)
            await asyncio.sleep(0.2)
            assert not run.task.done()
    assert after.id in sub.ids()
    assert [(d.command.id, d.reason) for d in dead] == [(long[0].id, "too-large")]
    assert "65535" in (dead[0].detail or "").replace(",", "")


async def test_a_publish_that_fails_otherwise_fails_its_batch_alone(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A row whose publish the MQTT library refuses (a forward on a topic with a wildcard,
    written by hand): an attempt each time, ``max-attempts`` at the end, on one link;
    every other command is delivered and the uplink keeps running."""
    proxy = await RefusingProxy(mosquitto.port, lambda *_: None).start()
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=8,
                              store={"max_attempts": 3})
            async with running_uplink(cfg) as run:
                before = await run.store.put_many([NewCommand(f"d{n}", "on") for n in range(3)])
                bad = await run.store.put_many([NewCommand(
                    "odd", "forward", forwarded.pack("a/#", b"x", forwarded.Extras()),
                    kind="forward")])
                after = await run.store.put_many([NewCommand(f"d{n}", "off") for n in range(3)])
                assert await sub.wait_for(6, 10)
                assert await drained(run.store, 10)
                dead = await run.store.list_dead(10)
                assert not run.task.done()
    finally:
        await proxy.close()
    assert {c.id for c in before + after} <= sub.ids()
    assert [(d.command.id, d.reason) for d in dead] == [(bad[0].id, "max-attempts")]
    assert dead[0].command.attempts == 3
    assert proxy.connections == 1


async def test_a_state_document_over_the_limit_is_left_out_and_the_link_stays(
        tmp_path: Path, unique_prefix: str) -> None:
    """A broker whose Maximum Packet Size is smaller than the state document: the state is
    not sent (a warning), the link stays up and commands are delivered on it."""
    broker = Mosquitto(tmp_path / "tiny", extra=["max_packet_size 400"])
    broker.start()
    proxy = await RefusingProxy(broker.port, lambda *_: None).start()
    try:
        async with subscribed(broker.port, unique_prefix) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix)
            async with running_uplink(cfg) as run:
                put = await run.store.put_many([NewCommand(f"d{n}", "on") for n in range(3)])
                assert await sub.wait_for(len(put), 10)
                assert await drained(run.store, 10)
                assert not run.task.done()
    finally:
        await proxy.close()
        broker.kill()
    assert proxy.connections == 1
    assert all(state == "offline" for state in sub.states)  # only the clean stop's


@pytest.mark.parametrize("over", [0, 1])
async def test_the_whole_packet_is_measured_to_the_byte(
        tmp_path: Path, limited: Mosquitto, unique_prefix: str, over: int) -> None:
    """A forward whose PUBLISH is exactly the broker's Maximum Packet Size goes (mosquitto
    takes it on the same link); one byte more is ``too-large``. The size is counted here by
    hand from MQTT 5 (fixed header, topic, packet id, properties with the ``pigateway-id``
    user property, payload), independently of the code under test."""
    topic = f"{unique_prefix}/{GATEWAY}/forward/edge/{over}"
    properties = 1 + 1 + (2 + len(forwarded.ID_PROPERTY)) + (2 + 26)  # length, id 38, pair
    remaining = LIMIT - 1 - 2  # fixed header byte and a two-byte remaining length
    payload = b"e" * (remaining - 2 - len(topic.encode()) - 2 - properties + over)
    proxy = await RefusingProxy(limited.port, lambda *_: None).start()
    try:
        async with subscribed(limited.port, unique_prefix, kind=ForwardSubscriber) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix)
            async with running_uplink(cfg) as run:
                put = await run.store.put_many([forward(unique_prefix, f"edge/{over}", payload)])
                assert await drained(run.store, 10)
                dead = await run.store.list_dead(10)
                if not over:
                    assert await wait_until(lambda: sub.forwarded() == [f"edge/{over}"], 10)
    finally:
        await proxy.close()
    assert proxy.connections == 1
    if over:
        assert [(d.command.id, d.reason) for d in dead] == [(put[0].id, "too-large")]
        assert f"{LIMIT + 1:,} bytes" in (dead[0].detail or "")
    else:
        assert dead == []
