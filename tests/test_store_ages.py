"""Every age the queue file keeps counts on the gateway clock, not the wall clock.

A Raspberry Pi without a real-time clock boots at the time of its last shutdown and steps
to the real time when NTP answers, days later after a long outage. Ages on the wall clock
would jump with it: a dead letter buried the minute before the step (the commands that
expired during the outage, buried at boot) would be pruned as older than
``store.dead_letter_ttl`` at the next burial, a producer key would lose its 24 h window (a
retried ``send --id`` would queue a second command), and a delivery record would vanish
under ``send --wait``. So every age is on the gateway clock, as TTLs are
(tests/test_clock.py; the ages' migration is 7). Real SQLite files; the wall clock is
stepped by patching ``time.time``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store
from pigateway.store.producer import Producer

DAY = 24 * 3600.0


async def test_a_wall_clock_step_prunes_no_young_dead_letter(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    config = store_config.replace(dead_letter_ttl=3600.0)
    store = await Store.open(config)
    try:
        first = await store.put("lamp", "on")
        await store.dead_letter([first.id], "expired", "its ttl ran out")
        set_wall(30 * DAY)
        second = await store.put("lamp", "off")
        await store.dead_letter([second.id], "expired", "its ttl ran out")  # prunes
        assert {d.command.id for d in await store.list_dead()} == {first.id, second.id}
    finally:
        await store.close()


async def test_a_dead_letter_older_than_its_ttl_on_the_gateway_clock_is_pruned(
        store_config: StoreConfig) -> None:
    """The check can fail: one really older than the ttl goes (a row from before
    migration 7, no dead_on, counts from its wall time)."""
    config = store_config.replace(dead_letter_ttl=3600.0)
    store = await Store.open(config)
    try:
        old = await store.put("lamp", "on")
        await store.dead_letter([old.id], "expired", "its ttl ran out")
        with sqlite3.connect(config.path) as conn:
            conn.execute("UPDATE dead_letters SET dead_on = NULL, dead_at = ?",
                         (time.time() - 2 * 3600,))
        young = await store.put("lamp", "off")
        await store.dead_letter([young.id], "expired", "its ttl ran out")  # prunes
        assert [d.command.id for d in await store.list_dead()] == [young.id]
    finally:
        await store.close()


def test_a_wall_clock_step_keeps_a_producer_key(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    with Producer.open(store_config) as producer:
        first, first_id = producer.put_keyed("k-1", NewCommand("lamp", "on", {}))
        assert first is not None
        set_wall(2 * DAY)
        assert producer.put_keyed("k-1", NewCommand("lamp", "on", {})) == (None, first_id)


async def test_a_wall_clock_step_keeps_a_delivery_record(
        store_config: StoreConfig, set_wall: Callable[[float], None]) -> None:
    store = await Store.open(store_config)
    try:
        first = await store.put("lamp", "on", watch=True)
        [claimed] = await store.claim(10)
        await store.ack([claimed.id], "batch-1")
        set_wall(2 * DAY)
        await store.put("lamp", "off", watch=True)
        [second] = await store.claim(10)
        await store.ack([second.id], "batch-2")  # prunes
        where = await store.where(first.id)
        assert (where.state, where.batch) == ("delivered", "batch-1")
    finally:
        await store.close()
