"""Claims read on from where the last one ended, and still offer every unclaimed row in order.

The drainer's claim starts after the last row it claimed in each lane
(:mod:`pigateway.store.claims`) instead of reading again past every row in flight. These are
the ways such a cursor could skip a row, each against a real file: rows put back while later
ones stay in flight (a batch refused, a link lost), the queue drained and filled again (a
new row takes a seq freed below the cursor), the cursor's own row acked or dead-lettered,
and the lanes, whose rows share one seq order. In each the next claim must offer exactly
the rows not claimed, the ones put back first, in claim order.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.store import Command, NewCommand, Store
from pigateway.store.claims import Cursors
from pigateway.store.outbox import TIERS
from pigateway.store.schema import migrate
from pigateway.store.values import COMMAND_COLUMNS


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[Store]:
    async with await Store.open(store_config) as opened:
        yield opened


async def put(store: Store, count: int, priority: str | None = None) -> list[str]:
    commands = await store.put_many([NewCommand("valve", "set", {"n": n}, priority=priority)
                                     for n in range(count)])
    return [c.id for c in commands]


def ids(commands: list[Command]) -> list[str]:
    return [c.id for c in commands]


async def test_rows_put_back_while_later_ones_stay_in_flight_are_offered_first(
        store: Store) -> None:
    """A partial ack and a partial release (a batch refused for now while the batches
    claimed after it stay in flight): the next claim offers exactly the released rows, in
    put order, then the rows never claimed; never a row still in flight."""
    queued = await put(store, 10)
    assert ids(await store.claim(4)) == queued[:4]
    assert ids(await store.claim(3)) == queued[4:7]
    await store.ack([queued[0], queued[5]])
    await store.release([queued[4], queued[1]])
    assert ids(await store.claim(3)) == [queued[1], queued[4], queued[7]]
    assert ids(await store.claim(10)) == queued[8:]


async def test_rows_nacked_while_later_ones_stay_in_flight_are_offered_first(
        store: Store) -> None:
    queued = await put(store, 6)
    assert ids(await store.claim(6)) == queued
    await store.nack([queued[2], queued[3]], "refused for now")
    claimed = await store.claim(6)
    assert ids(claimed) == queued[2:4]
    assert [c.attempts for c in claimed] == [1, 1]


async def test_a_queue_drained_and_filled_again_is_claimed_from_its_new_rows(
        store: Store) -> None:
    """Every row acked: new rows take the seqs freed below the last one claimed."""
    first = await put(store, 5)
    await store.ack(ids(await store.claim(5)))
    again = await put(store, 3)
    assert ids(await store.claim(5)) == again
    assert first[0] not in again


async def test_rows_put_below_the_last_claimed_once_it_is_acked_are_claimed(
        store: Store, store_config: StoreConfig) -> None:
    """The last row claimed is acked while earlier ones stay in flight: a new row takes its
    seq, and one below it (a seq reused once the rows above it are gone)."""
    queued = await put(store, 6)
    freed = seqs(store_config.path, queued[3:5])
    assert ids(await store.claim(6)) == queued
    await store.ack(queued[3:])
    later = await put(store, 2)
    assert seqs(store_config.path, later) == freed
    assert ids(await store.claim(5)) == later


async def test_the_last_claimed_row_dead_lettered_leaves_no_row_behind(store: Store) -> None:
    queued = await put(store, 4)
    assert ids(await store.claim(4)) == queued
    await store.dead_letter([queued[3]], "rejected-by-broker", "refused for good")
    later = await put(store, 2)
    assert ids(await store.claim(5)) == later


async def test_a_seq_reused_in_another_lane_does_not_pass_for_the_last_claimed(
        store: Store) -> None:
    """The normal lane's last claimed row is acked; a normal row and then a high one are
    put, the high one into that row's very seq, and claimed first: the normal row below it
    is still offered."""
    queued = await put(store, 4)
    assert ids(await store.claim(4)) == queued
    await store.ack(queued[2:])
    normal = await put(store, 1)
    high = await put(store, 1, priority="high")
    assert ids(await store.claim(1)) == high
    assert ids(await store.claim(5)) == normal


async def test_each_lane_reads_on_from_its_own_last_row(store: Store) -> None:
    """High, normal and low rows interleaved in put order: claims in small steps take each
    lane in order, and a high row put meanwhile goes before the normal rows left."""
    low = await put(store, 3, priority="low")
    normal = await put(store, 3)
    high = await put(store, 2, priority="high")
    steps = [ids(await store.claim(2)) for _ in range(2)]
    assert steps == [high, normal[:2]]
    urgent = await put(store, 1, priority="high")
    assert ids(await store.claim(2)) == [*urgent, normal[2]]
    assert ids(await store.claim(5)) == low


async def test_a_new_drainer_offers_every_row_that_was_in_flight_first(
        store: Store, store_config: StoreConfig) -> None:
    queued = await put(store, 6)
    assert ids(await store.claim(4)) == queued[:4]
    await store.close()
    async with await Store.open(store_config) as again:
        assert ids(await again.claim(10)) == queued


def seqs(path: Path, command_ids: list[str]) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [conn.execute("SELECT seq FROM outbox WHERE id = ?", (i,)).fetchone()[0]
                for i in command_ids]


def test_a_claim_after_the_cursor_is_an_index_or_rowid_search(tmp_path: Path) -> None:
    """The claim that reads on from the cursor seeks to it (the table's rowid for the normal
    lane, the ``outbox_urgent`` index for the others): it does not scan past the rows in
    flight."""
    with contextlib.closing(sqlite3.connect(tmp_path / "q.db")) as conn:
        migrate(conn, tmp_path / "q.db")
        cursors = Cursors(COMMAND_COLUMNS, TIERS)
        plans = [" ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}",
                                                           (1, 1, 1)))
                 for sql in cursors._after]
    assert [("SCAN outbox" in plan) for plan in plans] == [False, False, False]
    assert "USING INTEGER PRIMARY KEY (rowid>?)" in plans[1]
    assert all("outbox_urgent (priority=? AND seq>?)" in plan for plan in (plans[0], plans[2]))


#: stored params no put writes: cut, an integer past Python's digit limit, nested past the
#: decoder's recursion limit, and JSON that is not an object
UNREADABLE = ['{bad', '{"v":1' + "0" * 5000 + "}", "[" * 100_000 + "]" * 100_000, "[1, 2]"]


@pytest.mark.parametrize("text", UNREADABLE, ids=["cut", "digits", "deep", "not-an-object"])
async def test_a_row_whose_params_cannot_be_read_is_buried_not_stalling_every_claim(
        store: Store, store_config: StoreConfig, text: str) -> None:
    """One row whose stored params no decoder reads (a flipped byte on a page SQLite reads
    without complaint, a salvaged or hand-edited file, an integer past Python's digit
    limit) is dead-lettered ``invalid`` by the claim that meets it; the other rows are
    claimed, and listings show the queue and the dead letter instead of raising."""
    bad = await store.put("a", "bad", {"v": 1})
    fine = await store.put("b", "fine")
    with sqlite3.connect(store_config.path) as conn:
        conn.execute("UPDATE outbox SET params = ? WHERE id = ?", (text, bad.id))
    assert [c.id for c in await store.list_queued(10)] == [bad.id, fine.id]
    assert [c.id for c in await store.claim(10)] == [fine.id]
    dead = await store.list_dead()
    assert [(d.command.id, d.reason) for d in dead] == [(bad.id, "invalid")]
    assert await store.claim(10) == []


@pytest.mark.parametrize("text", UNREADABLE, ids=["cut", "digits", "deep", "not-an-object"])
async def test_an_inbox_row_whose_params_cannot_be_read_does_not_stall_the_pending_scan(
        store: Store, store_config: StoreConfig, text: str) -> None:
    """As for the outbox: one inbound command whose stored params no decoder reads must not
    fail every read of the pending commands after it; it says why, as the outbox's dead
    letter does."""
    now = store.clock.now()
    for command_id in ("c-bad", "c-fine"):
        await store.inbox.receive(command_id, "dev", "set", {"v": 1}, expires_at=None,
                                  ttl=None, now=now, headroom=0)
    with sqlite3.connect(store_config.path) as conn:
        conn.execute("UPDATE inbox SET params = ? WHERE id = 'c-bad'", (text,))
    assert "c-fine" in [entry.id for entry in await store.inbox.pending(0, 10)]
    (bad,) = [entry for entry in await store.inbox.pending(0, 10) if entry.id == "c-bad"]
    assert bad.unreadable is not None and bad.params == {}
    await store.put("dev", "x")
    with sqlite3.connect(store_config.path) as conn:
        conn.execute("UPDATE outbox SET params = ?", (text,))
    assert await store.claim(10) == []
    (dead,) = await store.list_dead()
    assert dead.detail == f"its stored params cannot be read: {bad.unreadable}"
