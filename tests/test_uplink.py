"""The uplink against a real mosquitto: batches, order, flush, reconnects, back-pressure."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import tenacity
from aiomqtt import Client  # the tests play the cloud side

from harness.broker import Mosquitto
from harness.netproxy import Proxy
from harness.uplink_helpers import (
    RecordingState,
    drained,
    make_config,
    per_device_order_holds,
    running_uplink,
    subscribed,
    wait_until,
)
from pigateway.aio import wait_backoff
from pigateway.errors import StoreError, UplinkError
from pigateway.mqtt import local_publisher
from pigateway.state import Link
from pigateway.uplink import reconnect_policy
from pigateway.wire import topic

pytestmark = pytest.mark.broker


async def test_online_commands_arrive_batched_per_contract(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, batch_delay=0.3)
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        sent = []
        for n in range(30):
            command = await run.store.put(f"lamp{n % 3}", "set", {"level": n})
            sent.append((command.device, command.id))
        assert await sub.wait_for(30, 10)
        assert await wait_until(lambda: run.state.in_flight == 0, 5)
        assert (await run.store.stats()).depth == 0
    assert sub.errors == []
    assert sub.ids() == {command_id for _, command_id in sent}
    assert per_device_order_holds(sent, [c.id for c in sub.first_deliveries()])
    # 30 puts in well under the 0.3 s window: a few batches carrying several devices each
    assert len(sub.batches) < 30
    assert max(len(batch["actions"]) for batch in sub.batches) == 3
    assert any(isinstance(state, dict) and state["link"] == "online" for state in sub.states)


async def test_flush_sends_without_waiting_for_the_window(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, batch_delay=60.0)
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await run.store.put("door", "open")
        await run.store.put("door", "close")
        assert not await sub.wait_for(1, 0.5)  # the 60 s window holds them
        run.uplink.flush()
        assert await sub.wait_for(2, 5)
    names = [c.name for c in sub.first_deliveries()]
    assert names == ["open", "close"] and len(sub.batches) == 1


async def test_offline_commands_stay_on_disk_and_drain_in_order(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    mosquitto.stop()
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, max_actions=2,
                      max_batch_bytes=2048)
    async with running_uplink(cfg) as run:
        sent = []
        for n in range(60):
            command = await run.store.put(f"valve{n % 4}", "turn", {"n": n, "pad": "x" * 40})
            sent.append((command.device, command.id))
        await asyncio.sleep(0.3)
        assert run.state.link != Link.ONLINE and run.state.last_error
        stats = await run.store.stats()
        assert stats.depth == 60
        mosquitto.start()
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            run.uplink.flush()  # retry the link now instead of at the end of the backoff
            assert await sub.wait_for(60, 15)
            # a batch leaves the in-flight count at its PUBACK; its rows go at the delete
            assert await wait_until(lambda: run.state.in_flight == 0, 5)
            assert await drained(run.store, 5)
    assert sub.errors == []
    assert per_device_order_holds(sent, [c.id for c in sub.first_deliveries()])
    assert all(len(batch["actions"]) <= 2 for batch in sub.batches)


class RecordingSleep:
    """A tenacity sleep that records each wait and sleeps only a token amount."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0.01)


async def test_backoff_waits_grow_to_the_cap_and_reset_after_a_stable_link(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    mosquitto.stop()
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, backoff_initial=1.0,
                      backoff_max=30.0, backoff_reset=0.3)
    sleep = RecordingSleep()
    policy = reconnect_policy(cfg.uplink).copy(sleep=sleep)
    async with running_uplink(cfg, policy=policy) as run:
        assert await wait_until(lambda: len(sleep.waits) >= 7, 10)
        mosquitto.start()
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        grown = list(sleep.waits)
        await asyncio.sleep(0.5)  # longer than backoff_reset: the link counts as stable
        mosquitto.kill()
        assert await wait_until(lambda: len(sleep.waits) >= len(grown) + 2, 10)
        mosquitto.start()
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
    growing = grown[:5]
    assert all(b >= 1.5 * a for a, b in itertools.pairwise(growing)), grown
    assert all(0.8 <= w <= 30.0 for w in grown) and max(grown) >= 0.8 * 30.0  # capped
    after = sleep.waits[len(grown):]
    assert after[0] <= 1.0, after  # started over from backoff_initial
    assert after[1] >= 1.5 * after[0]


def test_wait_backoff_is_jittered_within_its_bounds() -> None:
    wait = wait_backoff(1.0, 10.0, jitter=0.2)
    state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
    for attempt, high in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)):
        state.attempt_number = attempt
        waits = {wait(state) for _ in range(50)}
        assert all(0.8 * high <= w <= high for w in waits)
        assert len(waits) > 1  # jittered, so a fleet does not come back in step


async def test_back_pressure_never_exceeds_max_inflight(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    proxy = await Proxy(mosquitto.port, delay=0.15).start()
    cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=3, max_actions=1,
                      batch_delay=0.0)
    state = RecordingState()
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub, \
                running_uplink(cfg, state=state) as run:
            for n in range(40):
                await run.store.put(f"dev{n % 20}", "ping", {"n": n})
            assert await sub.wait_for(40, 30)
            assert await wait_until(lambda: run.state.in_flight == 0, 5)
    finally:
        await proxy.close()
    seen = state.history["in_flight"]
    assert max(seen) == 3, seen  # the window filled up, and never went past it
    assert sub.errors == []


