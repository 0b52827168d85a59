"""Child process for the crash tests: drain the store like the publisher does, and say so.

``claimer.py DB SEED`` opens DB as the drainer and keeps one batch in flight while acking
the one before (the publisher's window), printing one line per step, each with a single
``os.write`` (atomic on a pipe):

* ``claimed ID ...`` after ``claim`` returned,
* ``acking ID ...`` just before ``ack`` (after this the ids may be gone),
* ``acked ID ...`` after ``ack`` returned (these are gone for good),
* ``done`` when the queue is empty.

The parent kills it with SIGKILL at a random moment. Bounded in rounds and time.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pigateway.config import StoreConfig
from pigateway.store import Store

MAX_ROUNDS = 100_000
MAX_SECONDS = 60.0


def say(word: str, ids: Sequence[str]) -> None:
    os.write(1, (" ".join([word, *ids]) + "\n").encode())


async def ack(store: Store, ids: list[str]) -> None:
    say("acking", ids)
    await store.ack(ids)
    say("acked", ids)


async def main(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + MAX_SECONDS
    config = StoreConfig(path=path, min_free_bytes=0)
    async with await Store.open(config) as store:
        previous: list[str] = []
        for _ in range(MAX_ROUNDS):
            if time.monotonic() > deadline:
                break
            batch = [c.id for c in await store.claim(rng.randint(1, 20))]
            if batch:
                say("claimed", batch)
            if previous:
                await ack(store, previous)
            if not batch:
                say("done", [])
                return
            previous = batch
            await asyncio.sleep(0.005)  # the broker's round trip


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
