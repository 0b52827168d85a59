"""Crash safety: child processes use the store and are killed with SIGKILL at random moments.

"Durable when put returns" is checked the only honest way: a child prints each id after
``put`` returned, the test kills it mid-flight, many rounds, and then reads the file. The
same for draining: a child claims and acks like the publisher, printing before and after
each ack; whatever it had not confirmed must still be queued, and what was in flight
comes back (first) when the next drainer opens. Bounded: a fixed number of rounds, each
with its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import backdoor, found
from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store

HELPERS = Path(__file__).parent / "harness" / "programs"
FIRST_LINE_TIMEOUT = 30.0


@dataclass
class Child:
    """A helper process whose complete stdout lines are collected by a thread."""

    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    first_line: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            if not raw.endswith(b"\n"):
                break  # cut short by the kill: not a confirmation
            self.lines.append(raw.decode().rstrip("\n"))
            self.first_line.set()


@contextlib.contextmanager
def child(*args: str) -> Iterator[Child]:
    """Start ``python harness/programs/<args>``; always SIGKILLed (by its own pid) and reaped."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
    running = Child(process)
    reader = threading.Thread(target=running.read, daemon=True)
    reader.start()
    try:
        yield running
    finally:
        process.kill()
        process.wait(timeout=30)
        reader.join(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def kill_at_random(running: Child, rng: random.Random, *, early: bool) -> None:
    """SIGKILL during start-up (``early``) or at a random moment once it is working."""
    if early:
        time.sleep(rng.uniform(0.0, 0.4))
    else:
        assert running.first_line.wait(FIRST_LINE_TIMEOUT), "the child never got going"
        time.sleep(rng.uniform(0.0, 0.3))
    running.process.kill()


def file_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read from a copy of the file and its WAL: the next round recovers the WAL the kill
    left itself (an open that can write would checkpoint it away at its close)."""
    with found.as_found(path) as conn:
        return conn.execute(sql).fetchall()


def assert_sound(path: Path) -> None:
    """The file passes the full integrity check and the counters match the rows. A kill
    during the first open, before the first migration committed (a slow start on a loaded
    machine), leaves a file with no schema yet: sound, and the next open migrates it."""
    assert file_rows(path, "PRAGMA integrity_check") == [("ok",)]
    if file_rows(path, "PRAGMA user_version") == [(0,)]:
        assert file_rows(path, "SELECT name FROM sqlite_master") == []
        return
    count, size = file_rows(path, "SELECT count(*), total(size) FROM outbox")[0]
    assert file_rows(path, "SELECT commands, bytes FROM totals") == [(count, size)]
    assert list(path.parent.glob("*.corrupt-*")) == []


@pytest.mark.slow
def test_every_printed_put_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    rng = random.Random(20261123)
    printed: list[str] = []
    for round_ in range(15):
        with child(str(HELPERS / "putter.py"), str(db), str(rng.choice([1, 8, 32]))) as running:
            kill_at_random(running, rng, early=round_ % 5 == 0)
        printed += running.lines
        if db.exists():
            assert_sound(db)
    assert len(printed) > 100, "the putters hardly ran; the test proved little"
    stored = Counter(row[0] for row in file_rows(db, "SELECT id FROM outbox"))
    missing = [id_ for id_ in printed if stored[id_] != 1]
    assert missing == []
    assert len(printed) == len(set(printed))
    assert file_rows(db, "SELECT count(*) FROM dead_letters") == [(0,)]


async def _prefill(config: StoreConfig, count: int) -> list[str]:
    async with await Store.open(config) as store:
        commands = await store.put_many(
            [NewCommand(f"dev-{i % 5}", "set", {"i": i}) for i in range(count)])
    return [c.id for c in commands]


async def _in_flight_ids(config: StoreConfig) -> set[str]:
    """What the file says is in flight, read by a producer (which must not touch it)."""
    async with await Store.open(config, drainer=False) as producer:
        rows = await backdoor.read(producer, "SELECT id FROM outbox JOIN inflight USING (seq)")
    return {str(row[0]) for row in rows}


def _parse(lines: list[str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {"claimed": set(), "acking": set(), "acked": set(),
                                 "done": set()}
    for line in lines:
        word, *ids = line.split()
        seen[word].update(ids or ["-"])
    return seen


@pytest.mark.slow
async def test_killing_a_drainer_loses_nothing_and_in_flight_comes_back(
        tmp_path: Path) -> None:
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    put_ids = await _prefill(config, 20_000)
    rng = random.Random(42)
    acking: set[str] = set()
    acked: set[str] = set()
    rounds_with_in_flight = 0
    for round_ in range(10):
        with child(str(HELPERS / "claimer.py"), str(config.path), str(round_)) as running:
            await asyncio.to_thread(kill_at_random, running, rng, early=False)
        seen = _parse(running.lines)
        acking |= seen["acking"]
        acked |= seen["acked"]
        in_flight = await _in_flight_ids(config)
        assert not in_flight & acked, "an acked command is still in flight"
        if seen["claimed"] and not seen["done"]:
            # the child always holds its newest batch in flight until it claims the next
            assert in_flight, f"round {round_}: the claimed batch was not in flight"
            rounds_with_in_flight += 1
        assert_sound(config.path)
    assert rounds_with_in_flight >= 5
    assert acked, "the claimers never acked anything; the test proved little"

    async with await Store.open(config) as drainer:
        assert (await drainer.stats()).in_flight == 0
        remaining = [c.id for c in await drainer.claim(len(put_ids))]
    assert len(remaining) == len(set(remaining))
    assert not set(remaining) & acked
    # nothing lost: what is gone was handed to ack; the rest is queued, in put order
    gone = set(put_ids) - set(remaining)
    assert gone <= acking
    assert remaining == [id_ for id_ in put_ids if id_ in set(remaining)]
    assert_sound(config.path)

