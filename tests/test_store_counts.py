"""The queue's counts (the ``totals`` row: commands and bytes) equal its rows after every
verb that adds or removes one, in the same transaction: the limits are checked against
them, and ``queue stats`` shows them. The verbs keep them, one update a statement; a put
refused, a group undone and a kill undo the counts with the rows. A real file on disk.
"""

from __future__ import annotations

import asyncio

import pytest

from harness import backdoor
from pigateway.config import StoreConfig
from pigateway.errors import QueueFull, StoreConflict
from pigateway.store import NewCommand, Store
from pigateway.store.producer import Producer

PARAMS = {"level": 80, "note": "x" * 50}


async def counted(store: Store) -> tuple[int, int]:
    """(commands, bytes) as ``totals`` says, after checking that the rows say the same."""
    [kept] = await backdoor.read(store, "SELECT commands, bytes FROM totals WHERE id = 1")
    [rows] = await backdoor.read(store, "SELECT count(*), coalesce(sum(size), 0) FROM outbox")
    assert tuple(kept) == tuple(rows), f"totals {kept} where the rows are {rows}"
    return int(rows[0]), int(rows[1])


async def test_the_counts_follow_every_verb_that_adds_or_removes_a_command(
        store_config: StoreConfig) -> None:
    config = store_config.replace(max_attempts=1, max_commands=40, overflow="drop-oldest")
    async with await Store.open(config) as store:
        first = await store.put("lamp", "on", PARAMS)
        assert await counted(store) == (1, first.size)
        await store.put_many([NewCommand(f"d{n}", "set", {"n": n}) for n in range(30)])
        assert (await counted(store))[0] == 31
        with pytest.raises(StoreConflict):
            await store.put("lamp", "again", PARAMS, id=first.id)  # refused: nothing counted
        with pytest.raises(StoreConflict):  # a group undone whole: nothing counted
            await store.put_many([NewCommand("x", "y", {}, id="twice"),
                                  NewCommand("x", "y", {}, id="twice")])
        assert (await counted(store))[0] == 31
        await store.put_many([NewCommand(f"e{n}", "set", {}) for n in range(20)])  # drops 11
        assert (await counted(store))[0] == 40
        claimed = await store.claim(5)
        assert await store.ack([c.id for c in claimed[:2]]) == 2
        await store.nack([claimed[2].id], "refused")  # past max_attempts: buried
        await store.dead_letter([claimed[3].id], "operator", "by hand")
        await store.release([claimed[4].id])
        assert (await counted(store))[0] == 36
        assert await store.requeue_dead() == 13  # not bounded by max_commands
        assert (await counted(store))[0] == 49
        await store.put("lamp", "short", ttl=0.01)  # drops 10 to be within 40 again
        assert (await counted(store))[0] == 40
        await asyncio.sleep(0.05)
        while await store.claim(50):  # the expired one is buried on the way
            pass
        assert (await counted(store))[0] == 39
        assert await store.purge(queued=True) == 39 + 11  # and the 11 dead letters
        assert await counted(store) == (0, 0)


async def test_the_counts_follow_a_producers_puts_and_its_refusals(
        store_config: StoreConfig) -> None:
    config = store_config.replace(max_commands=3, overflow="reject")
    with Producer.open(config) as producer:
        for n in range(3):
            producer.put("lamp", f"on-{n}", PARAMS)
        with pytest.raises(QueueFull):
            producer.put("lamp", "one too many", PARAMS)
    async with await Store.open(config) as store:
        assert (await counted(store))[0] == 3
