"""Damage ``PRAGMA quick_check`` cannot see: an index that no longer matches its table.

The store finds a command by its id through the ``outbox.id`` index (ack, charge, release,
dead-letter, ``queue show``). A row whose index entry is gone (a torn write on an SD card,
a page of another version) is still claimed and sent by ``seq``, but its ack deletes
nothing: acknowledged by the broker, it would be sent again at every claim, forever, its
attempts never counted. The drainer's check at its open must find such a file, and
its quarantine keeps every row (read by rowid, the indexes rebuilt in the fresh file).
Real SQLite files; the damage is a real index page of the file in another state.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.errors import StoreCorrupt
from pigateway.store import NewCommand, Store, files

INDEX = "sqlite_autoindex_outbox_1"  # outbox.id UNIQUE


def index_pages(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [int(p) for (p,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? ORDER BY path", (INDEX,))]


def lose_an_index_entry(path: Path, seq: int) -> None:
    """The id index as it is in a copy where row ``seq`` has another id: the row's own
    entry is gone from the index, every page of the file is a sound b-tree page."""
    other = path.with_name("other.db")
    shutil.copy(path, other)
    with contextlib.closing(sqlite3.connect(other, isolation_level=None)) as conn:
        conn.execute("UPDATE outbox SET id = ? WHERE seq = ?", ("x" * 26, seq))
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = index_pages(path)
    assert pages == index_pages(other), "the copy's index moved"
    data = other.read_bytes()
    with path.open("r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * size)
            handle.write(data[(page - 1) * size:page * size])
    other.unlink()


async def test_an_index_that_lost_a_row_is_found_and_every_row_kept(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        put = await store.put_many([NewCommand(f"d{i % 3}", "set", {"i": i}) for i in range(40)])
    lose_an_index_entry(store_config.path, seq=10)
    assert files.check_integrity(store_config.path) is not None, \
        "the drainer's check took a file whose id index lost a row for a sound one"
    async with await Store.open(store_config) as store:
        claimed = await store.claim(100)
        assert sorted(c.id for c in claimed) == sorted(c.id for c in put)  # every row kept
        assert await store.ack([c.id for c in claimed], "b-1") == len(put)
        assert await store.list_queued(100) == []  # nothing acknowledged is sent again
    assert len(list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))) == 1


async def test_an_index_that_loses_a_row_while_the_service_runs_stops_it_at_the_ack(
        store_config: StoreConfig) -> None:
    """The same damage after the drainer's check (the SD card, while it runs): the ack of
    that row deleted nothing, silently, and it went out again at every claim. The ack
    says the store is corrupt instead (the service ends and its next start quarantines
    the file); nothing is deleted by it, and the next open keeps every row."""
    async with await Store.open(store_config) as store:
        put = await store.put_many([NewCommand(f"d{i % 3}", "set", {"i": i}) for i in range(40)])
        with contextlib.closing(sqlite3.connect(store_config.path, isolation_level=None)) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        lose_an_index_entry(store_config.path, seq=10)
        with contextlib.closing(sqlite3.connect(store_config.path, isolation_level=None)) as c:
            c.execute("BEGIN IMMEDIATE")  # a commit by another process: caches are read again
            c.execute("UPDATE totals SET commands = commands WHERE id = 1")
            c.execute("COMMIT")
        claimed = await store.claim(100)
        assert len(claimed) == len(put)
        with pytest.raises(StoreCorrupt, match="index"):
            await store.ack([c.id for c in claimed], "b-1")
    async with await Store.open(store_config) as store:
        assert sorted(c.id for c in await store.list_queued(100)) == sorted(c.id for c in put)
    assert len(list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))) == 1
