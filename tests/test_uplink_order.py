"""Each device's commands arrive in the order they were put, whatever happens on the way.

The promise holds with ``max_inflight`` above 1 (8, the default), so several batches are on
the wire at once; what may happen to one of them is what these tests do to it: the broker
refuses it for now (0x97: the link ends, it goes again later), refuses it for good (0x99:
it is split and sent again as halves), the token bucket holds it longer than a smaller
one behind it, or the link drops under it. Each time a real subscriber records the first
deliveries and the device's commands must be among them in the order they were put.
Everything runs against a real mosquitto, the refusals through tests/harness/mqttproxy.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import GATEWAY
from harness.mqttproxy import RefusingProxy
from harness.netproxy import Proxy
from harness.uplink_helpers import RecordingState, drained, make_config, running_uplink, subscribed
from harness.wire_subscriber import WireSubscriber
from pigateway.mqtt import forwarded
from pigateway.store import NewCommand

pytestmark = pytest.mark.broker


def marked(device: str, n: int, pad: int) -> NewCommand:
    return NewCommand(device, "set", {"n": n, "mark": f"{device}-{n}", "pad": "p" * pad})


def first_order(sub_ids: list[str], put: list[str]) -> list[str]:
    """``put``'s ids as they first arrived."""
    wanted = set(put)
    return [i for i in sub_ids if i in wanted]


@pytest.mark.parametrize(("code", "how"), [(0x97, "for now"), (0x99, "for good, split"),
                                           (None, "the link drops")])
async def test_a_devices_order_holds_when_one_of_its_batches_in_flight_fails(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, code: int | None,
        how: str) -> None:
    """The first batch of ``lamp`` (two of its commands) is refused once (or its link cut)
    while later batches of ``lamp`` could be in flight behind it: ``lamp``'s commands still
    arrive first in the order they were put, and so do ``fan``'s."""
    refused: list[bytes] = []

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        if refused or not where.endswith("/actions") or b'"lamp-0"' not in payload:
            return None
        refused.append(payload)
        return code if code is not None else 0x89  # with disconnect: DISCONNECT 0x89

    proxy = await RefusingProxy(mosquitto.port, decide, disconnect=code is None).start()
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=1024,
                              max_inflight=8, batch_delay=0.2)
            async with running_uplink(cfg) as run:
                put = await run.store.put_many(
                    [marked(device, n, 300) for n in range(8) for device in ("lamp", "fan")])
                assert await sub.wait_for(len(put), 20)
                assert await drained(run.store, 10)
                stats = await run.store.stats()
    finally:
        await proxy.close()
    assert refused and len(json.loads(refused[0])["actions"]) >= 1
    assert stats.dead_total == 0
    arrived = [c.id for c in sub.first_deliveries()]
    for device in ("lamp", "fan"):
        mine = [c.id for c in put if c.device == device]
        assert first_order(arrived, mine) == mine, f"{device} out of order ({how})"


