"""Several processes on one queue file at once: the service draining, shells sending.

On a gateway the daemon drains the queue while ``pigateway send`` runs from scripts and
shells, each its own process with its own connection. Here real ``pigateway send``
processes and two busy producer processes (group commits) write while this process claims,
sometimes nacks, and acks. Every id a producer printed must be acked exactly once:
no loss, no duplicate.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from harness import gateway
from pigateway import config as configuration
from pigateway.store import Store

HELPERS = Path(__file__).parent / "harness" / "programs"
SENDERS = 12
PUTTERS, PRODUCERS, PUTS = 2, 4, 150


async def run(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def drain(store: Store, producers_done: asyncio.Event, acked: Counter[str]) -> None:
    """Claim and ack like the publisher, nacking now and then (a lost PUBACK)."""
    rng = random.Random(7)
    while True:
        batch = await store.claim(rng.randint(1, 40))
        if batch:
            ids = [c.id for c in batch]
            if rng.random() < 0.2:
                await store.nack(ids, "no PUBACK in time")
            else:
                await store.ack(ids)
                acked.update(ids)
            continue
        if producers_done.is_set():
            if not await store.claim(1000):  # a last look after the last commit
                return
            raise AssertionError("claimed commands after the producers were done, unacked")
        await store.wait_for_work(0.2)


@pytest.mark.slow
async def test_senders_and_a_drainer_at_once_lose_and_duplicate_nothing(
        tmp_path: Path) -> None:
    config_file = gateway.write(tmp_path / "config.toml", gateway.settings(
        tmp_path, gateway_id="gw-conc",
        store={"path": str(tmp_path / "q.db"), "max_attempts": 1000}))
    store_config = configuration.load(config_file).store
    producers_done = asyncio.Event()
    acked: Counter[str] = Counter()
    async with asyncio.timeout(180), await Store.open(store_config) as store:
        drainer = asyncio.create_task(drain(store, producers_done, acked))
        senders = [run(sys.executable, "-m", "pigateway", "send", "--config", str(config_file),
                       "--device", f"lamp-{n % 3}", "--command", "on",
                       "--param", f"n={n}") for n in range(SENDERS)]
        putters = [run(sys.executable, str(HELPERS / "putter.py"), str(store_config.path),
                       str(PRODUCERS), str(PUTS)) for _ in range(PUTTERS)]
        results = await asyncio.gather(*senders, *putters)
        producers_done.set()
        await drainer
        stats = await store.stats()
    assert [(code, err) for code, _, err in results] == [(0, "")] * len(results)
    printed = [line for _, out, _ in results for line in out.split()]
    assert len(printed) == SENDERS + PUTTERS * PRODUCERS * PUTS
    assert len(set(printed)) == len(printed)
    assert set(acked) == set(printed)
    assert [id_ for id_, times in acked.items() if times != 1] == []
    assert (stats.depth, stats.in_flight, stats.dead_total) == (0, 0, 0)
