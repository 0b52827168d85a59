"""Migration 7 (ages on the gateway clock) keeps every row's age: real SQLite files.

The gateway clock runs behind the wall clock whenever downtime went uncounted, and by the
whole NTP step when the queue file was created before the first NTP answer (a fresh Pi
boots at the image's fake-hwclock time): months. Rows from before migration 7 carry wall
times; compared as they are with gateway times, they read months younger than they are.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store
from pigateway.store.producer import Producer
from test_clock import Machine, simulate

DAY = 24 * 3600.0
#: How far the gateway clock runs behind the wall clock (created before NTP answered).
BEHIND = 90 * DAY


async def created_behind(config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    """A queue file made while the wall clock was BEHIND behind; then NTP answers, and the
    service runs on (its readings of the gateway clock carry the new wall time)."""
    set_wall(-BEHIND)
    async with await Store.open(config):
        pass
    set_wall(0.0)
    async with await Store.open(config) as store:
        await store.heartbeat()


def back_to_version_6(path: Path, *, key_at: float | None = None) -> None:
    """The file as pigateway before migration 7 left it (its ages were wall time; migration
    8 undone too: an in-flight mark kept when it was claimed)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        if key_at is not None:
            conn.execute("UPDATE producer_keys SET at = ?", (key_at,))
            conn.execute("UPDATE watched SET at = ?", (key_at,))
        conn.executescript("DROP INDEX dead_letters_on; "
                           "ALTER TABLE dead_letters DROP COLUMN dead_on; "
                           "ALTER TABLE delivered DROP COLUMN kept_on; "
                           "ALTER TABLE inflight ADD COLUMN claimed_at REAL NOT NULL DEFAULT 0; "
                           "PRAGMA user_version = 6;")


async def test_the_count_bound_prunes_the_oldest_dead_letter_not_the_newest_after_the_upgrade(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    config = store_config.replace(max_dead_letters=3, dead_letter_ttl=0)
    await created_behind(config, set_wall)
    async with await Store.open(config) as old:
        olds = [await old.put("lamp", f"old-{n}") for n in range(3)]
        await old.dead_letter([c.id for c in olds], "max-attempts", "before the upgrade")
    back_to_version_6(config.path)
    async with await Store.open(config) as store:  # migration 7
        new = await store.put("lamp", "new")
        await store.dead_letter([new.id], "max-attempts", "after the upgrade")  # prunes one
        kept = {d.command.id for d in await store.list_dead()}
    assert new.id in kept, "the newest dead letter was pruned before older ones"
    assert kept == {*(c.id for c in olds[1:]), new.id}


async def test_a_dead_letter_from_before_the_upgrade_still_ages_out(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    config = store_config.replace(dead_letter_ttl=3600.0)
    await created_behind(config, set_wall)
    async with await Store.open(config) as old:
        stale = await old.put("lamp", "on")
        await old.dead_letter([stale.id], "max-attempts", "two hours ago")
    back_to_version_6(config.path)
    with contextlib.closing(sqlite3.connect(config.path)) as conn, conn:
        conn.execute("UPDATE dead_letters SET dead_at = ?", (time.time() - 2 * 3600,))
    async with await Store.open(config) as store:
        young = await store.put("lamp", "off")
        await store.dead_letter([young.id], "max-attempts", "now")  # prunes
        kept = [d.command.id for d in await store.list_dead()]
    assert kept == [young.id], "a dead letter 2 h old by wall time outlives a 1 h ttl by months"


async def test_a_producer_key_older_than_its_window_queues_again_after_the_upgrade(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    """send --id KEY a day after the first: a new command, on a file migrated while its
    gateway clock runs behind (the key's wall-clock stamp, read on that clock, would look
    younger than a day: refused as a repeat, never queued, for as long as it runs behind)."""
    await created_behind(store_config, set_wall)
    with Producer.open(store_config) as producer:
        first, first_id = producer.put_keyed("nightly", NewCommand("lamp", "on", {}))
        assert first is not None
    back_to_version_6(store_config.path, key_at=time.time() - 25 * 3600)
    with Producer.open(store_config) as producer:  # migration 7
        again, again_id = producer.put_keyed("nightly", NewCommand("lamp", "on", {}))
    assert again is not None and again_id != first_id, "the second command was never queued"


# --------------------------------------------------------------------------- the gap counted


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    """A simulated gateway (tests/test_clock.py's), its wall clock time.time's too."""
    sim = simulate(monkeypatch)
    monkeypatch.setattr(time, "time", lambda: sim.wall)
    return sim


async def boot_after_an_outage(config: StoreConfig, machine: Machine, down: float) -> None:
    """The service ran synchronised, then the Pi was off ``down`` seconds and boots at the
    time fake-hwclock saved (the downtime counts once NTP answers: the clock jumps)."""
    async with await Store.open(config):
        machine.wait(60)
    machine.reboot(down=down, wall_at_boot=machine.wall, synced=False)


async def ntp_answers(store: Store, machine: Machine, down: float) -> None:
    machine.wall += down
    machine.synced = True
    await store.heartbeat()  # counts the downtime: the gateway clock jumps forward


async def test_a_key_claimed_before_ntp_answers_keeps_its_window_when_the_downtime_counts(
        store_config: StoreConfig, machine: Machine) -> None:
    """The commit's own case (a Pi off for days, its clock stepped when NTP answers): a
    key claimed before the answer was aged by the whole downtime, and a retried send --id
    a minute later queued a second command."""
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    async with await Store.open(store_config) as store:
        first, first_id = await store.put_keyed("k-1", NewCommand("lamp", "on", {}))
        assert first is not None
        await ntp_answers(store, machine, 2 * DAY)
        machine.wait(60)
        assert await store.put_keyed("k-1", NewCommand("lamp", "on", {})) == (None, first_id)


async def test_a_dead_letter_buried_before_ntp_answers_is_not_pruned_when_the_downtime_counts(
        store_config: StoreConfig, machine: Machine) -> None:
    config = store_config.replace(dead_letter_ttl=30 * DAY)
    await boot_after_an_outage(config, machine, 40 * DAY)
    async with await Store.open(config) as store:
        early = await store.put("lamp", "on")
        await store.dead_letter([early.id], "max-attempts", "before NTP answered")
        await ntp_answers(store, machine, 40 * DAY)
        machine.wait(60)
        later = await store.put("lamp", "off")
        await store.dead_letter([later.id], "max-attempts", "after")  # prunes
        assert {d.command.id for d in await store.list_dead()} == {early.id, later.id}


async def test_a_command_queued_before_ntp_answers_keeps_its_ttl_when_the_downtime_counts(
        store_config: StoreConfig, machine: Machine) -> None:
    """The gateway's core case: it boots offline after days off, commands are queued (ttl
    1 h) while neither the broker nor NTP answers; the network comes back, NTP answers and
    the downtime counts. Their deadlines were on the clock before the jump: they were
    dead-lettered ``expired`` minutes after being queued, never sent. A deadline of this
    boot moves with the clock (outbox and inbox alike)."""
    await boot_after_an_outage(store_config, machine, 2 * DAY)
    async with await Store.open(store_config) as store:
        queued = await store.put("lamp", "on", ttl=3600)
        await ntp_answers(store, machine, 2 * DAY)
        machine.wait(60)
        assert [c.id for c in await store.claim(10)] == [queued.id]
        assert await store.list_dead() == []
