"""No transaction of the store grows with the backlog.

Expiry, purge, requeue, drop-oldest and dead-letter pruning work in chunks of
``SWEEP_CHUNK`` rows, each its own commit: the writer answers the watchdog's ping between
two chunks, a put made meanwhile commits, and a kill keeps the chunks already done. Dead
letters are bounded (count, bytes, age), so a bounded queue means a bounded file. Every
store is a real SQLite file; "between chunks" is seen from the outside, by a ping that
returns while the count a reader sees is neither where it started nor where it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import backdoor
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, StoreError
from pigateway.store import NewCommand, Store
from pigateway.store.connection import JOURNAL_SIZE_LIMIT
from pigateway.store.outbox import SWEEP_CHUNK

BACKLOG = 20_000
#: Dead-letter bounds wide enough that a test of sweeps is not also a test of pruning.
ROOMY = {"max_dead_letters": 10 * BACKLOG, "max_dead_bytes": 1 << 30}


def roomy(config: StoreConfig, **changes: object) -> StoreConfig:
    return config.replace(**{**ROOMY, **changes})


async def count(store: Store, sql: str) -> int:
    [(value,)] = await backdoor.read(store, sql)
    return int(value)


async def pings_between_chunks(store: Store, work: asyncio.Task[object], sql: str,
                               start: int, end: int) -> list[int]:
    """Ping the writer until ``work`` is done; after each ping, what a reader sees of
    ``sql``. Returns the values seen strictly between ``start`` and ``end``."""
    between: list[int] = []
    async with asyncio.timeout(120):
        for _ in range(100_000):
            if work.done():
                break
            await store.ping()
            seen = await count(store, sql)
            if min(start, end) < seen < max(start, end):
                between.append(seen)
    return between


async def expired_backlog(store: Store, size: int) -> None:
    for first in range(0, size, 5000):
        await store.put_many([NewCommand(f"d{i % 7}", "set", {"i": i}, ttl=0.001)
                              for i in range(first, min(size, first + 5000))])
    await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- expiry


async def test_an_expired_backlog_is_buried_in_chunks_with_pings_between(
        store_config: StoreConfig) -> None:
    """1M expired rows were one 30 s transaction; the watchdog killed it, and the kill
    rolled all of it back. Now each chunk commits and the ping gets the writer between."""
    async with await Store.open(roomy(store_config)) as store:
        await expired_backlog(store, BACKLOG)
        live = await store.put("d", "fresh", ttl=3600)

        async def claim_until_live() -> list[str]:
            for _ in range(BACKLOG // SWEEP_CHUNK + 10):  # one chunk per round at least
                if claimed := await store.claim(10):
                    return [c.id for c in claimed]
            raise AssertionError("the sweep did not reach the live command")

        work = asyncio.create_task(claim_until_live())
        between = await pings_between_chunks(
            store, work, "SELECT count(*) FROM dead_letters", 0, BACKLOG)
        assert await work == [live.id]
        assert (await store.stats()).dead == {"expired": BACKLOG}
        assert between, "no ping was answered while the expired backlog was being buried"
        assert all(seen % SWEEP_CHUNK == 0 for seen in between), (
            f"a commit handled a part of a chunk: {between[:10]}")


def test_a_kill_in_the_middle_of_an_expiry_sweep_keeps_the_chunks_done(
        store_config: StoreConfig) -> None:
    """The same sweep in a child process, killed mid-way: what was buried stays buried."""
    config = roomy(store_config)

    async def make() -> None:
        async with await Store.open(config) as store:
            await expired_backlog(store, BACKLOG)
    asyncio.run(make())
    script = (
        "import asyncio, sys, dataclasses\n"
        "from pigateway.config import StoreConfig\n"
        "from pigateway.store import Store\n"
        "async def main():\n"
        f"    config = StoreConfig(path={str(config.path)!r}, min_free_bytes=0,\n"
        f"                         max_dead_letters={config.max_dead_letters})\n"
        "    store = await Store.open(config)\n"
        "    print('open', flush=True)\n"
        "    while True:\n"
        "        await store.claim(10)\n"
        "asyncio.run(main())\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "open\n"
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline and seen == 0:
            with sqlite3.connect(config.path, timeout=30) as conn:
                seen = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    with sqlite3.connect(config.path, timeout=30) as conn:
        dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        queued = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    assert 0 < seen < BACKLOG, f"the first commit of the sweep buried {seen} rows at once"
    assert dead >= seen, "the kill rolled back chunks that had committed"
    assert dead + queued == BACKLOG


# --------------------------------------------------------------------------- purge, requeue


async def test_purge_all_is_chunked_keeps_puts_made_meanwhile_and_reports_progress(
        store_config: StoreConfig) -> None:
    """`queue purge --all` on 1M rows held the write lock 8.4 s, past the service's
    busy_timeout. Now chunks: pings and puts get the writer between them."""
    async with await Store.open(roomy(store_config)) as store:
        for first in range(0, BACKLOG, 5000):
            await store.put_many([NewCommand("d", "n", {"i": i})
                                  for i in range(first, first + 5000)])
        await store.dead_letter([c.id for c in await store.list_queued(1000)], "invalid")
        progress: list[int] = []
        work = asyncio.create_task(store.purge(queued=True, progress=progress.append))
        await asyncio.sleep(0)  # the purge begins (and takes its bounds) before our puts
        kept = []
        between: list[int] = []
        async with asyncio.timeout(120):
            while not work.done():
                kept.append((await store.put("d", "during")).id)
                depth = await count(store, "SELECT commands FROM totals") - len(kept)
                if 0 < depth < BACKLOG - 1000:
                    between.append(depth)
        assert await work == BACKLOG
        assert [c.id for c in await store.list_queued(len(kept) + 10)] == kept
        assert between, "no put committed while the purge ran"
        assert progress == sorted(progress) and progress[-1] == BACKLOG
        assert len(progress) >= BACKLOG // SWEEP_CHUNK


async def test_purge_dead_and_requeue_all_are_chunked(store_config: StoreConfig) -> None:
    async with await Store.open(roomy(store_config)) as store:
        size = 6000
        commands = await store.put_many([NewCommand("d", "n", {"i": i}) for i in range(size)])
        await store.dead_letter([c.id for c in commands], "max-attempts")
        work: asyncio.Task[object] = asyncio.create_task(store.requeue_dead())
        between = await pings_between_chunks(
            store, work, "SELECT count(*) FROM dead_letters", size, 0)
        assert await work == size
        assert between, "requeue-dead ran as one transaction"
        assert [c.id for c in await store.list_queued(size)] == [c.id for c in commands]
        await store.dead_letter([c.id for c in commands], "invalid")
        work = asyncio.create_task(store.purge(queued=False))
        between = await pings_between_chunks(
            store, work, "SELECT count(*) FROM dead_letters", size, 0)
        assert await work == size
        assert between, "purge --dead ran as one transaction"


async def test_drop_oldest_of_an_over_full_queue_drops_a_chunk_per_put(
        store_config: StoreConfig) -> None:
    """Lowering max_commands under a big backlog must not make one put bury all of it."""
    async with await Store.open(roomy(store_config)) as store:
        for _ in range(2):
            await store.put_many([NewCommand("d", "n")] * 2500)
    lowered = roomy(store_config, max_commands=100, overflow="drop-oldest")
    async with await Store.open(lowered) as store:
        await store.put("d", "new")
        stats = await store.stats()
        assert stats.dead == {"overflow": SWEEP_CHUNK + 1}
        assert stats.depth == 5000 - SWEEP_CHUNK
        for _ in range(20):
            await store.put("d", "new")
        assert (await store.stats()).depth == 100


# --------------------------------------------------------------------------- requeue


async def test_requeue_all_leaves_expired_dead_letters_dead(store_config: StoreConfig) -> None:
    """Requeue-dead revived expired commands with a fresh 7-day ttl."""
    async with await Store.open(store_config) as store:
        stale = await store.put("d", "stale", ttl=0.001)
        refused = await store.put("d", "refused", ttl=60)
        await asyncio.sleep(0.01)
        await store.claim(10)  # buries the stale one; claims the other
        await store.dead_letter([refused.id], "rejected-by-broker")
        assert (await store.stats()).dead == {"expired": 1, "rejected-by-broker": 1}
        assert await store.requeue_dead() == 1
        assert [c.id for c in await store.list_queued()] == [refused.id]
        assert [d.command.id for d in await store.list_dead()] == [stale.id]


async def test_an_expired_dead_letter_is_requeued_only_by_id_and_explicitly(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        stale = await store.put("d", "stale", ttl=0.5)
        await asyncio.sleep(0.6)
        assert await store.claim(10) == []
        with pytest.raises(InvalidCommand, match="--expired"):
            await store.requeue_dead(stale.id)
        assert await store.list_queued() == []
        assert await store.requeue_dead(stale.id, expired=True) == 1
        [again] = await store.list_queued()
        assert again.id == stale.id
        assert again.expires_at is not None
        assert again.expires_at - again.queued_at == pytest.approx(0.5, abs=0.01)


async def test_an_invalid_dead_letter_is_never_sent_again(store_config: StoreConfig) -> None:
    """A dead letter buried as ``invalid`` (an ingested payload that is no command) is
    evidence: neither requeue-all nor requeue by id turns it into an action for the cloud."""
    async with await Store.open(store_config) as store:
        bad = await store.put("d", "garbage", params={"payload": "not a command"})
        good = await store.put("d", "on")
        await store.dead_letter([bad.id], "invalid")
        await store.dead_letter([good.id], "max-attempts")
        assert await store.requeue_dead() == 1
        assert [c.id for c in await store.list_queued()] == [good.id]
        with pytest.raises(InvalidCommand, match="invalid"):
            await store.requeue_dead(bad.id)
        with pytest.raises(InvalidCommand, match="invalid"):
            await store.requeue_dead(bad.id, expired=True)
        assert [d.command.id for d in await store.list_dead()] == [bad.id]


@pytest.mark.parametrize("ttl", [60.0, 0.0])
async def test_a_requeued_command_keeps_its_own_ttl(store_config: StoreConfig,
                                                    ttl: float) -> None:
    async with await Store.open(store_config) as store:
        command = await store.put("d", "n", ttl=ttl)
        await store.dead_letter([command.id], "max-attempts")
        assert await store.requeue_dead() == 1
        [again] = await store.list_queued()
        if ttl:
            assert again.expires_at is not None
            assert again.expires_at - again.queued_at == pytest.approx(ttl, abs=0.01)
            assert again.queued_at >= command.queued_at
        else:
            assert again.expires_at is None  # lived forever, still does


# --------------------------------------------------------------------------- bounds


def file_bytes(path: Path) -> int:
    """The main file after a full checkpoint (the WAL has its own bound, tested below)."""
    with sqlite3.connect(path, timeout=30) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return path.stat().st_size


async def test_a_bounded_queue_means_a_bounded_file(store_config: StoreConfig,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Drop-oldest with a 100-command queue reached 57 MiB after 20,000 puts."""
    config = store_config.replace(max_commands=100, overflow="drop-oldest",
                                 max_dead_letters=300, max_dead_bytes=1 << 30)
    pad = "p" * 1000
    sizes = []
    async with await Store.open(config) as store:
        with caplog.at_level(logging.WARNING, logger="pigateway.store"):
            for round_ in range(BACKLOG // 50):
                await store.put_many([NewCommand("d", "n", {"pad": pad})] * 50)
                if round_ in (BACKLOG // 500, BACKLOG // 50 - 1):
                    sizes.append(file_bytes(config.path))
        stats = await store.stats()
    assert stats.depth == 100
    assert stats.dead_total == 300
    early, late = sizes
    assert late <= early * 1.2 + 64 * 1024, f"the file grew from {early} to {late} bytes"
    assert any("pruned" in r.getMessage() and "store.max_dead_letters=300" in r.getMessage()
               for r in caplog.records)


async def test_dead_letters_are_bounded_by_bytes_and_by_age(store_config: StoreConfig) -> None:
    config = store_config.replace(max_dead_bytes=4096, dead_letter_ttl=0.3)
    async with await Store.open(config) as store:
        commands = await store.put_many([NewCommand("d", str(i), {"pad": "x" * 1000})
                                         for i in range(10)])
        await store.dead_letter([c.id for c in commands], "invalid")
        dead = await store.list_dead(100)
        assert len(dead) == 4  # 4 x 1010 bytes fit in 4096, the oldest went first
        assert sum(d.command.size for d in dead) <= 4096
        await asyncio.sleep(0.4)
        await store.claim(1)  # the drain's claims prune dead letters past their age
        assert await store.list_dead(100) == []


async def test_dead_letters_written_by_the_inbox_are_bounded_too(
        store_config: StoreConfig) -> None:
    """The inbox records unreadable messages as dead letters with its own statement."""

    config = store_config.replace(max_dead_letters=50)
    async with await Store.open(config) as store:
        for _ in range(3):
            await asyncio.gather(*(store.inbox.record_unreadable("not JSON", b"garbage",
                                                                 time.time())
                                   for _ in range(40)))
            await store.claim(1)  # the drain's next claim prunes
        assert (await store.stats()).dead_total == 50


async def test_lowered_bounds_are_applied_when_the_service_starts(
        store_config: StoreConfig) -> None:
    async with await Store.open(roomy(store_config)) as store:
        commands = await store.put_many([NewCommand("d", "n")] * 1200)
        await store.dead_letter([c.id for c in commands], "invalid")
    lowered = store_config.replace(max_dead_letters=100)
    async with await Store.open(lowered) as store:
        assert (await store.stats()).dead_total == 100
        [(count_,)] = await backdoor.read(store, "SELECT dead_count FROM totals")
        assert count_ == 100


# --------------------------------------------------------------------------- after commit


async def test_dead_letters_are_logged_only_once_committed(
        store_config: StoreConfig, caplog: pytest.LogCaptureFixture) -> None:
    """"dead-lettered N" was logged inside transactions that then rolled back."""
    config = store_config.replace(max_commands=2, overflow="drop-oldest")
    async with await Store.open(config) as store:
        kept = await store.put_many([NewCommand("d", "a"), NewCommand("d", "b")])
        with caplog.at_level(logging.WARNING, logger="pigateway.store"), \
                pytest.raises(StoreError):
            await backdoor.put_with(store, "d", "c",
                                    also=[("INSERT INTO no_such_table VALUES (1)", ())])
        assert [c.id for c in await store.list_queued()] == [c.id for c in kept]
        assert await store.list_dead() == []
        assert not [r for r in caplog.records if "dead-lettered" in r.getMessage()]
        with caplog.at_level(logging.WARNING, logger="pigateway.store"):
            await store.put("d", "c")
        assert [r for r in caplog.records if "dead-lettered 1" in r.getMessage()]


async def test_the_wal_is_cut_back_after_a_big_transaction(store_config: StoreConfig) -> None:
    """The WAL kept the size of the largest transaction it ever held."""
    wal = store_config.path.with_name(store_config.path.name + "-wal")
    big = {"pad": "x" * 60_000}
    async with await Store.open(store_config) as store:
        await store.put_many([NewCommand("d", "n", big)] * 700)  # ~42 MB in one commit
        grown = wal.stat().st_size
        assert grown > 1.5 * JOURNAL_SIZE_LIMIT
        claimed = await store.claim(700)
        await store.ack([c.id for c in claimed])
        for _ in range(3):
            await store.put("d", "small")
        assert wal.stat().st_size <= JOURNAL_SIZE_LIMIT + 1024 * 1024


async def test_the_inbox_prune_is_chunked_and_sweeps_everything(
        store_config: StoreConfig) -> None:
    """The inbox too: finished commands past the dedupe window go a chunk a commit."""

    async with await Store.open(store_config) as store:
        now = store.clock.now()
        rows = [(f"c-{i}", now - 10) for i in range(SWEEP_CHUNK * 2 + 7)]
        await backdoor.write(store, [
            ("INSERT INTO inbox (id, device, name, params, received_at, state, finished_at, "
             "done_on) VALUES (?, 'd', 'n', '{}', 0, 'done', 0, ?)", row) for row in rows])
        assert await store.inbox.prune(now, chunks=1) == SWEEP_CHUNK  # one chunk, one commit
        left = await backdoor.read(store, "SELECT count(*) FROM inbox")
        assert left == [(len(rows) - SWEEP_CHUNK,)]
        assert await store.inbox.prune(now) == len(rows) - SWEEP_CHUNK
        assert await backdoor.read(store, "SELECT count(*) FROM inbox") == [(0,)]
