"""Priority lanes: higher priorities are claimed first, within one priority the
order of puts holds; results are high by default, so they never wait behind a backlog of
actions. Real SQLite files; the uplink tests run against a real mosquitto."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Mosquitto
from harness.uplink_helpers import drained, make_config, running_uplink, subscribed
from harness.wire_subscriber import WireSubscriber
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand
from pigateway.store import NewCommand, QueueReader, Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[Store]:
    async with await Store.open(store_config) as opened:
        yield opened


async def test_higher_priorities_are_claimed_first_in_put_order_within_each(
        store: Store) -> None:
    low = await store.put("a", "l1", priority="low")
    normal = [await store.put("a", f"n{n}") for n in range(3)]
    high = await store.put("a", "h1", priority="high")
    result = await store.put("gw", "result", {"ok": True}, kind="result")
    high2 = await store.put("b", "h2", priority="high")
    claimed = [c.id for c in await store.claim(100)]
    assert claimed == [high.id, result.id, high2.id, *(c.id for c in normal), low.id]


async def test_a_claim_past_a_limit_takes_the_rest_in_the_same_order(store: Store) -> None:
    await store.put_many([NewCommand("a", f"n{n}") for n in range(10)])
    urgent = await store.put("a", "now", priority="high")
    first = await store.claim(3)
    assert first[0].id == urgent.id and [c.name for c in first[1:]] == ["n0", "n1"]
    assert [c.name for c in await store.claim(100)] == [f"n{n}" for n in range(2, 10)]


async def test_a_requeued_dead_letter_keeps_its_priority(store: Store) -> None:
    await store.put_many([NewCommand("a", f"n{n}") for n in range(3)])
    urgent = await store.put("a", "now", priority="high")
    await store.dead_letter([urgent.id], "rejected-by-broker", "test")
    await store.requeue_dead(urgent.id)
    assert (await store.claim(1))[0].id == urgent.id


async def test_an_unknown_priority_is_refused_naming_the_choices(store: Store) -> None:
    with pytest.raises(InvalidCommand, match="high, normal, low"):
        await store.put("a", "x", priority="urgent")


async def test_drop_oldest_gives_up_the_lowest_priority_first(tmp_path: Path) -> None:
    """A full queue under drop-oldest keeps a result or a high command while a normal or
    low one can go (not simply the oldest row, whatever its priority)."""
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0, max_commands=3,
                         overflow="drop-oldest")
    async with await Store.open(config) as store:
        high = await store.put("a", "hi", priority="high")
        low = await store.put("a", "lo", priority="low")
        first = await store.put("a", "n1")
        await store.put("a", "n2")
        assert [d.command.id for d in await store.list_dead()] == [low.id]
        await store.put("a", "n3")
        assert [d.command.id for d in await store.list_dead()][-1] == low.id
        assert first.id in [d.command.id for d in await store.list_dead()]
        assert (await store.claim(1))[0].id == high.id


async def test_queue_ls_and_queue_show_follow_the_claim_order(store: Store) -> None:
    normal = [await store.put("a", f"n{n}") for n in range(3)]
    low = await store.put("a", "lo", priority="low")
    high = await store.put("a", "hi", priority="high")
    order = [high.id, *(c.id for c in normal), low.id]
    assert [c.id for c in await store.list_queued()] == order
    assert [(await store.where(i)).position for i in order] == [0, 1, 2, 3, 4]
    assert [c.id for c in await store.claim(10)] == order


def back_to_schema_4(path: Path) -> None:
    """The file as pigateway left it before priorities (migrations 5-8 undone)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript("DROP INDEX outbox_urgent; ALTER TABLE outbox DROP COLUMN priority; "
                           "ALTER TABLE dead_letters DROP COLUMN priority; "
                           "DROP INDEX dead_letters_on; ALTER TABLE dead_letters DROP COLUMN "
                           "dead_on; "
                           "DROP TABLE delivered; DROP TABLE watched; DROP TABLE producer_keys; "
                           "ALTER TABLE inflight ADD COLUMN claimed_at REAL NOT NULL DEFAULT 0; "
                           "PRAGMA user_version = 4;")


async def test_queue_show_reads_a_file_the_service_has_not_migrated(tmp_path: Path) -> None:
    """Right after an upgrade (schema 4, no priority, no delivery records): still shown."""
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        command = await store.put("a", "set")
    back_to_schema_4(config.path)
    async with await QueueReader.open(config) as reader:
        where = await reader.where(command.id)
    assert where.state == "queued"


