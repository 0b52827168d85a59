"""The store's contract: every verb of the durable queue, on a real SQLite file on disk.

One class, as huey's storage tests do: each test names one promise of the narrow queue
interface (put, claim, ack, nack, dead-letter, resume, stats, maintenance, limits) and
checks it against the rows, sometimes read back through a second, independent sqlite3
connection so that "durable" means "in the file", not "in the object".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from harness import backdoor
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, QueueFull, StoreError
from pigateway.store import NewCommand, Store
from pigateway.store.ids import new_id
from pigateway.store.schema import MIGRATIONS

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
HELPERS = Path(__file__).parent / "harness" / "programs"


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file with a connection of our own, independent of the store's."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def queued_ids(path: Path) -> list[str]:
    return [row[0] for row in raw_rows(path, "SELECT id FROM outbox ORDER BY seq")]


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[Store]:
    async with await Store.open(store_config) as opened:
        yield opened


async def reopen(store: Store, **changes: Any) -> Store:
    """Close ``store`` and open its file again (as a new drainer, unless told otherwise)."""
    await store.close()
    drainer = changes.pop("drainer", True)
    return await Store.open(store.config.replace(**changes), drainer=drainer)


class TestStoreContract:
    # ---- put / put_many

    async def test_put_is_in_the_file_when_it_returns(self, store: Store) -> None:
        command = await store.put("pump-1", "start", {"speed": 3}, ttl=60)
        rows = raw_rows(store.path, "SELECT id, device, name, params, kind, attempts FROM outbox")
        assert rows == [(command.id, "pump-1", "start", '{"speed":3}', "action", 0)]
        assert command.params == {"speed": 3}
        assert command.size == len('{"speed":3}')
        assert command.expires_at == pytest.approx(command.queued_at + 60)

    async def test_put_many_commits_a_list_in_order(self, store: Store) -> None:
        items = [NewCommand(f"dev-{i % 3}", "set", {"i": i}) for i in range(200)]
        commands = await store.put_many(items)
        assert [c.params["i"] for c in commands] == list(range(200))
        assert queued_ids(store.path) == [c.id for c in commands]
        assert await store.put_many([]) == []

    async def test_put_many_is_all_or_nothing_on_bad_input(self, store: Store) -> None:
        items = [NewCommand("a", "x"), NewCommand("", "x"), NewCommand("b", "y")]
        with pytest.raises(InvalidCommand):
            await store.put_many(items)
        assert queued_ids(store.path) == []

    async def test_ids_are_unique_and_sort_in_put_order(self, store: Store) -> None:
        singles = [(await store.put("d", "n")).id for _ in range(50)]
        concurrent = await asyncio.gather(*(store.put("d", "n", {"k": i}) for i in range(200)))
        batch = await store.put_many([NewCommand("d", "n") for _ in range(300)])
        ids = singles + [c.id for c in batch]
        assert ids == sorted(ids)
        everything = ids + [c.id for c in concurrent]
        assert len(set(everything)) == len(everything) == 550
        assert all(len(i) == 26 and set(i) <= CROCKFORD for i in everything)

    def test_ids_from_two_processes_never_collide(self) -> None:
        script = "from pigateway.store.ids import new_id\nfor _ in range(2000): print(new_id())"
        outputs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        ids = [line for proc in outputs for line in proc.communicate(timeout=60)[0].split()]
        local = [new_id() for _ in range(2000)]
        assert len(set(ids + local)) == 6000
        assert local == sorted(local)

    async def test_an_explicit_id_is_kept(self, store: Store) -> None:
        command = await store.put("d", "result", {"status": "ok"}, kind="result", id="CMD-1")
        assert command.id == "CMD-1" and command.kind == "result"
        assert queued_ids(store.path) == ["CMD-1"]

    async def test_a_duplicate_id_fails_alone_in_a_shared_commit(self, store: Store) -> None:
        await store.put("d", "n", id="TAKEN")
        outcomes = await asyncio.gather(
            store.put("d", "a"), store.put("d", "b", id="TAKEN"), store.put("d", "c"),
            return_exceptions=True)
        assert isinstance(outcomes[1], StoreError)
        assert [type(o).__name__ for o in (outcomes[0], outcomes[2])] == ["Command", "Command"]
        assert [row[0] for row in raw_rows(store.path, "SELECT name FROM outbox ORDER BY seq")] \
            == ["n", "a", "c"]

    # ---- bad input

    @pytest.mark.parametrize(("device", "name", "needle"), [
        ("", "start", "device"),
        ("   ", "start", "device"),
        ("d" * 129, "start", "device"),
        ("pump", "", "command name"),
    ])
    async def test_bad_names_are_invalid(self, store: Store, device: str, name: str,
                                         needle: str) -> None:
        with pytest.raises(InvalidCommand, match=needle):
            await store.put(device, name)
        assert queued_ids(store.path) == []

    @pytest.mark.parametrize("params", [[1, 2], "text", 5, {"x": {1, 2}}, {"x": math.nan}])
    async def test_params_must_be_a_json_object(self, store: Store, params: Any) -> None:
        with pytest.raises(InvalidCommand, match="params"):
            await store.put("d", "n", params)
        assert queued_ids(store.path) == []

    @pytest.mark.parametrize("ttl", [-1, math.nan, math.inf, "10"])
    async def test_bad_ttl_is_invalid(self, store: Store, ttl: Any) -> None:
        with pytest.raises(InvalidCommand, match="ttl"):
            await store.put("d", "n", ttl=ttl)
        assert queued_ids(store.path) == []

    async def test_bad_kind_is_invalid(self, store: Store) -> None:
        with pytest.raises(InvalidCommand, match="kind"):
            await store.put("d", "n", kind="telemetry")

    async def test_ttl_zero_lives_forever(self, store: Store) -> None:
        assert (await store.put("d", "n", ttl=0)).expires_at is None

    async def test_params_over_max_params_bytes_are_refused(self, store: Store) -> None:
        store = await reopen(store, max_params_bytes=100)
        try:
            fits = await store.put("d", "n", {"v": "x" * 90})
            with pytest.raises(InvalidCommand, match=r"max_params_bytes"):
                await store.put("d", "n", {"v": "x" * 100})
            assert queued_ids(store.path) == [fits.id]
        finally:
            await store.close()

    # ---- claim / ack / nack

    async def test_claim_takes_the_oldest_and_marks_them_in_flight(self, store: Store) -> None:
        ids = [c.id for c in await store.put_many([NewCommand("d", str(i)) for i in range(5)])]
        first = await store.claim(3)
        assert [c.id for c in first] == ids[:3]
        assert (await store.stats()).in_flight == 3
        assert [c.id for c in await store.claim(10)] == ids[3:]
        assert await store.claim(10) == []

    async def test_claim_dead_letters_expired_commands(self, store: Store) -> None:
        short = await store.put("d", "stale", ttl=0.001)
        keep = await store.put("d", "fresh", ttl=3600)
        await asyncio.sleep(0.02)
        claimed = await store.claim(10)
        assert [c.id for c in claimed] == [keep.id]
        dead = await store.list_dead()
        assert [(d.command.id, d.reason) for d in dead] == [(short.id, "expired")]
        assert (await store.stats()).dead == {"expired": 1}

    async def test_ack_deletes(self, store: Store) -> None:
        await store.put_many([NewCommand("d", str(i)) for i in range(4)])
        claimed = await store.claim(4)
        assert await store.ack([claimed[0].id, claimed[2].id]) == 2
        assert queued_ids(store.path) == [claimed[1].id, claimed[3].id]
        assert await store.ack(["no-such-id"]) == 0
        stats = await store.stats()
        assert (stats.depth, stats.in_flight) == (2, 2)

    async def test_nack_puts_back_at_the_head_with_the_error(self, store: Store) -> None:
        ids = [c.id for c in await store.put_many([NewCommand("d", str(i)) for i in range(4)])]
        claimed = await store.claim(2)
        await store.nack([c.id for c in claimed], "broker said no")
        again = await store.claim(4)
        assert [c.id for c in again] == ids
        assert [(c.attempts, c.last_error) for c in again[:2]] == [(1, "broker said no")] * 2
        assert [(c.attempts, c.last_error) for c in again[2:]] == [(0, None)] * 2

    async def test_nack_past_max_attempts_dead_letters(self, store: Store) -> None:
        store = await reopen(store, max_attempts=3)
        try:
            command = await store.put("d", "n")
            for attempt in range(1, 4):
                claimed = await store.claim(1)
                assert [(c.id, c.attempts) for c in claimed] == [(command.id, attempt - 1)]
                await store.nack([command.id], f"timeout {attempt}")
            assert await store.claim(1) == []
            [dead] = await store.list_dead()
            assert (dead.reason, dead.command.attempts, dead.command.last_error) == \
                ("max-attempts", 3, "timeout 3")
            assert dead.detail is not None and "timeout 3" in dead.detail
        finally:
            await store.close()

    async def test_verbs_take_more_ids_than_sqlite_binds_at_once(self, store: Store) -> None:
        ids = [c.id for c in await store.put_many([NewCommand("d", "n")] * 1500)]
        assert len(await store.claim(1500)) == 1500
        await store.nack(ids[:1200], "link lost")
        assert [c.attempts for c in await store.claim(1500)] == [1] * 1200
        assert await store.ack(ids[:1100]) == 1100
        await store.dead_letter(ids[1100:], "max-attempts")
        stats = await store.stats()
        assert (stats.depth, stats.in_flight, stats.dead) == (0, 0, {"max-attempts": 400})
        assert await store.requeue_dead() == 400
        assert queued_ids(store.path) == ids[1100:]

    # ---- dead letters

    async def test_dead_letter_moves_with_a_reason_and_logs(
            self, store: Store, caplog: pytest.LogCaptureFixture) -> None:
        commands = await store.put_many([NewCommand("d", str(i)) for i in range(3)])
        await store.claim(1)
        with caplog.at_level(logging.WARNING, logger="pigateway.store"):
            await store.dead_letter([commands[0].id, commands[1].id], "rejected-by-broker",
                                    "payload too large")
        assert queued_ids(store.path) == [commands[2].id]
        dead = {d.command.id: d for d in await store.list_dead()}
        assert set(dead) == {commands[0].id, commands[1].id}
        assert {(d.reason, d.detail) for d in dead.values()} == \
            {("rejected-by-broker", "payload too large")}
        stats = await store.stats()
        assert (stats.in_flight, stats.dead, stats.dead_total) == \
            (0, {"rejected-by-broker": 2}, 2)
        assert any("rejected-by-broker" in r.getMessage() for r in caplog.records)

    async def test_requeue_dead_all_and_by_id(self, store: Store) -> None:
        commands = await store.put_many([NewCommand("d", str(i)) for i in range(4)])
        await store.dead_letter([c.id for c in commands[:3]], "max-attempts")
        assert await store.requeue_dead(commands[1].id) == 1
        assert queued_ids(store.path) == [commands[3].id, commands[1].id]
        assert await store.requeue_dead("nope") == 0
        assert await store.requeue_dead() == 2
        assert set(queued_ids(store.path)) == {c.id for c in commands}
        assert (await store.stats()).dead == {}
        requeued = [c for c in await store.claim(10) if c.id == commands[1].id]
        assert requeued[0].attempts == 0

    async def test_purge_dead_keeps_the_queue_and_all_clears_everything(
            self, store: Store) -> None:
        commands = await store.put_many([NewCommand("d", str(i)) for i in range(4)])
        await store.dead_letter([commands[0].id], "invalid")
        await store.claim(1)
        assert await store.purge(queued=False) == 1
        assert (await store.stats()).depth == 3
        assert await store.purge(queued=True) == 3
        stats = await store.stats()
        assert (stats.depth, stats.bytes, stats.in_flight, stats.dead_total) == (0, 0, 0, 0)

    # ---- resume in flight

    async def test_a_drainer_reopening_puts_in_flight_back_first(self, store: Store) -> None:
        ids = [c.id for c in await store.put_many([NewCommand("d", str(i)) for i in range(5)])]
        await store.claim(2)
        later = await store.put("d", "later")
        store = await reopen(store)
        try:
            assert (await store.stats()).in_flight == 0
            assert [c.id for c in await store.claim(10)] == [*ids, later.id]
        finally:
            await store.close()

    async def test_a_producer_opening_leaves_in_flight_alone(self, store: Store) -> None:
        await store.put_many([NewCommand("d", str(i)) for i in range(3)])
        await store.claim(2)
        async with await Store.open(store.config, drainer=False) as producer:
            await producer.put("d", "from-cli")
            assert (await producer.stats()).in_flight == 2
        assert [c.name for c in await store.claim(10)] == ["2", "from-cli"]

    # ---- stats

    async def test_stats_count_depth_bytes_age_in_flight_and_dead(self, store: Store) -> None:
        empty = await store.stats()
        assert (empty.depth, empty.bytes, empty.oldest_age, empty.in_flight, empty.dead) == \
            (0, 0, None, 0, {})
        first = await store.put("d", "n", {"a": 1})
        await asyncio.sleep(0.05)
        await store.put_many([NewCommand("d", "n", {"bb": 22}), NewCommand("d", "n")])
        await store.claim(1)
        await store.dead_letter([first.id], "invalid")
        stats = await store.stats()
        assert stats.depth == 2
        assert stats.bytes == len('{"bb":22}') + len("{}")
        assert stats.in_flight == 0
        assert stats.oldest_age is not None and 0 <= stats.oldest_age < 60
        assert stats.as_dict()["dead"] == {"invalid": 1}
        count, size = raw_rows(store.path, "SELECT count(*), total(size) FROM outbox")[0]
        assert (stats.depth, stats.bytes) == (count, size)

    # ---- limits and overflow

    async def test_reject_policy_raises_queue_full_and_keeps_the_queue(
            self, store: Store) -> None:
        store = await reopen(store, max_commands=3, overflow="reject")
        try:
            kept = [c.id for c in await store.put_many([NewCommand("d", str(i))
                                                        for i in range(3)])]
            with pytest.raises(QueueFull, match="max_commands = 3"):
                await store.put("d", "one-too-many")
            with pytest.raises(QueueFull):
                await store.put_many([NewCommand("d", "x")])
            assert queued_ids(store.path) == kept
            assert (await store.stats()).dead == {}
        finally:
            await store.close()

    async def test_reject_policy_counts_bytes_too(self, store: Store) -> None:
        store = await reopen(store, max_bytes=1024, overflow="reject")
        try:
            await store.put("d", "n", {"v": "x" * 900})
            with pytest.raises(QueueFull, match="max_bytes = 1 KiB"):
                await store.put("d", "n", {"v": "x" * 200})
            assert (await store.stats()).depth == 1
        finally:
            await store.close()

    async def test_drop_oldest_dead_letters_and_warns(
            self, store: Store, caplog: pytest.LogCaptureFixture) -> None:
        store = await reopen(store, max_commands=3, overflow="drop-oldest")
        try:
            ids = [(await store.put("d", str(i))).id for i in range(3)]
            with caplog.at_level(logging.WARNING, logger="pigateway.store"):
                newest = await store.put("d", "3")
            assert queued_ids(store.path) == [*ids[1:], newest.id]
            [dead] = await store.list_dead()
            assert (dead.command.id, dead.reason) == (ids[0], "overflow")
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert any("overflow" in r.getMessage() for r in warnings)
        finally:
            await store.close()

    async def test_drop_oldest_holds_for_puts_that_share_a_commit(self, store: Store) -> None:
        store = await reopen(store, max_commands=3, overflow="drop-oldest")
        try:
            commands = await asyncio.gather(*(store.put("d", str(i)) for i in range(7)))
            assert [c.name for c in await store.list_queued()] == ["4", "5", "6"]
            dead = await store.list_dead()
            assert sorted(d.command.id for d in dead) == sorted(c.id for c in commands[:4])
            assert {d.reason for d in dead} == {"overflow"}
        finally:
            await store.close()

    async def test_a_command_bigger_than_max_bytes_drops_nothing(self, store: Store) -> None:
        store = await reopen(store, max_bytes=1024, overflow="drop-oldest")
        try:
            small = await store.put("d", "small")
            with pytest.raises(QueueFull, match="max_bytes = 1 KiB"):
                await store.put("d", "huge", {"v": "x" * 2000})
            assert queued_ids(store.path) == [small.id]
            assert (await store.stats()).dead == {}
        finally:
            await store.close()

    async def test_drop_oldest_never_drops_in_flight(self, store: Store) -> None:
        store = await reopen(store, max_commands=2, overflow="drop-oldest")
        try:
            await store.put_many([NewCommand("d", "a"), NewCommand("d", "b")])
            await store.claim(1)
            await store.put("d", "c")  # drops "b", the oldest one not in flight
            assert [c.name for c in await store.list_queued()] == ["a", "c"]
            await store.claim(1)
            with pytest.raises(QueueFull, match="in flight"):
                await store.put("d", "d")
            with pytest.raises(QueueFull):
                await store.put_many([NewCommand("d", str(i)) for i in range(3)])
            assert [c.name for c in await store.list_queued()] == ["a", "c"]
        finally:
            await store.close()

    # ---- also=, write, read

    async def test_also_runs_in_the_same_transaction(self, store: Store) -> None:
        await backdoor.write(store, [("CREATE TABLE notes (id TEXT PRIMARY KEY, text TEXT)", ())])
        command = await backdoor.put_with(store, "d", "n", also=[("INSERT INTO notes VALUES (?, ?)",
                                                   ("n1", "with the command"))])
        assert raw_rows(store.path, "SELECT * FROM notes") == [("n1", "with the command")]
        with pytest.raises(StoreError):
            await backdoor.put_with(store, "d", "m",
                                    also=[("INSERT INTO notes VALUES (?, ?)", ("n1", "dup"))])
        assert queued_ids(store.path) == [command.id]
        assert await backdoor.read(store, "SELECT count(*) FROM notes") == [(1,)]

    async def test_a_failing_also_fails_alone_in_a_shared_commit(self, store: Store) -> None:
        await backdoor.write(store, [("CREATE TABLE notes (id TEXT PRIMARY KEY)", ()),
                           ("INSERT INTO notes VALUES ('taken')", ())])
        outcomes = await asyncio.gather(
            backdoor.put_with(store, "d", "a", also=[("INSERT INTO notes VALUES (?)", ("a",))]),
            backdoor.put_with(store, "d", "b", also=[("INSERT INTO notes VALUES (?)", ("taken",))]),
            backdoor.put_with(store, "d", "c", also=[("INSERT INTO notes VALUES (?)", ("c",))]),
            return_exceptions=True)
        assert isinstance(outcomes[1], StoreError)
        assert [c.name for c in await store.list_queued()] == ["a", "c"]
        assert await backdoor.read(store, "SELECT id FROM notes ORDER BY id") == \
            [("a",), ("c",), ("taken",)]

    async def test_also_is_skipped_when_the_put_is_refused(self, store: Store) -> None:
        store = await reopen(store, max_commands=1, overflow="reject")
        try:
            await backdoor.write(store, [("CREATE TABLE notes (text TEXT)", ())])
            await store.put("d", "n")
            with pytest.raises(QueueFull):
                await backdoor.put_with(store, "d", "m",
                                        also=[("INSERT INTO notes VALUES (?)", ("x",))])
            assert await backdoor.read(store, "SELECT count(*) FROM notes") == [(0,)]
        finally:
            await store.close()

    async def test_write_is_one_transaction(self, store: Store) -> None:
        await backdoor.write(store, [("CREATE TABLE t (v INTEGER UNIQUE)", ())])
        with pytest.raises(StoreError):
            await backdoor.write(store, [("INSERT INTO t VALUES (?)", (1,)),
                               ("INSERT INTO t VALUES (?)", (1,))])
        assert await backdoor.read(store, "SELECT count(*) FROM t") == [(0,)]

    async def test_foreign_errors_do_not_escape(self, store: Store) -> None:
        with pytest.raises(StoreError) as caught:
            await backdoor.read(store, "SELECT * FROM no_such_table")
        assert isinstance(caught.value.__cause__, sqlite3.Error)

    # ---- waiting for work

    async def test_wait_for_work_wakes_on_a_put_here(self, store: Store) -> None:
        waiter = asyncio.create_task(store.wait_for_work(30))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        await store.put("d", "n")
        await asyncio.wait_for(waiter, 10)

    async def test_wait_for_work_times_out_when_nothing_happens(self, store: Store) -> None:
        started = time.monotonic()
        await store.wait_for_work(0.2)
        assert time.monotonic() - started >= 0.19

    async def test_wait_for_work_wakes_on_a_put_by_another_process(self, store: Store) -> None:
        waiter = asyncio.create_task(store.wait_for_work(60))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(HELPERS / "put_one.py"), str(store.path),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        assert child.returncode == 0
        await asyncio.wait_for(waiter, 20)
        assert queued_ids(store.path) == [out.decode().strip()]

    # ---- roles and locking

    async def test_a_producer_cannot_claim(self, store_config: StoreConfig) -> None:
        async with await Store.open(store_config, drainer=False) as producer:
            await producer.put("d", "n")
            with pytest.raises(StoreError, match="producer"):
                await producer.claim(1)

    async def test_a_second_drainer_is_refused_clearly(self, store: Store) -> None:
        with pytest.raises(StoreError, match="already draining"):
            await Store.open(store.config)
        async with await Store.open(store.config, drainer=False) as producer:
            await producer.put("d", "still-works")
        await store.close()
        async with await Store.open(store.config) as second:
            assert [c.name for c in await second.claim(5)] == ["still-works"]

    async def test_close_is_idempotent_and_a_closed_store_refuses(self, store: Store) -> None:
        await store.close()
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.put("d", "n")

    async def test_ping_answers(self, store: Store) -> None:
        await asyncio.wait_for(store.ping(), 10)

    # ---- migrations

    async def test_schema_is_at_the_newest_version(self, store: Store) -> None:
        assert raw_rows(store.path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
        assert raw_rows(store.path, "PRAGMA journal_mode") == [("wal",)]

    @pytest.mark.parametrize(("mode", "level"), [("full", 2), ("normal", 1)])
    async def test_synchronous_is_what_the_config_says(
            self, store_config: StoreConfig, mode: Literal["full", "normal"], level: int) -> None:
        config = store_config.replace(synchronous=mode, busy_timeout=2.5)
        async with await Store.open(config) as store:
            assert await backdoor.read(store, "PRAGMA synchronous") == [(level,)]
            assert await backdoor.read(store, "PRAGMA busy_timeout") == [(2500,)]

    async def test_an_old_schema_is_migrated_forward_keeping_rows(
            self, store_config: StoreConfig) -> None:
        with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
            conn.executescript(MIGRATIONS[0])
            conn.execute("INSERT INTO outbox (id, kind, device, name, params, size, queued_at) "
                         "VALUES ('OLD', 'action', 'd', 'n', '{}', 2, ?)", (time.time(),))
            conn.execute("PRAGMA user_version = 1")
            conn.commit()
        async with await Store.open(store_config) as store:
            assert [c.id for c in await store.claim(5)] == ["OLD"]
            assert await backdoor.read(store, "SELECT count(*) FROM inbox") == [(0,)]
        assert raw_rows(store_config.path, "PRAGMA user_version") == [(len(MIGRATIONS),)]

    async def test_a_newer_schema_is_refused_and_left_alone(
            self, store_config: StoreConfig) -> None:
        with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
            conn.execute("CREATE TABLE future (x)")
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
            conn.commit()
        with pytest.raises(StoreError, match="newer than this pigateway"):
            await Store.open(store_config)
        assert raw_rows(store_config.path, "PRAGMA user_version") == [(len(MIGRATIONS) + 5,)]
        assert raw_rows(store_config.path, "SELECT name FROM sqlite_master") == [("future",)]
        assert list(store_config.path.parent.glob("*.corrupt-*")) == []
        # the refused open released the drainer lock: a second try gives the same answer
        with pytest.raises(StoreError, match="newer than this pigateway"):
            await Store.open(store_config)
