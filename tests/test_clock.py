"""TTLs on the gateway clock: they survive a wall-clock step both ways, and a reboot.

A Pi without an RTC boots with an old time and steps to the real one when NTP answers;
an operator may set the clock back. Here the wall clock is stepped by patching
``time.time`` (what every wall-clock reading in pigateway ends in), and a reboot is
simulated by patching ``pigateway.store.clock``'s sources (boot id, boot time, sync state),
against a real queue file on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from harness import backdoor
from pigateway.config import StoreConfig
from pigateway.handlers import Request
from pigateway.store import Store, clock, clock_row
from pigateway.store.schema import MIGRATIONS
from pigateway.uplink.batching import Batcher, Rules
from test_inbound import Scripted, by_id, command, make_config, results, running

YEAR = 365 * 86400.0
HOUR = 3600.0
RULES = Rules(gateway="gw", max_actions=10, max_batch_bytes=64 * 1024)


@dataclasses.dataclass
class Wall:
    """The wall clock, shifted by ``step`` seconds from the real one."""

    step: float = 0.0


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wall]:
    """Step the wall clock with ``wall.step = ...`` (time.time is patched for the test)."""
    shifted = Wall()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + shifted.step)
    yield shifted


@dataclasses.dataclass
class Machine:
    """A simulated gateway: its boot, the seconds since that boot, its wall clock."""

    boot: str = "boot-1"
    since_boot: float = 1000.0
    wall: float = 1_800_000_000.0
    synced: bool = True

    def wait(self, seconds: float) -> None:
        self.since_boot += seconds
        self.wall += seconds

    def reboot(self, *, down: float, wall_at_boot: float, synced: bool) -> None:
        """Down for ``down`` seconds, then up for 5 s with ``wall_at_boot`` on the clock."""
        self.boot = f"{self.boot}+"
        self.since_boot = 5.0
        self.wall = wall_at_boot + 5.0
        self.synced = synced
        del down  # a machine that is off measures nothing: only the wall clock may know


def simulate(monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A simulated gateway behind the clock's sources (boot id, boottime, wall, sync)."""
    sim = Machine()
    monkeypatch.setattr(clock, "boot_id", lambda: sim.boot)
    monkeypatch.setattr(clock, "boottime", lambda: sim.since_boot)
    monkeypatch.setattr(clock, "wall", lambda: sim.wall)
    monkeypatch.setattr(clock, "synchronised", lambda: sim.synced)
    return sim


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return simulate(monkeypatch)


@contextlib.asynccontextmanager
async def opened(config: StoreConfig, *, drainer: bool = True) -> AsyncIterator[Store]:
    async with await Store.open(config, drainer=drainer) as store:
        yield store


async def claimed_ids(store: Store) -> list[str]:
    return [c.id for c in await store.claim(100)]


async def dead_reasons(store: Store) -> dict[str, str]:
    return {d.command.id: d.reason for d in await store.list_dead(100)}


# --------------------------------------------------------------------------- wall-clock steps


async def test_a_command_put_before_a_year_step_forward_is_not_expired(
        store_config: StoreConfig, wall: Wall) -> None:
    async with opened(store_config) as store:
        command_ = await store.put("lamp", "on", ttl=60)
        wall.step = YEAR  # NTP answers: the Pi booted a year behind
        assert await claimed_ids(store) == [command_.id]
        assert await dead_reasons(store) == {}


async def test_a_command_put_before_a_step_back_still_expires_after_its_ttl(
        store_config: StoreConfig, wall: Wall) -> None:
    async with opened(store_config) as store:
        command_ = await store.put("lamp", "on", ttl=0.2)
        wall.step = -HOUR
        assert await claimed_ids(store) == [command_.id]  # still alive
        await store.release([command_.id])
        await asyncio.sleep(0.3)
        assert await claimed_ids(store) == []
        assert await dead_reasons(store) == {command_.id: "expired"}