async def test_a_silent_link_is_noticed_and_nothing_is_deleted_without_puback(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    proxy = await Proxy(mosquitto.port).start()
    cfg = make_config(tmp_path, proxy.port, unique_prefix, publish_timeout=0.5)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            # the connect's own publishes (the state document) answered first: only the
            # batch can then go without its PUBACK, and it alone is charged for the silence
            assert await wait_until(lambda: bool(sub.states), 10)
            proxy.blackhole()
            await run.store.put("pump", "start")
            assert await wait_until(lambda: run.state.link != Link.ONLINE, 10)
            assert await wait_until(lambda: "PUBACK" in (run.state.last_error or ""), 10)
            stats = await run.store.stats()
            assert stats.depth == 1 and stats.in_flight == 0  # back at the head, not deleted
            queued = await run.store.list_queued()
            assert queued[0].attempts >= 1
            proxy.heal()
            assert await sub.wait_for(1, 15)
            assert await drained(run.store, 15)
    finally:
        await proxy.close()


async def test_pause_stops_draining_and_resume_drains(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        run.uplink.pause()
        await run.store.put("fan", "on")
        assert not await sub.wait_for(1, 0.5)
        assert (await run.store.stats()).depth == 1 and run.state.link == Link.ONLINE
        run.uplink.resume()
        assert await sub.wait_for(1, 5)


async def test_inbound_command_is_acknowledged_only_after_on_command(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    taken: list[bytes] = []
    fail_first = [True]

    async def on_command(payload: bytes) -> None:
        if fail_first[0]:
            fail_first[0] = False
            raise StoreError("disk full (simulated by the handler under test)")
        taken.append(payload)

    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    async with running_uplink(cfg, on_command=on_command) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        async with Client("127.0.0.1", mosquitto.port) as cloud:
            await cloud.publish(topic(cfg, "commands"), b'{"v":1,"id":"x1"}', qos=1)
        # the first take failed: unacknowledged, taken again (with backoff, the link stays up)
        assert await wait_until(lambda: taken == [b'{"v":1,"id":"x1"}'], 10)
        assert run.state.link == Link.ONLINE
    async with running_uplink(cfg, on_command=on_command) as run:  # acknowledged: not again
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        assert not await wait_until(lambda: len(taken) > 1, 1.0)


async def test_local_publisher_returns_after_puback_and_types_failures(
        mosquitto: Mosquitto, unique_prefix: str) -> None:
    async with Client("127.0.0.1", mosquitto.port) as listener:
        await listener.subscribe(f"{unique_prefix}/z2m/#", qos=1)
        async with local_publisher("127.0.0.1", mosquitto.port, client_id="handler") as pub:
            await pub.publish(f"{unique_prefix}/z2m/lamp/set", b'{"state":"ON"}')
        async with asyncio.timeout(5):
            message = await anext(aiter(listener.messages))
        assert message.payload == b'{"state":"ON"}'
    mosquitto.stop()
    with pytest.raises(UplinkError, match="local broker"):
        async with local_publisher("127.0.0.1", mosquitto.port, timeout=2):
            pass


async def test_results_travel_one_message_each_on_the_results_topic(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        for n, status in enumerate(("ok", "error", "rejected")):
            doc = {"v": 1, "id": f"cmd-{n}", "status": status, "finished_at": 1.0 + n}
            await run.store.put("lamp", "result", doc, kind="result")
        await run.store.put("lamp", "set", {"level": 1})
        assert await sub.wait_for(1, 10)
        assert await wait_until(lambda: len(sub.results) == 3, 10)
        assert await drained(run.store, 5)
    assert [r["id"] for r in sub.results] == ["cmd-0", "cmd-1", "cmd-2"]
    assert [r["status"] for r in sub.results] == ["ok", "error", "rejected"]
    assert sub.errors == []


async def test_the_retained_state_is_refreshed_while_online(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, state_interval=1.0)
    async with subscribed(mosquitto.port, unique_prefix) as sub:
        async with running_uplink(cfg):
            assert await wait_until(lambda: len(sub.states) >= 2, 10)
        assert await wait_until(lambda: sub.states[-1] == "offline", 5)
    documents = [s for s in sub.states if isinstance(s, dict)]
    assert {"v", "gateway", "version", "link", "depth", "dead_letters", "uptime"} <= set(
        documents[0])
    assert sub.states[-1] == "offline"  # said by the gateway itself on a clean stop


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_commands_sent_while_the_gateway_is_away_arrive_on_its_session(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, protocol: str) -> None:
    taken: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        taken.append(payload)

    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, mqtt={"protocol": protocol})
    async with running_uplink(cfg, on_command=on_command) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
    async with Client("127.0.0.1", mosquitto.port) as cloud:  # the gateway is away now
        await cloud.publish(topic(cfg, "commands"), b'{"v":1,"id":"while-away"}', qos=1)
    async with running_uplink(cfg, on_command=on_command) as run:
        assert await wait_until(lambda: taken == [b'{"v":1,"id":"while-away"}'], 10)


async def test_each_acknowledged_batch_is_logged_with_its_command_ids(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, batch_delay=0.2)
    caplog.set_level("INFO", logger="pigateway.uplink")
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        sent = [await run.store.put(f"pump{n % 2}", "set", {"n": n}) for n in range(4)]
        assert await sub.wait_for(4, 10)
        assert await wait_until(lambda: run.state.in_flight == 0, 5)
    records = [r for r in caplog.records if getattr(r, "batch_id", None)]
    logged = [command_id for r in records for command_id in getattr(r, "command_id", [])]
    assert sorted(logged) == sorted(c.id for c in sent)
    assert {r.batch_id for r in records} == {b["batch"] for b in sub.batches}
    assert all(set(getattr(r, "device", [])) <= {"pump0", "pump1"} for r in records)
