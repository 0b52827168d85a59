"""Schema versions across package versions, on real SQLite files.

A downgrade (a file a newer pigateway migrated, opened by an older package) is refused by
every opener with a typed error that names both versions, and the file is left exactly as
it is: never migrated, quarantined or salvaged. An upgrade of a large backlog through the
migrations keeps every row and its memory flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import Run
from harness import backdoor, gateway
from harness.service import environment
from pigateway.config import StoreConfig
from pigateway.errors import NewerSchema, StoreFull
from pigateway.store import QueueReader, Store, schema
from pigateway.store.connection import connect
from pigateway.store.producer import Producer
from pigateway.store.schema import MIGRATIONS
from test_store_faults import tmpfs

KNOWN = len(MIGRATIONS)


def as_a_newer_pigateway_left_it(path: Path) -> None:
    """The file after a future migration this code does not know (a column, a version)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE outbox ADD COLUMN shard INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"PRAGMA user_version = {KNOWN + 1}")
        conn.commit()


async def test_a_file_from_a_newer_pigateway_is_refused_by_every_opener_naming_both_versions(
        store_config: StoreConfig) -> None:
    with Producer.open(store_config) as producer:
        queued = producer.put("lamp", "on").id
    as_a_newer_pigateway_left_it(store_config.path)
    before = store_config.path.read_bytes()
    openers = {
        "producer": lambda: asyncio.to_thread(Producer.open, store_config),
        "drainer": lambda: Store.open(store_config),
        "other store": lambda: Store.open(store_config, drainer=False),
        "reader": lambda: QueueReader.open(store_config),
    }
    for name, opener in openers.items():
        with pytest.raises(NewerSchema) as refused:
            await opener()
        assert (refused.value.found, refused.value.known) == (KNOWN + 1, KNOWN), name
        said = str(refused.value)
        assert f"version {KNOWN + 1}" in said and f"({KNOWN})" in said, said
        assert "reinstall the newer pigateway" in said, said
    assert store_config.path.read_bytes() == before
    assert list(store_config.path.parent.glob("queue.db.*corrupt*")) == []
    with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
        assert conn.execute("SELECT id FROM outbox").fetchall() == [(queued,)]


#: sysexits(3) EX_DATAERR: the queue file is one this package cannot use
NEWER_QUEUE_EXIT = 65


def test_a_downgraded_service_stops_once_saying_why_and_is_not_restarted(
        tmp_path: Path, cli: Run) -> None:
    """``pigateway run`` on a queue a newer package migrated exits with a status the unit
    does not restart on (exit 1 was restarted every 5 s forever, saying it each time), its
    one line at crit naming the file, both versions and what to do; ``send`` exits the same
    (not 1, "failed": trying again later will not help), and the file is left as it is."""
    config = gateway.write(tmp_path / "config.toml", gateway.settings(
        tmp_path, gateway_id="gw-downgraded", gpio={"enabled": False}))
    db = tmp_path / "queue.db"
    with Producer.open(StoreConfig(path=db, min_free_bytes=0)) as producer:
        producer.put("lamp", "on")
    as_a_newer_pigateway_left_it(db)
    before = db.read_bytes()

    run = subprocess.run([sys.executable, "-m", "pigateway", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=environment(),
                         check=False)
    code, out, err = cli("send", "--config", str(config), "--device", "d", "--command", "c")

    assert run.returncode == NEWER_QUEUE_EXIT, run.stderr[-600:]
    unit = (Path(__file__).parents[1] / "systemd" / "pigateway.service").read_text()
    prevented = {word for line in unit.splitlines()
                 if line.startswith("RestartPreventExitStatus=")
                 for word in line.partition("=")[2].split()}
    assert str(NEWER_QUEUE_EXIT) in prevented
    said = [line for line in run.stderr.splitlines() if "CRITICAL" in line]
    assert len(said) == 1, run.stderr[-600:]
    for words in (str(db), f"version {KNOWN + 1}", f"({KNOWN})", "restore",
                  "systemctl restart pigateway"):
        assert words in said[0], (words, said[0])
    assert (code, out) == (NEWER_QUEUE_EXIT, "")
    assert f"version {KNOWN + 1}" in err, err
    assert db.read_bytes() == before


# --------------------------------------------------------------------------- a big upgrade

#: Rows of the pytest-sized backlog. By hand, 1,000,000 rows (10% results, ~250 MB file) on
#: this machine: open (quick_check and migrations 5-7) 3.5 s, RSS flat (27.8 -> 32 MB), and
#: a peak WAL of 208 MB: migration 5's UPDATE of the results' priority rewrites nearly every
#: page of the outbox in its one transaction (see docs/store.md, "Upgrades").
ROWS = 50_000


def make_version_4_backlog(config: StoreConfig, rows: int) -> None:
    """A queue file as pigateway with schema 4 left it after a long outage."""
    conn = connect(config)
    with contextlib.closing(conn):
        schema.migrate(conn, config.path, upto=4)
        now = time.time()
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO outbox (id, kind, device, name, params, size, queued_at, expires_at, "
            "ttl) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 0)",
            ((f"id{i:08}", "result" if i % 10 == 0 else "action", f"d{i % 50}", "set",
              '{"pad":"' + "p" * 150 + '"}', 160, now) for i in range(rows)))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def test_a_large_backlog_upgrades_through_the_migrations_with_every_row_and_flat_memory(
        tmp_path: Path) -> None:
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0,
                         max_commands=10 * ROWS, max_bytes=1 << 34)
    make_version_4_backlog(config, ROWS)
    size = config.path.stat().st_size
    peak = [0]
    done = threading.Event()

    def watch_wal() -> None:
        wal = Path(f"{config.path}-wal")
        while not done.wait(0.005):
            with contextlib.suppress(FileNotFoundError):
                peak[0] = max(peak[0], wal.stat().st_size)
    watcher = threading.Thread(target=watch_wal)
    watcher.start()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        async with await Store.open(config) as store:
            took = time.monotonic() - started
            stats = await store.stats()
            urgent = await backdoor.read(store, "SELECT count(*) FROM outbox WHERE priority = 0")
    finally:
        done.set()
        watcher.join()
    assert stats.depth == ROWS and urgent == [(ROWS // 10,)]
    assert took < 30, took
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss  # KiB
    assert grew < 64 * 1024, f"memory grew by {grew} KiB for a {size} byte file"
    # the one transaction of migration 5 writes about the whole outbox to the WAL
    assert peak[0] < 1.2 * size, (peak[0], size)


@pytest.mark.root
async def test_an_upgrade_without_room_for_its_wal_is_refused_and_keeps_the_file(
        tmp_path: Path) -> None:
    """Migration 5 needs free space about the size of the outbox (its one transaction);
    without it the start is refused as a full disk, nothing is lost, and it upgrades once
    space returns."""
    with tmpfs(tmp_path / "small", "8m") as disk:
        config = StoreConfig(path=disk / "queue.db", min_free_bytes=0)
        make_version_4_backlog(config, 15_000)  # ~4 MB: its WAL cannot fit beside it
        filler = disk / "filler"
        with contextlib.suppress(OSError):
            filler.write_bytes(b"\0" * (8 << 20))
        with pytest.raises(StoreFull):
            await Store.open(config)
        filler.unlink()
        with contextlib.closing(sqlite3.connect(config.path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (4,)
            assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (15_000,)
        assert list(disk.glob("queue.db.*corrupt*")) == []
        async with await Store.open(config) as store:
            assert (await store.stats()).depth == 15_000
