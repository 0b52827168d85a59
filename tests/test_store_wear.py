"""What the store asks the disk to write for a command, beyond its WAL: nothing.

An SD card wears by the bytes written to it. A command's rows reach the card through the
queue's WAL and, at a checkpoint, its database file; any other file SQLite writes on the
way (a statement's journal spilled to a temporary file: the pages an ack of 500 rows
changed, about 180 KB, written again) is wear for nothing. Measured with the kernel's own
count of the bytes this process caused to be written (``/proc/self/io``), on a real file.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store, schema
from pigateway.store.connection import connect

PARAMS = {"level": 80, "note": "x" * 180}
#: The kernel counts a write by the 4 KiB pages it dirties: the WAL's last page, shared
#: by two commits, and a log line's, may count once more than the WAL grew.
SLACK = 2 * 4096


def written() -> int:
    """Bytes this process caused to be written to storage (``write_bytes``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


def size(config: StoreConfig, suffix: str) -> int:
    """The size of the queue's ``-wal`` or ``-shm`` (the WAL's index, a shared mmap whose
    pages the kernel counts when a commit dirties them)."""
    beside = Path(f"{config.path}{suffix}")
    return beside.stat().st_size if beside.exists() else 0


async def test_an_ack_of_a_claim_writes_only_the_queues_own_files(
        store_config: StoreConfig) -> None:
    config = store_config
    async with await Store.open(config) as store:
        await store.put_many([NewCommand(f"dev-{n % 50}", "set", PARAMS) for n in range(3000)])
        with contextlib.closing(sqlite3.connect(config.path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        claimed = await store.claim(500)
        assert len(claimed) == 500
        os.sync()
        before, wal_before = written(), size(config, "-wal")
        assert await store.ack([command.id for command in claimed]) == 500
        os.sync()
        grew, index = size(config, "-wal") - wal_before, size(config, "-shm")
        spent = written() - before
    assert grew > 0, "the ack wrote no WAL frame: nothing was measured"
    assert spent <= grew + index + SLACK, (
        f"an ack of 500 caused {spent:,} bytes of writes where its WAL grew {grew:,} "
        f"(and its index is {index:,}): something besides the queue's own files was written")


def test_a_migration_keeps_its_statement_journal_on_disk_not_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration may rewrite every row of a backlog in one statement (migration 5 gives
    queued results their priority): its statement journal, the pages it changed, would be
    held in memory whole with the store's in-memory temp store (hundreds of MB on a Pi
    with 512 MB). Migrations run with a file temp store; the connection gets its own
    back after."""
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    probe = "CREATE TABLE probe AS SELECT temp_store FROM pragma_temp_store()"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, probe])
    conn = connect(config)
    try:
        schema.migrate(conn, config.path)
        during = conn.execute("SELECT temp_store FROM probe").fetchone()[0]
        after = conn.execute("PRAGMA temp_store").fetchone()[0]
    finally:
        conn.close()
    assert (during, after) == (1, 2), "1: FILE while migrating, 2: MEMORY after"


async def test_a_claim_marks_its_rows_in_flight_in_few_pages(store_config: StoreConfig) -> None:
    """A claim writes one mark per row (``inflight``: its seq, all the drainer needs; every
    row in flight is put back at a drainer's open); 500 marks fit in two pages, and the
    claim writes at most those, page 1 and a freelist page."""
    async with await Store.open(store_config) as store:
        await store.put_many([NewCommand(f"dev-{n % 50}", "set", PARAMS) for n in range(3000)])
        with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        assert len(await store.claim(500)) == 500
        frames = size(store_config, "-wal") // (2048 + 24)
    assert 0 < frames <= 4, f"a claim of 500 wrote {frames} WAL frames"