async def test_a_small_batch_does_not_overtake_a_large_one_at_the_token_bucket(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Under ``max_bytes_per_second`` a big batch (~1,900 bytes, alone in its batch) waits
    for its tokens; the device's next, smaller batch must not go out before it."""
    async with subscribed(mosquitto.port, unique_prefix) as sub:
        cfg = make_config(tmp_path, mosquitto.port, unique_prefix, max_batch_bytes=2048,
                          max_inflight=8, max_bytes_per_second=2000)
        async with running_uplink(cfg) as run:
            put = await run.store.put_many([marked("lamp", 0, 1700), marked("lamp", 1, 10),
                                            marked("lamp", 2, 10)])
            assert await sub.wait_for(len(put), 20)
            assert (await run.store.stats()).dead_total == 0
    assert len(sub.batches) == 2  # c0 alone, then c1 and c2
    assert [c.id for c in sub.first_deliveries()] == [c.id for c in put]


async def test_a_backlog_of_many_devices_travels_in_several_batches_side_by_side(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A device in one unacknowledged batch at a time must not leave the window idle: a
    backlog over many devices is spread so that batches of different devices are in flight
    together (PUBACKs held 0.1 s by a proxy), each device still in order."""
    proxy = await Proxy(mosquitto.port, delay=0.1).start()
    state = RecordingState()
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=32 * 1024,
                              max_inflight=8)  # one batch could hold a part of every device
            async with running_uplink(cfg, state=state) as run:
                put = await run.store.put_many(
                    [marked(f"dev{d}", n, 200) for n in range(20) for d in range(24)])
                assert await sub.wait_for(len(put), 30)
    finally:
        await proxy.close()
    assert max(state.history["in_flight"]) >= 3
    arrived = [c.id for c in sub.first_deliveries()]
    for device in {c.device for c in put}:
        mine = [c.id for c in put if c.device == device]
        assert first_order(arrived, mine) == mine


@dataclass
class Forwards(WireSubscriber):
    """The contract's subscriber, also keeping every forwarded message's local topic and
    payload, in the order they arrived."""

    forwards: list[tuple[str, str]] = field(default_factory=list)

    def take(self, topic: str, payload: bytes) -> None:
        if "/forward/" in topic:
            self.forwards.append((topic.split("/forward/", 1)[1], payload.decode()))
            self.arrived.set()
            return
        super().take(topic, payload)

    def first(self, topic: str) -> list[str]:
        """``topic``'s payloads as they first arrived (a message sent again dropped)."""
        first: list[str] = []
        for where, payload in self.forwards:
            if where == topic and payload not in first:
                first.append(payload)
        return first


def forward_row(prefix: str, topic: str, n: int, **params: object) -> NewCommand:
    """A row as ingest makes it of the ``n``th local message on ``topic`` (payload
    ``<topic's last level>-<n>``)."""
    packed = forwarded.pack(f"{prefix}/{GATEWAY}/forward/{topic}",
                            f"{topic.rsplit('/', 1)[-1]}-{n}".encode(), forwarded.Extras())
    return NewCommand(topic, "forward", {**packed, **params}, kind="forward")


@pytest.mark.parametrize("how", ["refused for now", "refused for good", "the link drops",
                                 "the MQTT library refuses it", "paced"])
async def test_a_topics_forwarded_messages_keep_their_order_with_several_in_flight(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, how: str) -> None:
    """Forwarded messages are PUBLISHes of their own: with ``max_inflight`` 8 and two local
    topics, several messages of one topic are in flight at once, and ``lamp-1`` fails on
    the way while later messages of ``z2m/lamp`` are already written behind it (or, paced,
    the token bucket holds messages mid-train). Whatever happens, each topic's first
    deliveries keep the order the messages were taken in, and every message is delivered
    or dead-lettered (none lost)."""
    refused: list[str] = []

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        if refused or payload != b"lamp-1" or how in ("the MQTT library refuses it", "paced"):
            return None
        refused.append(where)
        return {"refused for now": 0x97, "refused for good": 0x99}.get(how, 0x89)

    rows = [forward_row(unique_prefix, f"z2m/{device}", n) for n in range(40)
            for device in ("lamp", "fan")]
    if how == "the MQTT library refuses it":  # an expiry past MQTT's four bytes: paho
        rows[2] = forward_row(unique_prefix, "z2m/lamp", 1, x=2**33)  # cannot pack it
    proxy = await RefusingProxy(mosquitto.port, decide,
                                disconnect=how == "the link drops").start()
    try:
        async with subscribed(mosquitto.port, unique_prefix, kind=Forwards) as sub:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=8,
                              store={"max_attempts": 2, "default_ttl": 0},
                              max_messages_per_second=40 if how == "paced" else 0)
            async with running_uplink(cfg) as run:
                await run.store.put_many(rows)
                assert await drained(run.store, 20)
                dead = {d.command.params.get("p"): d for d in await run.store.list_dead(100)}
    finally:
        await proxy.close()
    assert proxy.max_unacked >= 3, "never more than one message of a topic in flight"
    assert refused or how in ("the MQTT library refuses it", "paced")
    for device in ("lamp", "fan"):
        arrived = sub.first(f"z2m/{device}")
        assert arrived == sorted(arrived, key=lambda p: int(p.rsplit("-", 1)[1])), \
            f"{device} out of order ({how}): {arrived}"
        assert set(arrived) | set(dead) >= {f"{device}-{n}" for n in range(40)}, how
    assert set(dead) <= {"lamp-1"}, dead
    if how in ("refused for good", "the MQTT library refuses it"):
        assert "lamp-1" in dead
    if how == "refused for now":  # the broker took lamp-2 behind it: sent again, it would
        assert dead["lamp-1"].reason == "rejected-by-broker"  # arrive after lamp-2
        assert "later" in (dead["lamp-1"].detail or "")
    if how in ("the link drops", "paced"):  # the broker took nothing behind the one it
        assert not dead  # dropped the link at: everything goes again, in order