async def test_a_producer_puts_on_the_same_clock_as_the_drainer(
        store_config: StoreConfig, wall: Wall) -> None:
    async with opened(store_config) as drainer:
        async with opened(store_config, drainer=False) as producer:
            fresh = await producer.put("lamp", "on", ttl=60)
            stale = await producer.put("lamp", "off", ttl=0.1)
        wall.step = YEAR
        await asyncio.sleep(0.2)
        assert await claimed_ids(drainer) == [fresh.id]
        assert await dead_reasons(drainer) == {stale.id: "expired"}


async def test_requeued_dead_letters_get_their_ttl_on_the_gateway_clock(
        store_config: StoreConfig, wall: Wall) -> None:
    config = store_config.replace(default_ttl=60)
    async with opened(config) as store:
        command_ = await store.put("lamp", "on")
        await store.dead_letter([command_.id], "max-attempts")
        await store.requeue_dead(command_.id)
        wall.step = YEAR
        assert await claimed_ids(store) == [command_.id]


async def test_the_batcher_does_not_expire_a_pending_command_at_a_step_forward(
        store_config: StoreConfig, wall: Wall) -> None:
    async with opened(store_config) as store:
        batcher = Batcher(store, RULES, batch_delay=0.3, clock=time.time)
        nxt = asyncio.create_task(batcher.next_batch())
        command_ = await store.put("lamp", "on", ttl=60)
        await asyncio.sleep(0.1)  # claimed, waiting for its window
        wall.step = YEAR
        async with asyncio.timeout(5):
            batch = await nxt
        assert batch is not None and batch.ids == [command_.id]
        assert await dead_reasons(store) == {}


async def test_the_batcher_expires_a_pending_command_after_a_step_back(
        store_config: StoreConfig, wall: Wall) -> None:
    async with opened(store_config) as store:
        batcher = Batcher(store, RULES, batch_delay=0.5, clock=time.time)
        nxt = asyncio.create_task(batcher.next_batch())
        stale = await store.put("lamp", "on", ttl=0.2)
        await asyncio.sleep(0.1)  # claimed, waiting for its window
        wall.step = -HOUR
        fresh = await store.put("fan", "on", ttl=60)
        async with asyncio.timeout(5):
            batch = await nxt
        assert batch is not None and batch.ids == [fresh.id]
        assert await dead_reasons(store) == {stale.id: "expired"}


async def test_an_inbound_command_survives_a_step_forward(tmp_path: Path, wall: Wall) -> None:
    gate = asyncio.Event()

    async def first_waits(request: Request) -> None:
        if request.id == "first":
            await gate.wait()

    lamp = Scripted(first_waits)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("first"))
        await inbound.accept(command("later", ttl=60))
        await asyncio.sleep(0.05)
        wall.step = YEAR
        gate.set()
        documents = by_id(await results(store, 2))
    assert documents["later"]["status"] == "ok"
    assert [r.id for _, r in lamp.calls] == ["first", "later"]


async def test_an_inbound_command_still_expires_after_a_step_back(
        tmp_path: Path, wall: Wall) -> None:
    gate = asyncio.Event()

    async def first_waits(request: Request) -> None:
        if request.id == "first":
            await gate.wait()

    lamp = Scripted(first_waits)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("first"))
        await inbound.accept(command("late", ttl=0.1))
        wall.step = -HOUR
        await asyncio.sleep(0.2)
        gate.set()
        documents = by_id(await results(store, 2))
    assert documents["late"]["status"] == "expired"
    assert "ttl of 0.1s" in documents["late"]["detail"]
    assert [r.id for _, r in lamp.calls] == ["first"]


# --------------------------------------------------------------------------- reboots


async def put_then_reboot(config: StoreConfig, machine: Machine, *, ttl: float, up: float,
                          down: float, synced_at_boot: bool) -> str:
    """Put a command, run ``up`` seconds, shut down, reboot after ``down`` seconds."""
    async with opened(config) as store:
        command_ = await store.put("lamp", "on", ttl=ttl)
        machine.wait(up)
    before = machine.wall
    # the real time at boot, or what fake-hwclock saved at shutdown when not synced
    machine.reboot(down=down, wall_at_boot=before + down if synced_at_boot else before,
                   synced=synced_at_boot)
    return command_.id


