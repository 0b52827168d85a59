"""What a batch costs the batcher: its own rows, not every row held, and no store call
between the window's end and the batch.

A device is in at most one unacknowledged batch, so under a backlog most rows the batcher
holds belong to busy devices. Each batch must cost what it takes (the free devices' rows),
or the drain slows down as the claim-ahead grows; and a lone command must go out when its
``batch_delay`` ends, not after a further claim. Real store on disk; the rows the store
hands out are wrapped only to count which of their fields the batcher reads.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

from pigateway.config import StoreConfig
from pigateway.store import Command, NewCommand, Store
from pigateway.uplink.batching import Batcher, Rules

RULES = Rules(gateway="gw-1", max_actions=50, max_batch_bytes=64 * 1024)


class Counted:
    """A claimed row that counts the reads of its fields, by device."""

    def __init__(self, row: Command, reads: Counter[str]) -> None:
        self._row = row
        self._reads = reads

    def __getattr__(self, name: str) -> Any:
        self._reads[self._row.device] += 1
        return getattr(self._row, name)


class CountingStore:
    """The real store; claims are timed and their rows count the reads of their fields."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: Counter[str] = Counter()
        self.claims: list[float] = []

    @property
    def clock(self) -> Any:
        return self.store.clock

    async def claim(self, limit: int) -> list[Any]:
        self.claims.append(time.monotonic())
        return [Counted(row, self.reads) for row in await self.store.claim(limit)]

    async def release(self, ids: Sequence[str]) -> None:
        await self.store.release(ids)

    async def wait_for_work(self, timeout: float) -> None:
        await self.store.wait_for_work(timeout)

    async def dead_letter(self, ids: Sequence[str], reason: str,
                          detail: str | None = None) -> None:
        await self.store.dead_letter(ids, reason, detail)


class Busy:
    """A gate on which the named devices are in a batch the broker has not acknowledged."""

    def __init__(self, *devices: str) -> None:
        self.devices = frozenset(devices)

    def busy(self) -> Collection[str]:
        return self.devices

    def free_slots(self) -> int:
        return 1

    def arm(self) -> None:
        return None

    async def wait_freed(self) -> None:
        await asyncio.Event().wait()


async def test_a_batch_reads_only_the_rows_of_free_devices(store_config: StoreConfig) -> None:
    """Thousands of rows of a busy device held: the next batch of a free device reads a
    handful of them at most (its device's first row, a few times), not each one per batch."""
    async with await Store.open(store_config) as store:
        await store.put_many([NewCommand("busy", "set", {"n": n}) for n in range(2000)])
        await store.put("free", "set", {"n": 0})
        counting = CountingStore(store)
        batcher = Batcher(counting, RULES, batch_delay=0.0, claim_limit=5000, gate=Busy("busy"))
        async with asyncio.timeout(10):
            first = await batcher.next_batch()
            assert first is not None and {c.device for c in first.commands} == {"free"}
            counting.reads.clear()
            for n in range(1, 6):
                await store.put("free", "set", {"n": n})
                batch = await batcher.next_batch()
                assert batch is not None and {c.device for c in batch.commands} == {"free"}
        assert len(batcher.pending) == 2000  # the busy device's rows, all still held
        assert counting.reads["busy"] <= 5 * 10, counting.reads  # not 2,000 a batch


async def test_a_lone_command_goes_when_its_window_ends_without_a_further_claim(
        store_config: StoreConfig) -> None:
    """At a low rate the batch leaves at ``batch_delay``: no store call after the window
    (a claim there is one more writer round trip on the latency of every command)."""
    delay = 0.3
    async with await Store.open(store_config) as store:
        counting = CountingStore(store)
        batcher = Batcher(counting, RULES, batch_delay=delay)
        put = await store.put("lamp", "set", {"on": True})
        window_ends = time.monotonic() + delay - (time.time() - put.queued_at)
        async with asyncio.timeout(10):
            batch = await batcher.next_batch()
        left = time.monotonic()
        assert batch is not None and batch.ids == [put.id]
        assert left >= window_ends - 0.01
        assert all(at < window_ends for at in counting.claims), \
            [round(at - window_ends, 3) for at in counting.claims]