async def test_the_migration_makes_queued_results_high(tmp_path: Path) -> None:
    """A queue file from before priorities: its results are claimed first after the upgrade."""
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as old:
        action = await old.put("a", "set")
        result = await old.put("gw", "result", {}, kind="result")
    back_to_schema_4(config.path)
    async with await Store.open(config) as upgraded:
        assert [c.id for c in await upgraded.claim(10)] == [result.id, action.id]


def test_pigateway_send_priority(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'gateway_id = "gw"\n[store]\npath = "{tmp_path / "q.db"}"\n'
                      "min_free_bytes = 0\n")

    def send(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pigateway", "send", "--config",
                               str(config), "--device", "lamp", "--command", "on", *extra],
                              check=False, capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(ROOT / "service")})

    assert send().returncode == 0
    urgent = send("--priority", "high")
    assert urgent.returncode == 0
    refused = send("--priority", "urgent")
    assert refused.returncode != 0 and "high" in refused.stderr
    with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as conn:
        rows = conn.execute("SELECT id, priority FROM outbox ORDER BY priority, seq").fetchall()
    assert rows[0] == (urgent.stdout.strip(), 0) and rows[1][1] == 1


# --------------------------------------------------------------------------- the uplink


class ArrivalOrder(WireSubscriber):
    """The wire subscriber, also keeping one global arrival order: (kind, ids or result)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: list[tuple[str, list[str]]] = []

    def take(self, topic: str, payload: bytes) -> None:
        before = len(self.commands), len(self.results)
        super().take(topic, payload)
        if len(self.commands) > before[0]:
            self.arrivals.append(("actions", [c.id for c in self.commands[before[0]:]]))
        elif len(self.results) > before[1]:
            self.arrivals.append(("results", [str(self.results[-1].get("id"))]))


@pytest.mark.broker
async def test_a_result_and_a_high_command_put_last_behind_a_backlog_arrive_first(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """50,000 actions queued while the broker is away; then a result and a --priority high
    command. Once the broker is back they are among the first messages to arrive."""
    backlog = 50_000
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, store={
        "max_commands": 100_000, "min_free_bytes": 0})
    async with subscribed(mosquitto.port, unique_prefix, "order-sub", kind=ArrivalOrder) as sub:
        mosquitto.stop()
        async with running_uplink(cfg) as run:
            for start in range(0, backlog, 5000):
                await run.store.put_many([NewCommand(f"dev{n % 50}", "set", {"n": n})
                                          for n in range(start, start + 5000)])
            result = await run.store.put("gw", "result", {
                "v": 1, "id": "answer-1", "status": "ok", "finished_at": 1.0}, kind="result")
            urgent = await run.store.put("dev7", "stop", priority="high")
            mosquitto.start()
            run.uplink.flush()
            assert await drained(run.store, 120)
            assert await sub.wait_for(backlog + 1, 120)  # a Python subscriber on a busy machine
    assert sub.errors == []
    # lost, not late: the broker dropped it (no subscription), no question of order
    assert ("results", ["answer-1"]) in sub.arrivals
    first = sub.arrivals[:3]
    assert ("results", ["answer-1"]) in first, [(kind, len(ids)) for kind, ids in first]
    assert any(urgent.id in ids for kind, ids in first if kind == "actions")
    assert len(sub.arrivals) > 10 and result.kind == "result"  # a backlog, not one message


@pytest.mark.broker
async def test_across_priorities_a_devices_high_command_goes_before_its_earlier_ones(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Insert-front: a device's high command overtakes its normal ones still queued; the
    normal ones keep their order among themselves."""
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    async with subscribed(mosquitto.port, unique_prefix, "order-sub", kind=ArrivalOrder) as sub:
        mosquitto.stop()
        async with running_uplink(cfg) as run:
            normal = [await run.store.put("valve", "set", {"n": n}) for n in range(3)]
            urgent = await run.store.put("valve", "close", priority="high")
            mosquitto.start()
            run.uplink.flush()
            assert await drained(run.store, 20)
            assert await sub.wait_for(4, 20)
    order = [c.id for c in sub.first_deliveries()]
    assert order == [urgent.id, *(c.id for c in normal)]