async def test_the_remaining_ttl_carries_over_a_reboot(
        store_config: StoreConfig, machine: Machine) -> None:
    command_id = await put_then_reboot(store_config, machine, ttl=100, up=40, down=3 * HOUR,
                                       synced_at_boot=False)
    async with opened(store_config) as store:
        # 40 s before, 5 s since boot: 55 s left; the downtime cannot be known
        [queued] = await store.list_queued()
        assert queued.expires_at == pytest.approx(machine.wall + 55)  # shown as wall time
        machine.wait(54)
        assert await claimed_ids(store) == [command_id]
        await store.release([command_id])
        machine.wait(2)
        assert await claimed_ids(store) == []
        assert await dead_reasons(store) == {command_id: "expired"}


async def test_a_known_downtime_counts(store_config: StoreConfig, machine: Machine) -> None:
    command_id = await put_then_reboot(store_config, machine, ttl=100, up=40, down=30,
                                       synced_at_boot=True)
    async with opened(store_config) as store:
        machine.wait(24)  # 100 - 40 - 30 - 5 = 25 s left
        assert await claimed_ids(store) == [command_id]
        await store.release([command_id])
        machine.wait(2)
        assert await claimed_ids(store) == []


async def test_a_downtime_counts_once_the_clock_is_synchronised_after_boot(
        store_config: StoreConfig, machine: Machine) -> None:
    command_id = await put_then_reboot(store_config, machine, ttl=100, up=40, down=0,
                                       synced_at_boot=False)
    async with opened(store_config) as store:
        machine.wait(10)  # 45 s left, as far as anyone knows
        assert await claimed_ids(store) == [command_id]
        await store.release([command_id])
        # NTP answers: the machine had been off for 50 s (its clock started where it
        # stopped), so the command ran out 5 s ago
        machine.wall += 50
        machine.synced = True
        await store.heartbeat()
        assert await claimed_ids(store) == []
        assert await dead_reasons(store) == {command_id: "expired"}


async def test_a_reboot_with_the_clock_a_year_behind_does_not_expire_a_command(
        store_config: StoreConfig, machine: Machine) -> None:
    async with opened(store_config) as store:
        command_ = await store.put("lamp", "on", ttl=600)
    machine.reboot(down=60, wall_at_boot=machine.wall - YEAR, synced=False)
    async with opened(store_config) as store:
        machine.wall += YEAR + 60  # NTP answers
        machine.synced = True
        await store.heartbeat()  # the last reading was synchronised: 1 year is not downtime
        machine.wait(30)
        assert await claimed_ids(store) == [command_.id]


async def test_the_gateway_clock_only_moves_forward(
        store_config: StoreConfig, machine: Machine) -> None:
    seen: list[float] = []
    for _ in range(3):
        async with opened(store_config) as store:
            seen.append(store.clock.now())
            machine.wait(10)
            seen.append(store.clock.now())
            machine.wall -= YEAR  # whatever the wall clock does
        machine.reboot(down=0, wall_at_boot=machine.wall, synced=False)
    assert seen == sorted(seen)
    assert seen[-1] - seen[0] == pytest.approx(2 * 15 + 10)


async def test_the_drainer_writes_a_reading_as_it_closes(
        store_config: StoreConfig, machine: Machine) -> None:
    async with opened(store_config) as store:
        machine.wait(30)
        now = store.clock.now()
    with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
        reading = clock_row.load(conn)
    assert reading is not None and reading.reading == pytest.approx(now)


