"""Adversarial review of migration 7 (ages on the gateway clock): real SQLite files.

The gateway clock runs behind the wall clock whenever downtime went uncounted, and by the
whole NTP step when the queue file was created before the first NTP answer (a fresh Pi
boots at the image's fake-hwclock time): months. Rows from before migration 7 carry wall
times; compared as they are with gateway times, they read months younger than they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store
from pigateway.store.producer import Producer

DAY = 24 * 3600.0
#: How far the gateway clock runs behind the wall clock (created before NTP answered).
BEHIND = 90 * DAY


@pytest.fixture
def shift_wall(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the wall clock ``seconds`` from the real one (every wall reading is time.time)."""
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def shift(seconds: float) -> None:
        offset[0] = seconds
    return shift


async def created_behind(config: StoreConfig, shift_wall: Callable[[float], None]) -> None:
    """A queue file made while the wall clock was BEHIND behind; then NTP answers, and the
    service runs on (its readings of the gateway clock carry the new wall time)."""
    shift_wall(-BEHIND)
    async with await Store.open(config):
        pass
    shift_wall(0.0)
    async with await Store.open(config) as store:
        await store.heartbeat()


def back_to_version_6(path: Path, *, key_at: float | None = None) -> None:
    """The file as pigateway before migration 7 left it (its ages were wall time)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        if key_at is not None:
            conn.execute("UPDATE producer_keys SET at = ?", (key_at,))
            conn.execute("UPDATE watched SET at = ?", (key_at,))
        conn.executescript("DROP INDEX dead_letters_on; "
                           "ALTER TABLE dead_letters DROP COLUMN dead_on; "
                           "ALTER TABLE delivered DROP COLUMN kept_on; "
                           "PRAGMA user_version = 6;")


async def test_the_count_bound_prunes_the_oldest_dead_letter_not_the_newest_after_the_upgrade(
        store_config: StoreConfig, shift_wall: Callable[[float], None]) -> None:
    config = dataclasses.replace(store_config, max_dead_letters=3, dead_letter_ttl=0)
    await created_behind(config, shift_wall)
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
        store_config: StoreConfig, shift_wall: Callable[[float], None]) -> None:
    config = dataclasses.replace(store_config, dead_letter_ttl=3600.0)
    await created_behind(config, shift_wall)
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
        store_config: StoreConfig, shift_wall: Callable[[float], None]) -> None:
    """send --id KEY a day after the first: a new command. It was refused as a repeat (and
    so never queued) for as long as the gateway clock runs behind."""
    await created_behind(store_config, shift_wall)
    with Producer.open(store_config) as producer:
        first, first_id = producer.put_keyed("nightly", NewCommand("lamp", "on", {}))
        assert first is not None
    back_to_version_6(store_config.path, key_at=time.time() - 25 * 3600)
    with Producer.open(store_config) as producer:  # migration 7
        again, again_id = producer.put_keyed("nightly", NewCommand("lamp", "on", {}))
    assert again is not None and again_id != first_id, "the second command was never queued"
