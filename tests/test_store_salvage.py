"""A quarantine salvages: whatever the drainer moves aside, every row it can still read is
in the fresh queue first, and it says how many it could not read. Real SQLite files with
a real damaged page (one b-tree leaf overwritten, found with SQLite's own ``dbstat``).

Nothing acknowledged may be left behind: a ``pigateway send`` into a file with one bad
page and a sound header prints its id (its rows are on sound pages), so the next start
must not move those rows aside with the file: every printed id is in the fresh queue.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from harness import backdoor
from pigateway.config import StoreConfig
from pigateway.errors import StoreCorrupt
from pigateway.store import NewCommand, Store, files
from pigateway.store.producer import Producer
from pigateway.store.schema import MIGRATIONS
from test_store_versions import make_version_4_backlog


def leaf_pages(path: Path, table: str) -> list[tuple[int, int]]:
    """(page number, rows on it) of every leaf of ``table``, in key order."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [(int(page), int(cells)) for page, cells in conn.execute(
            "SELECT pageno, ncell FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
            "ORDER BY path", (table,))]


def spoil_page(path: Path, page: int) -> None:
    """Overwrite one page with bytes no b-tree accepts (the file's header stays sound)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    assert page > 1, "page 1 holds the header"
    with path.open("r+b") as handle:
        handle.seek((page - 1) * size)
        handle.write(b"\xde\xad\xbe\xef" * (size // 4))


def spoil_a_middle_leaf(path: Path, table: str) -> int:
    """Spoil a leaf of ``table`` in the middle of it; the rows that were on it."""
    leaves = leaf_pages(path, table)
    assert len(leaves) >= 3, leaves
    page, cells = leaves[len(leaves) // 2]
    spoil_page(path, page)
    assert files.check_integrity(path) is not None
    return cells


async def make_queue(config: StoreConfig, count: int) -> list[str]:
    async with await Store.open(config) as store:
        puts = await store.put_many([NewCommand(f"d{i % 7}", "set", {"i": i, "pad": "p" * 150})
                                     for i in range(count)])
    return [c.id for c in puts]


async def all_queued(store: Store) -> list[str]:
    return [c.id for c in await store.list_queued(100_000)]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_quarantine_salvages_every_readable_row_and_says_how_many_it_could_not(
        store_config: StoreConfig, caplog: pytest.LogCaptureFixture) -> None:
    ids = await make_queue(store_config, 600)
    async with await Store.open(store_config) as store:
        await store.dead_letter(ids[:5], "max-attempts", "kept as a dead letter")
        keyed, key_id = await store.put_keyed("k-1", NewCommand("lamp", "on", {}))
        assert keyed is not None
        watched = await store.put("lamp", "watched", priority="high", watch=True)
        [claimed] = await store.claim(1)
        assert claimed.id == watched.id
        await store.ack([claimed.id], "batch-1")  # a delivery record
        await store.inbox.receive("in-1", "lamp", "on", {}, expires_at=None, ttl=None,
                                  now=time.time(), headroom=0)
    lost = spoil_a_middle_leaf(store_config.path, "outbox")
    with caplog.at_level(logging.INFO, logger="pigateway.store"):
        async with await Store.open(store_config) as store:
            queued = await all_queued(store)
            counted = (await store.stats()).depth  # the copy's totals, rebuilt from its rows
            dead = {d.command.id for d in await store.list_dead(100)}
            assert (await store.where(key_id)).state == "queued"
            assert (await store.where(watched.id)).state == "delivered"
            assert await backdoor.read(store, "SELECT id FROM inbox") == [("in-1",)]
            assert (await store.put_keyed("k-1", NewCommand("lamp", "on", {}))) == (None, key_id)
    expected = 600 - 5 + 1 - lost
    assert len(queued) == expected and key_id in queued
    assert counted == expected
    assert dead == set(ids[:5])
    assert len(list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))) == 1
    said = " ".join(warnings(caplog))
    assert f"salvaged {expected} commands" in said, said
    assert f"could not read {lost} commands" in said, said


async def test_the_ids_sends_printed_into_a_file_with_one_bad_page_survive_its_quarantine(
        store_config: StoreConfig) -> None:
    """Every id printed is queued after the next start, none left behind in
    queue.db.corrupt-*."""
    await make_queue(store_config, 300)
    spoil_a_middle_leaf(store_config.path, "outbox")
    printed = []
    for n in range(9):  # pigateway send: the header is sound, its rows go to sound pages
        with Producer.open(store_config) as producer:
            printed.append(producer.put("lamp", f"on-{n}").id)
    async with await Store.open(store_config) as store:
        queued = set(await all_queued(store))
    assert set(printed) <= queued


async def test_a_producer_open_before_the_quarantine_cannot_commit_into_the_moved_file(
        store_config: StoreConfig) -> None:
    """A send that opened the bad file before the service moved it aside would commit into
    queue.db.corrupt-* and print an id nobody will ever drain."""
    await make_queue(store_config, 300)
    spoil_a_middle_leaf(store_config.path, "outbox")
    with Producer.open(store_config) as early:
        async with await Store.open(store_config):
            pass
        with pytest.raises(StoreCorrupt, match="moved aside"):
            early.put("lamp", "on")


async def test_an_interrupted_quarantine_is_finished_at_the_next_start_and_refused_meanwhile(
        store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await make_queue(store_config, 300)
    lost = spoil_a_middle_leaf(store_config.path, "outbox")

    def power_cut(path: Path, why: str) -> Path:
        raise RuntimeError("the power went")
    with monkeypatch.context() as patch:
        patch.setattr(files, "quarantine", power_cut)
        with pytest.raises(RuntimeError):
            await Store.open(store_config)
    with pytest.raises(StoreCorrupt, match="service"):
        Producer.open(store_config)
    async with await Store.open(store_config) as store:
        queued = await all_queued(store)
    assert len(queued) == 300 - lost and set(queued) <= set(ids)
    assert len(list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))) == 1
    with Producer.open(store_config) as producer:
        producer.put("lamp", "after")


async def test_a_file_nothing_can_be_read_from_says_so(
        store_config: StoreConfig, caplog: pytest.LogCaptureFixture) -> None:
    store_config.path.write_text("not a queue\n" * 100)
    with caplog.at_level(logging.INFO, logger="pigateway.store"):
        async with await Store.open(store_config) as store:
            assert await all_queued(store) == []
    assert any("could not read" in m and "salvaged 0" in m for m in warnings(caplog))


async def test_a_damaged_table_without_rowids_is_read_from_both_ends(
        store_config: StoreConfig, caplog: pytest.LogCaptureFixture) -> None:
    """Producer keys (a WITHOUT ROWID table): every key on a sound page survives, so a
    retried ``send --id`` of those still queues nothing."""
    async with await Store.open(store_config) as store:
        for n in range(250):
            await store.put_keyed(f"key-{n:04}", NewCommand("lamp", "on", {"pad": "k" * 40}))
    lost = spoil_a_middle_leaf(store_config.path, "producer_keys")
    with caplog.at_level(logging.INFO, logger="pigateway.store"):
        async with await Store.open(store_config) as store:
            kept = [n for n in range(250) if (await store.put_keyed(
                f"key-{n:04}", NewCommand("lamp", "on", {})))[0] is None]
    assert len(kept) == 250 - lost
    assert kept[0] == 0 and kept[-1] == 249
    assert any("1 damaged stretch of producer keys" in m for m in warnings(caplog))


async def test_a_damaged_file_of_an_older_schema_is_salvaged_and_then_migrated(
        store_config: StoreConfig) -> None:
    """The copy is made at the damaged file's own version; the open migrates it on."""
    config = store_config.replace(max_commands=10_000)
    make_version_4_backlog(config, 300)
    lost = spoil_a_middle_leaf(config.path, "outbox")
    async with await Store.open(config) as store:
        assert (await store.stats()).depth == 300 - lost
        urgent = await backdoor.read(store, "SELECT count(*) FROM outbox WHERE priority = 0")
    with contextlib.closing(sqlite3.connect(config.path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert 0 < urgent[0][0] <= 30  # the results among what was read: migration 5 ran on it