async def test_existing_deadlines_keep_their_meaning_after_the_migration(
        store_config: StoreConfig) -> None:
    """A queue file from before the gateway clock: wall-clock deadlines, no clock row."""
    with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            conn.executescript(script)
            conn.execute(f"PRAGMA user_version = {number}")
        now = time.time()
        conn.execute("INSERT INTO outbox (id, kind, device, name, params, size, queued_at, "
                     "expires_at) VALUES ('old', 'action', 'lamp', 'on', '{}', 2, ?, ?)",
                     (now, now + 60))
        for id_, finished_at in (("done-long-ago", now - 100), ("done-now", now)):
            conn.execute("INSERT INTO inbox (id, device, name, params, received_at, state, "
                         "finished_at) VALUES (?, 'lamp', 'on', '{}', ?, 'done', ?)",
                         (id_, finished_at, finished_at))
        conn.commit()
    async with opened(store_config) as store:
        assert store.clock.now() == pytest.approx(time.time(), abs=1)
        assert await claimed_ids(store) == ["old"]
        await store.inbox.prune(store.clock.now() - 50, chunks=1)
        rows = await backdoor.read(store, "SELECT id FROM inbox")
        assert [row[0] for row in rows] == ["done-now"]


# --------------------------------------------------------------------------- the dedupe window


async def test_a_redelivery_after_a_step_forward_is_still_a_repeat(
        tmp_path: Path, wall: Wall) -> None:
    lamp = Scripted(lambda r: None)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("c1"))
        await results(store, 1)
        wall.step = YEAR  # NTP answers; the broker redelivers (PUBACK lost)
        await inbound.accept(command("c1"))
        answers = await results(store, 2)
    assert [a["status"] for a in answers] == ["ok", "ok"]  # the record, sent again
    assert [r.id for _, r in lamp.calls] == ["c1"]  # run once


async def test_a_step_forward_does_not_prune_the_dedupe_records(
        tmp_path: Path, wall: Wall) -> None:
    config = make_config(tmp_path, ["a"])
    lamp = Scripted(lambda r: None)
    async with opened(config.store) as store:
        async with running(config, {"a": lamp}, store) as (inbound, _):
            await inbound.accept(command("c1"))
            await results(store, 1)
        wall.step = YEAR
        async with running(config, {"a": lamp}, store) as (inbound, _):  # prunes as it starts
            await asyncio.sleep(0.1)
            await inbound.accept(command("c1"))
            answers = await results(store, 2)
    assert len(answers) == 2
    assert [r.id for _, r in lamp.calls] == ["c1"]


async def test_the_dedupe_window_still_ends_after_a_step_back(
        tmp_path: Path, wall: Wall) -> None:
    config = make_config(tmp_path, ["a"], dedupe_window=0.2)
    # no broker session to outlive the window (it would stretch the window to its expiry)
    config = replace(config, mqtt=replace(config.mqtt, session_expiry=0))
    lamp = Scripted(lambda r: None)
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("c1"))
        await results(store, 1)
        wall.step = -HOUR
        await asyncio.sleep(0.3)
        await inbound.accept(command("c1"))  # a new command after all: the window is over
        await results(store, 2)
    assert [r.id for _, r in lamp.calls] == ["c1", "c1"]


async def test_a_command_keeps_the_ttl_it_was_put_with(store_config: StoreConfig) -> None:
    """expires_at and queued_at are on different clocks: the ttl is stored, not derived."""
    async with opened(store_config) as store:
        command_ = await store.put("lamp", "on", ttl=30)
        forever = await store.put("lamp", "off", ttl=0)
        ttls = await backdoor.read(store, "SELECT ttl FROM outbox ORDER BY seq")
        assert ttls == [(30.0,), (0.0,)]
        await store.dead_letter([command_.id, forever.id], "max-attempts")
        dead = await backdoor.read(store, "SELECT id, ttl FROM dead_letters")
    assert sorted(dead) == sorted([(command_.id, 30.0), (forever.id, 0.0)])


async def test_the_drainer_writes_readings_while_it_runs(
        store_config: StoreConfig, machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut loses at most one heartbeat of the TTLs' time, not the whole uptime."""
    monkeypatch.setattr(clock, "HEARTBEAT", 0.02)

    def stored() -> float:
        with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
            reading = clock_row.load(conn)
        assert reading is not None
        return reading.reading

    async with opened(store_config) as store:
        machine.wait(30)
        for _ in range(250):  # 5 s at most
            if stored() >= store.clock.now():
                break
            await asyncio.sleep(0.02)
        assert stored() == pytest.approx(store.clock.now())
