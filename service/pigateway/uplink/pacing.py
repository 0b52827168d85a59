"""Pacing: publish no faster than the cloud broker's quota (``[uplink] max_*_per_second``).

Cloud brokers cap the publish rate of a connection (AWS IoT Core: about 100 publishes/s)
and answer an over-quota drain with refusals or a disconnect; a backlog after an outage
would run into the cap at once. So every publish of the uplink first takes tokens from a
bucket per limit: one token per message, one per payload byte. A bucket holds one second's
worth (the burst) and refills at the rate; a publish bigger than a whole second's worth of
bytes waits for a full bucket and leaves it in debt, so it is never refused outright.
A limit of 0 is no bucket at all (the default: a local broker has no quota).

Publishes take their slots first come, first served (:meth:`Pacer.publish_slot` is a
queue): a big message waiting for its bytes is not overtaken by smaller ones behind it, so
it never starves, and the order the drain made its batches in is the order they leave in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

#: Waits one take may go through (each at least a refill of one token): a bound, never hit.
MAX_WAITS: Final = 1_000_000


class TokenBucket:
    """``rate`` tokens per second, at most ``rate`` banked (the burst: one second's worth)."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"a token bucket needs a rate above 0, got {rate}")
        self.rate = rate
        self.capacity = rate
        self.tokens = rate
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, count: float) -> float:
        """Take ``count`` tokens if there are enough (return 0), else the seconds to wait.

        More than the burst waits for a full bucket and then leaves it in debt.
        """
        self._refill()
        need = min(count, self.capacity)
        if self.tokens >= need:
            self.tokens -= count
            return 0.0
        return (need - self.tokens) / self.rate

    async def take(self, count: float) -> None:
        """Wait until ``count`` tokens are there, then take them."""
        for _ in range(MAX_WAITS):
            wait = self.wait_for(count)
            if wait <= 0:
                return
            await asyncio.sleep(wait)
        raise RuntimeError(f"token bucket: {count} tokens never came at rate {self.rate}")


class Pacer:
    """The uplink's buckets: messages per second and payload bytes per second (0: off)."""

    def __init__(self, messages_per_second: float, bytes_per_second: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.messages = TokenBucket(messages_per_second, clock=clock) \
            if messages_per_second > 0 else None
        self.bytes = TokenBucket(bytes_per_second, clock=clock) if bytes_per_second > 0 else None
        self._turn = asyncio.Lock()  # FIFO: waiters get it in the order they asked

    @property
    def active(self) -> bool:
        return self.messages is not None or self.bytes is not None

    async def publish_slot(self, size: int) -> None:
        """Wait until one more message of ``size`` payload bytes may go, in turn."""
        if not self.active:
            return
        async with self._turn:
            if self.messages is not None:
                await self.messages.take(1)
            if self.bytes is not None:
                await self.bytes.take(size)
