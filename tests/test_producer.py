"""The producer without an event loop (``pigateway send``) and the async Store agree.

:class:`~pigateway.store.producer.Producer` is ``Store.open(config, drainer=False)``
without asyncio. Each test does the same thing both ways on real SQLite files and checks
that the outcomes are the same (rows, claims, errors and their messages), and that they
are what the contract says (a producer that did nothing would agree with nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, QueueFull, StoreConflict, StoreError, StoreFull
from pigateway.store import NewCommand, Store
from pigateway.store.delivery import KEY_SECONDS
from pigateway.store.producer import Producer
from pigateway.store.queue import POLL_INTERVAL
from test_store_faults import PAD, tmpfs

#: Columns of a queued row that do not depend on when or by whom it was put.
ROW = "kind, device, name, params, size, ttl, priority, attempts, last_error"

Refusal = tuple[type[BaseException], str]


def raw_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file with a connection of our own, independent of both."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def produced(config: StoreConfig, *args: Any, **kwargs: Any) -> Any:
    """``Producer.put(*args, **kwargs)`` on a producer of its own."""
    with Producer.open(config) as producer:
        return producer.put(*args, **kwargs)


async def stored(config: StoreConfig, *args: Any, **kwargs: Any) -> Any:
    """``Store.put(*args, **kwargs)`` on a producer Store of its own."""
    async with await Store.open(config, drainer=False) as store:
        return await store.put(*args, **kwargs)


def refused(call: Callable[[], Any]) -> Refusal:
    with pytest.raises(Exception) as caught:
        call()
    return type(caught.value), str(caught.value)


async def refused_async(call: Callable[[], Awaitable[Any]]) -> Refusal:
    with pytest.raises(Exception) as caught:
        await call()
    return type(caught.value), str(caught.value)


# --------------------------------------------------------------------------- open


async def test_both_make_the_same_file(tmp_path: Path) -> None:
    """Same schema, same version, same pragmas, the same clock row (this boot's reading)."""
    ours, theirs = (StoreConfig(path=tmp_path / name / "queue.db", min_free_bytes=0)
                    for name in ("producer", "store"))
    Producer.open(ours).close()
    await (await Store.open(theirs, drainer=False)).close()

    def shape(path: Path) -> list[Any]:
        return [raw_rows(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name"),
                *(raw_rows(path, f"PRAGMA {name}")
                  for name in ("user_version", "journal_mode", "page_size")),
                raw_rows(path, "SELECT boot_id, synced FROM clock")]
    assert shape(ours.path) == shape(theirs.path)
    assert raw_rows(ours.path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_rows(ours.path, "PRAGMA page_size") == [(2048,)]
    assert not list(ours.path.parent.glob("*.lock")), "a producer takes no drainer lock"


async def test_a_folder_neither_can_use_is_the_same_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    config = StoreConfig(path=tmp_path / "a-file" / "queue.db", min_free_bytes=0)
    mine = refused(lambda: Producer.open(config))
    assert mine == await refused_async(lambda: Store.open(config, drainer=False))
    assert mine[0] is StoreError and "cannot use" in mine[1]


@pytest.mark.parametrize("damage", ["not-a-database", "bad-schema"])
async def test_a_corrupt_file_is_refused_alike_and_left_alone(store_config: StoreConfig,
                                                              damage: str) -> None:
    produced(store_config, "d", "n")
    path = store_config.path
    if damage == "not-a-database":
        path.write_text("[store]\n" * 500)
    else:  # a sound header over a garbage schema: only the connection finds out
        with path.open("r+b") as handle:
            handle.seek(100)
            handle.write(b"\xde\xad\xbe\xef" * 400)
    before = path.read_bytes()
    mine = refused(lambda: Producer.open(store_config))
    assert mine == await refused_async(lambda: Store.open(store_config, drainer=False))
    assert mine[0].__name__ == "StoreCorrupt" and str(path) in mine[1]
    assert path.read_bytes() == before
    assert list(path.parent.glob("queue.db.corrupt-*")) == []


# --------------------------------------------------------------------------- put


@pytest.mark.parametrize("put", [
    {"device": "pump-1", "name": "start", "params": {"speed": 3, "mode": "eco"}},
    {"device": "lamp", "name": "on", "ttl": 60, "priority": "high"},
    {"device": "lamp", "name": "off", "ttl": 0, "priority": "low", "watch": True},
    {"device": "gw", "name": "result", "params": {"status": "ok"}, "kind": "result"},
], ids=["params", "ttl-high", "forever-low-watched", "result"])
async def test_a_put_is_claimed_as_the_store_would_have_put_it(
        store_config: StoreConfig, put: dict[str, Any]) -> None:
    mine = produced(store_config, **put)
    theirs = await stored(store_config, **put)
    rows = raw_rows(store_config.path, f"SELECT {ROW} FROM outbox ORDER BY seq")
    assert len(rows) == 2 and rows[0] == rows[1]
    async with await Store.open(store_config) as drainer:
        claimed = {c.id: c for c in await drainer.claim(10)}
    assert set(claimed) == {mine.id, theirs.id}
    assert claimed[mine.id]._replace(seq=0) == mine
    for command, other in ((mine, theirs), (theirs, mine)):
        assert command._replace(id="", queued_at=0, expires_at=None) == \
            other._replace(id="", queued_at=0, expires_at=None)
        if put.get("ttl", 1) > 0:  # on the gateway clock, which started on the wall clock
            assert command.expires_at is not None
            assert command.expires_at - command.queued_at == pytest.approx(
                put.get("ttl", store_config.default_ttl), abs=1)
        else:
            assert command.expires_at is None
    watched = raw_rows(store_config.path, "SELECT id FROM watched ORDER BY id")
    assert watched == ([(i,) for i in sorted((mine.id, theirs.id))] if put.get("watch")
                       else [])


async def test_where_reads_every_state_as_the_store_does(store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        queued = [await store.put("d", f"n{n}", watch=True) for n in range(3)]
        urgent = await store.put("d", "urgent", priority="high", watch=True)
        [flying] = await store.claim(1)
        delivered = (await store.put("e", "ack", watch=True)).id
        dead = (await store.put("f", "dead", watch=True)).id
        await store.claim(100)
        await store.ack([delivered], batch="BATCH-1")
        await store.dead_letter([dead], "rejected-by-broker", "the broker said no")
        await store.release([c.id for c in queued])
        ids = [c.id for c in queued] + [flying.id, delivered, dead, "01NOPE"]
        theirs = [await store.where(i) for i in ids]
        with Producer.open(store_config) as producer:
            mine = [producer.where(i) for i in ids]
    assert mine == theirs
    assert flying.id == urgent.id
    # the urgent one, in flight, is still ahead of them in claim order
    assert [(w.state, w.position) for w in mine[:3]] == [("queued", 1), ("queued", 2),
                                                         ("queued", 3)]
    assert [w.state for w in mine[3:]] == ["in-flight", "delivered", "dead", "unknown"]
    assert (mine[4].batch, mine[5].reason, mine[5].detail) == (
        "BATCH-1", "rejected-by-broker", "the broker said no")


async def test_a_producer_key_holds_across_both(store_config: StoreConfig) -> None:
    with Producer.open(store_config) as producer:
        first, first_id = producer.put_keyed("k-1", NewCommand("lamp", "on"))
    assert first is not None and first.id == first_id
    async with await Store.open(store_config, drainer=False) as store:
        assert await store.put_keyed("k-1", NewCommand("lamp", "off")) == (None, first_id)
        other, other_id = await store.put_keyed("k-2", NewCommand("lamp", "on"))
        assert other is not None
    with Producer.open(store_config) as producer:
        assert producer.put_keyed("k-1", NewCommand("lamp", "x")) == (None, first_id)
        assert producer.put_keyed("k-2", NewCommand("lamp", "x")) == (None, other_id)
        assert producer.where(first_id).state == "queued", "a keyed put is watched"
    assert [row[0] for row in raw_rows(store_config.path, "SELECT name FROM outbox")] == \
        ["on", "on"]
    with contextlib.closing(sqlite3.connect(store_config.path)) as conn, conn:
        conn.execute("UPDATE producer_keys SET at = at - ?", (KEY_SECONDS + 1,))
    with Producer.open(store_config) as producer:  # past the window: a new command
        again, again_id = producer.put_keyed("k-1", NewCommand("lamp", "again"))
    assert again is not None and again_id not in (first_id, other_id)
    async with await Store.open(store_config, drainer=False) as store:
        assert await store.put_keyed("k-1", NewCommand("lamp", "y")) == (None, again_id)


# --------------------------------------------------------------------------- refusals


async def refusals(config: StoreConfig, put: dict[str, Any]) -> tuple[Refusal, Refusal]:
    """The same put refused by both: the producer's refusal and the Store's; neither may
    change the queue."""
    Producer.open(config).close()  # the file, for a first put refused
    before = raw_rows(config.path, "SELECT id FROM outbox ORDER BY seq")
    mine = refused(lambda: produced(config, **put))
    theirs = await refused_async(lambda: stored(config, **put))
    assert raw_rows(config.path, "SELECT id FROM outbox ORDER BY seq") == before
    return mine, theirs


@pytest.mark.parametrize(("limits", "queued", "put", "expected"), [
    ({"max_commands": 2}, 2, {}, (QueueFull, "max_commands = 2")),
    ({"max_bytes": 1024}, 1, {"params": {"v": "x" * 200}}, (QueueFull, "max_bytes = 1 KiB")),
    ({"max_params_bytes": 64}, 0, {"params": {"v": "x" * 100}},
     (InvalidCommand, "store.max_params_bytes")),
    ({}, 0, {"device": ""}, (InvalidCommand, "device")),
    ({}, 0, {"device": "lamp\x1b[31m"}, (InvalidCommand, "control character")),
    ({}, 0, {"ttl": -1}, (InvalidCommand, "ttl")),
    ({}, 0, {"priority": "urgent"}, (InvalidCommand, "priority")),
    ({}, 0, {"params": {"x": float("nan")}}, (InvalidCommand, "params")),
    ({}, 1, {"id": "TAKEN"}, (StoreConflict, "UNIQUE constraint failed: outbox.id")),
], ids=["max-commands", "max-bytes", "max-params-bytes", "empty-device", "control-char",
        "ttl", "priority", "not-json", "duplicate-id"])
async def test_a_refused_put_is_refused_alike(
        store_config: StoreConfig, limits: dict[str, Any], queued: int, put: dict[str, Any],
        expected: tuple[type[Exception], str]) -> None:
    config = store_config.replace(overflow="reject", **limits)
    for n in range(queued):
        produced(config, "d", f"q{n}", {"v": "x" * 900} if "max_bytes" in limits else {},
                 id="TAKEN" if n == 0 else None)
    mine, theirs = await refusals(config, {"device": "d", "name": "n", **put})
    assert mine == theirs
    kind, needle = expected
    assert mine[0] is kind and needle in mine[1]


async def test_every_queued_command_in_flight_is_refused_alike(
        store_config: StoreConfig) -> None:
    config = store_config.replace(max_commands=2, overflow="drop-oldest")
    async with await Store.open(config) as drainer:
        await drainer.put_many([NewCommand("d", "a"), NewCommand("d", "b")])
        assert len(await drainer.claim(10)) == 2
        mine, theirs = await refusals(config, {"device": "d", "name": "c"})
    assert mine == theirs
    assert mine[0] is QueueFull and "every queued command is in flight" in mine[1]


async def test_the_disk_guard_refuses_alike(store_config: StoreConfig) -> None:
    config = store_config.replace(min_free_bytes=2 ** 62)
    (mine, mine_text), (theirs, theirs_text) = await refusals(
        config, {"device": "d", "name": "n"})
    assert mine is theirs is StoreFull
    free = re.compile(r"only [\d.]+ [KMGT]?i?B")  # what is free moves with the rest of the disk
    assert free.sub("only N", mine_text) == free.sub("only N", theirs_text)
    assert "store.min_free_bytes = 4194304 TiB" in mine_text
    assert str(config.path.parent) in mine_text


async def test_drop_oldest_drops_the_same_rows_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The lowest priority goes first, the oldest within it; one warning line each."""
    puts = [("a", "normal"), ("b", "low"), ("c", "high"), ("d", "low")]
    outcome = []
    for name in ("producer", "store"):
        config = StoreConfig(path=tmp_path / name / "queue.db", min_free_bytes=0,
                             max_commands=3, overflow="drop-oldest")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pigateway.store"):
            for command, priority in puts:
                if name == "producer":
                    produced(config, "dev", command, priority=priority)
                else:
                    await stored(config, "dev", command, priority=priority)
        outcome.append((
            raw_rows(config.path, "SELECT name FROM outbox ORDER BY seq"),
            raw_rows(config.path, "SELECT name, reason, detail FROM dead_letters"),
            [r.getMessage() for r in caplog.records if r.name == "pigateway.store"]))
    assert outcome[0] == outcome[1]
    queued, dead, said = outcome[0]
    assert queued == [("a",), ("c",), ("d",)]
    assert dead == [("b", "overflow", "dropped to make room (store.overflow = drop-oldest)")]
    assert len(said) == 1 and "dead-lettered 1 command: overflow" in said[0]


@pytest.mark.root
async def test_a_full_disk_refuses_alike_and_the_producer_recovers(tmp_path: Path) -> None:
    """SQLite's own SQLITE_FULL on a real tmpfs: refused alike, the queue kept, and the
    producer takes puts again once space returns (its WAL is handed back first)."""
    with tmpfs(tmp_path / "small", "4m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1024 * 1024))
        config = StoreConfig(path=disk / "queue.db", min_free_bytes=0)
        queued = []
        with Producer.open(config) as producer, pytest.raises(StoreFull) as full:
            for n in range(5000):
                queued.append(producer.put("d", "fill", {"n": n, "pad": PAD}).id)
        assert 100 < len(queued) < 5000 and "is full" in str(full.value)
        put = {"device": "d", "name": "refused", "params": {"pad": PAD}}
        mine, theirs = await refusals(config, put)
        assert mine == theirs and mine[0] is StoreFull
        filler.unlink()
        with Producer.open(config) as producer:
            queued.append(producer.put("d", "after", {"pad": PAD}).id)
        assert [row[0] for row in raw_rows(config.path, "SELECT id FROM outbox ORDER BY seq")] \
            == queued
        assert raw_rows(config.path, "PRAGMA integrity_check") == [("ok",)]


# --------------------------------------------------------------------------- the service


async def test_the_busy_timeout_waits_out_a_lock_and_a_longer_one_is_refused_alike(
        store_config: StoreConfig) -> None:
    config = store_config.replace(busy_timeout=0.5)
    Producer.open(config).close()  # the file, and this boot's clock row: an open writes none
    locker = sqlite3.connect(config.path, isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, locker.execute, ("COMMIT",)).start()
        started = time.monotonic()
        command = produced(config, "d", "waited")
        assert 0.25 < time.monotonic() - started < 5
        locker.execute("BEGIN IMMEDIATE")  # held past busy_timeout this time
        mine, theirs = await refusals(config, {"device": "d", "name": "refused"})
        locker.execute("COMMIT")
    finally:
        locker.close()
    assert mine == theirs
    assert mine[0] is StoreError and "stayed locked by another process" in mine[1]
    assert raw_rows(config.path, "SELECT id FROM outbox") == [(command.id,)]


async def test_a_producers_put_wakes_the_drain_within_a_poll(store_config: StoreConfig) -> None:
    """The drainer notices another connection's commit through PRAGMA data_version."""
    async with await Store.open(store_config) as drainer:
        waiting = asyncio.create_task(drainer.wait_for_work(30))
        await asyncio.sleep(4 * POLL_INTERVAL)
        assert not waiting.done(), "woken with nothing put"
        command = await asyncio.to_thread(produced, store_config, "d", "wake")
        put_at = time.monotonic()
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - put_at < 1.0
        assert [c.id for c in await drainer.claim(10)] == [command.id]


def test_a_new_command_is_an_immutable_value_with_params_of_its_own() -> None:
    first, second = NewCommand("pump", "start"), NewCommand("pump", "start")
    assert first == second and first.params == {} and first.params is not second.params
    assert first != NewCommand("pump", "stop") and first != ("pump", "start")
    with pytest.raises(AttributeError):
        first.device = "valve"  # type: ignore[misc]
    keyed = first._replace(id="k-1", priority="high")
    assert (keyed.id, keyed.priority, keyed.device, first.id) == ("k-1", "high", "pump", None)
    assert repr(keyed).startswith("NewCommand(device='pump', name='start', params={}")
