"""One gateway clock for every process that opens the queue file, on real SQLite files.

The drainer's heartbeat may move the clock (it counts a downtime once NTP answers); every
other opener of the file (a long-lived ``Producer``, a ``Store`` that is not the drainer)
must put on the clock the file holds then, not the one it read at its open. And a boot id
that changes while ``CLOCK_BOOTTIME`` runs on is the same boot seen through another
``/proc`` (a container whose init sandboxes it), never a reboot.
"""

from __future__ import annotations

import logging
import time

import pytest

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store
from pigateway.store.producer import Producer
from test_clock import Machine, simulate

DAY = 24 * 3600.0


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A simulated gateway (tests/test_clock.py's), its wall clock time.time's too."""
    sim = simulate(monkeypatch)
    monkeypatch.setattr(time, "time", lambda: sim.wall)
    return sim


async def boot_after_an_outage(config: StoreConfig, machine: Machine, down: float) -> None:
    """The service ran synchronised, then the Pi was off ``down`` seconds and boots at the
    time fake-hwclock saved: the downtime counts once NTP answers (the clock jumps)."""
    async with await Store.open(config):
        machine.wait(60)
    machine.reboot(down=down, wall_at_boot=machine.wall, synced=False)


async def ntp_answers(store: Store, machine: Machine, down: float) -> None:
    machine.wall += down
    machine.synced = True
    await store.heartbeat()  # the drainer counts the downtime: the gateway clock jumps


# --------------------------------------------------------------------------- a long-lived producer


async def test_a_producer_open_across_a_counted_downtime_puts_with_its_whole_ttl(
        store_config: StoreConfig, machine: Machine) -> None:
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    async with await Store.open(store_config) as drainer:
        with Producer.open(store_config) as producer:
            await ntp_answers(drainer, machine, 2 * DAY)
            put = producer.put("lamp", "on", ttl=600)
            machine.wait(60)
            assert [c.id for c in await drainer.claim(10)] == [put.id]
            assert await drainer.list_dead() == []


async def test_a_producer_key_claimed_after_a_counted_downtime_holds_its_window(
        store_config: StoreConfig, machine: Machine) -> None:
    """A retried ``send --id`` a minute later must find the key fresh, not two days old."""
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    async with await Store.open(store_config) as drainer:
        with Producer.open(store_config) as producer:
            await ntp_answers(drainer, machine, 2 * DAY)
            first, first_id = producer.put_keyed("k-1", NewCommand("lamp", "on", {}))
            assert first is not None
        machine.wait(60)
        with Producer.open(store_config) as again:
            assert again.put_keyed("k-1", NewCommand("lamp", "on", {})) == (None, first_id)
        assert [c.id for c in await drainer.claim(10)] == [first_id]


async def test_a_store_that_is_not_the_drainer_puts_on_the_clock_the_file_holds(
        store_config: StoreConfig, machine: Machine) -> None:
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    async with await Store.open(store_config) as drainer, \
            await Store.open(store_config, drainer=False) as other:
        await ntp_answers(drainer, machine, 2 * DAY)
        put = await other.put("lamp", "on", ttl=600)
        watched = await other.put("lamp", "off", ttl=600, watch=True)
        machine.wait(60)
        assert sorted(c.id for c in await drainer.claim(10)) == sorted([put.id, watched.id])


# --------------------------------------------------------------------------- boot ids in containers


async def test_a_boot_id_seen_through_another_proc_is_not_a_new_boot(
        store_config: StoreConfig, machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    """systemd-nspawn: the unit's fresh procfs and a shell read different boot ids of one
    running kernel. Each took the other's for a new boot and the gateway clock leapt by
    the host's uptime at every send (a ttl of 4000 s ran out in 144 s)."""
    machine.since_boot = 5 * DAY  # the host has been up for days
    async with await Store.open(store_config) as drainer:
        start = drainer.clock.now()
        for n in range(3):
            machine.boot = "the-shell's"  # pigateway send, in the container's shell
            with Producer.open(store_config) as producer:
                put = producer.put("lamp", f"on-{n}", ttl=4000)
                assert producer.clock.now() == pytest.approx(drainer.clock.now())
            machine.boot = "the-unit's"
            machine.wait(30)
            await drainer.heartbeat()
        assert drainer.clock.now() - start == pytest.approx(90)
        machine.wait(3000)
        assert len(await drainer.claim(10)) == 3
        assert await drainer.list_dead() == []
    assert put.expires_at is not None
    assert not [r for r in caplog.records if "was down" in r.getMessage()]


async def test_a_real_reboot_still_continues_from_the_last_reading(
        store_config: StoreConfig, machine: Machine) -> None:
    """The boot-time check does not hide a reboot: CLOCK_BOOTTIME starts again."""
    machine.since_boot = 5 * DAY
    async with await Store.open(store_config) as drainer:
        put = await drainer.put("lamp", "on", ttl=100)
        machine.wait(40)
    machine.reboot(down=600, wall_at_boot=machine.wall + 600, synced=False)
    async with await Store.open(store_config) as drainer:
        machine.wait(50)  # 40 + 5 + 50 of its 100 s: still queued
        assert [c.id for c in await drainer.claim(10)] == [put.id]
        await drainer.release([put.id])
        machine.wait(10)
        assert await drainer.claim(10) == []


async def test_a_counted_downtime_is_logged_by_the_drainer_that_counts_it(
        store_config: StoreConfig, machine: Machine, caplog: pytest.LogCaptureFixture) -> None:
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    caplog.set_level(logging.INFO)
    async with await Store.open(store_config) as drainer:
        with Producer.open(store_config) as producer:
            await ntp_answers(drainer, machine, 2 * DAY)
            producer.put("lamp", "on", ttl=600)
    counted = [r.getMessage() for r in caplog.records if "down" in r.getMessage()
               and "count" in r.getMessage()]
    assert len([m for m in counted if "172800" in m]) == 1, counted
