"""Crashes in the middle of a drain: the broker SIGKILLed, the service SIGKILLed; nothing lost.

What is checked each time, at a subscriber that holds a persistent session: every command
whose put returned arrives at least once; each device's commands arrive (first deliveries)
in the order they were put; the queue ends empty with no dead letters. The drain goes
through a slow proxy so that the kills land while batches are in flight. Rounds are
bounded in count and every wait in time.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.netproxy import Proxy
from harness.uplink_helpers import (
    drained,
    make_config,
    per_device_order_holds,
    running_uplink,
    start_service,
    subscribed,
    wait_until,
    write_service_config,
)
from harness.wire_subscriber import WireSubscriber
from pigateway.state import Link
from pigateway.store import NewCommand, Store

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = 12
ROUNDS = 4


def commands(count: int, start: int = 0) -> list[NewCommand]:
    return [NewCommand(device=f"dev{n % DEVICES:02d}", name="set",
                       params={"n": n, "pad": "p" * 80}) for n in range(start, start + count)]


def check_delivery(sub: WireSubscriber, sent: list[tuple[str, str]]) -> None:
    assert sub.errors == []
    missing = {command_id for _, command_id in sent} - sub.ids()
    assert not missing, f"{len(missing)} acknowledged commands never arrived"
    assert per_device_order_holds(sent, [c.id for c in sub.first_deliveries()])


async def restart_broker(broker: Mosquitto, proxy: Proxy, sub: WireSubscriber) -> None:
    """SIGKILL the broker; bring it back; let the gateway in only once the receiver is back."""
    proxy.refuse()
    connects = sub.connects
    broker.kill()
    await asyncio.sleep(0.2)
    broker.start()
    assert await wait_until(lambda: sub.connects > connects, 10)
    proxy.accept()


async def test_broker_killed_mid_drain_many_rounds(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    proxy = await Proxy(mosquitto.port, delay=0.03).start()
    cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=4096,
                      max_inflight=4, backoff_initial=0.05, backoff_max=0.2)
    total = 2400
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub, \
                running_uplink(cfg) as run:
            sent = [(c.device, c.id) for c in await run.store.put_many(commands(total // 2))]
            kills = 0
            for round_ in range(ROUNDS):
                target = (round_ + 1) * total // (ROUNDS + 2)
                assert await sub.wait_for(min(target, len(sent)), 30), f"round {round_} stalled"
                if round_ == 1:  # more commands while the drain goes on
                    more = await run.store.put_many(commands(total // 2, start=total // 2))
                    sent += [(c.device, c.id) for c in more]
                await restart_broker(mosquitto, proxy, sub)
                kills += 1
            assert await sub.wait_for(total, 60)
            assert await drained(run.store, 20)
            stats = await run.store.stats()
    finally:
        await proxy.close()
    assert kills == ROUNDS and len(sent) == total
    check_delivery(sub, sent)
    assert stats.dead_total == 0 and stats.in_flight == 0
    assert len(sub.commands) >= total  # duplicates are allowed (at least once), losses are not


async def test_service_killed_mid_drain_and_restarted(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    proxy = await Proxy(mosquitto.port, delay=0.03).start()
    config_path = write_service_config(tmp_path, proxy.port, unique_prefix)
    cfg = make_config(tmp_path, proxy.port, unique_prefix)
    total = 2000
    async with await Store.open(cfg.store, drainer=False) as producer:
        sent = [(c.device, c.id) for c in await producer.put_many(commands(total))]
    log = tmp_path / "service.log"
    service = start_service(config_path, log)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            for round_ in range(2):
                assert await sub.wait_for((round_ + 1) * total // 4, 30), log.read_text()[-3000:]
                os.kill(service.pid, signal.SIGKILL)
                service.wait(10)
                service = start_service(config_path, log)
            assert await sub.wait_for(total, 60), log.read_text()[-3000:]
            async with await Store.open(cfg.store, drainer=False) as watcher:
                assert await drained(watcher, 20), log.read_text()[-3000:]
            service.send_signal(signal.SIGTERM)
            assert service.wait(20) == 0, log.read_text()[-3000:]
    finally:
        if service.poll() is None:
            os.kill(service.pid, signal.SIGKILL)
            service.wait(10)
        await proxy.close()
    check_delivery(sub, sent)
    async with await Store.open(cfg.store, drainer=False) as store:
        stats = await store.stats()
    assert stats.depth == 0 and stats.dead_total == 0
    assert "were in flight when pigateway last stopped" in log.read_text()


async def test_offline_start_queues_and_reports_link_state(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """The link state a view reads follows the broker: offline, then online."""
    mosquitto.stop()
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    async with running_uplink(cfg) as run:
        await run.store.put("lamp", "on")
        assert await wait_until(lambda: run.state.last_error is not None, 5)
        assert run.state.link in (Link.OFFLINE, Link.CONNECTING)
        mosquitto.start()
        run.uplink.flush()
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        assert await drained(run.store, 10)


async def test_an_idle_link_that_goes_silent_is_noticed_by_keepalive(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """No publish to time out: only MQTT keepalive can tell (mqtt.keepalive = 5 s)."""
    proxy = await Proxy(mosquitto.port).start()
    cfg = make_config(tmp_path, proxy.port, unique_prefix)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            # the connect's state document answered first, or its PUBACK's wait would notice
            assert await wait_until(lambda: bool(sub.states), 10)
            proxy.blackhole()
            assert await wait_until(lambda: run.state.link != Link.ONLINE, 3 * 5 + 5)
            assert "PUBACK" not in (run.state.last_error or "")
            proxy.heal()
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 20)
    finally:
        await proxy.close()
