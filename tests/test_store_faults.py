"""Faults of the disk under the store: a corrupt, truncated or foreign file, and a full disk.

A gateway must keep working when its queue file is damaged (the file is moved aside, with
its bytes, and a fresh queue starts) and must refuse new commands, keeping the old ones,
when its disk fills up, recovering by itself when space returns. The full disk is a real
one: a 4 MiB tmpfs mounted by the test (root only; skipped with a reason otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.errors import StoreCorrupt, StoreError, StoreFull
from pigateway.store import NewCommand, Store
from pigateway.store.schema import MIGRATIONS

PAGE = 4096
GARBAGE = b"\xde\xad\xbe\xef" * (PAGE // 2)  # two pages whose headers no b-tree accepts


async def make_queue(config: StoreConfig, count: int = 3000) -> None:
    async with await Store.open(config) as store:
        await store.put_many([NewCommand(f"d{i % 7}", "set", {"i": i, "pad": "p" * 200})
                              for i in range(count)])


def garbage_in_the_middle(path: Path) -> None:
    middle = (path.stat().st_size // 2) // PAGE * PAGE
    with path.open("r+b") as handle:
        handle.seek(middle)
        handle.write(GARBAGE)


def truncated(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 3)


def truncated_inside_the_header(path: Path) -> None:
    os.truncate(path, 60)


def not_a_database(path: Path) -> None:
    path.write_text("[store]\npath = 'this is a config file, not a queue'\n" * 50)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage": garbage_in_the_middle,
    "truncated": truncated,
    "truncated-header": truncated_inside_the_header,
    "not-a-database": not_a_database,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_a_damaged_file_is_quarantined_and_a_fresh_store_works(
        store_config: StoreConfig, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    await make_queue(store_config)
    DAMAGE[damage](store_config.path)
    damaged = store_config.path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="pigateway.store"):
        store = await Store.open(store_config)
    try:
        [aside] = list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))
        assert aside.read_bytes() == damaged, "the user's bytes were not kept as they were"
        critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert len(critical) == 1 and str(aside) in critical[0].getMessage()
        # what could be read is in the fresh queue (tests/test_store_salvage.py), and said
        depth = (await store.stats()).depth
        assert depth < 3000
        assert any(f"salvaged {depth} commands" in r.getMessage() for r in caplog.records)
        command = await store.put("d", "after-quarantine")
        assert (await store.where(command.id)).state == "queued"
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(store_config.path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


async def test_the_wal_and_shm_go_aside_with_the_file(tmp_path: Path,
                                                     store_config: StoreConfig) -> None:
    """A WAL left beside a fresh file would be replayed into it: it must move too."""
    live = StoreConfig(path=tmp_path / "live" / "queue.db", min_free_bytes=0)
    async with await Store.open(live) as store:
        await store.put_many([NewCommand("d", "n", {"pad": "p" * 300})] * 200)
        sides = {suffix: (live.path.parent / f"queue.db{suffix}").read_bytes()
                 for suffix in ("", "-wal", "-shm")}  # copied while open: a hot WAL
    assert sides["-wal"], "the WAL was empty; the test proved little"
    for suffix, content in sides.items():
        (store_config.path.parent / f"queue.db{suffix}").write_bytes(content)
    store_config.path.write_bytes(b"garbage" * 1000)
    async with await Store.open(store_config) as store:
        # the WAL held every page of the queue: every command was read from it
        assert (await store.stats()).depth == 200
        await store.put("d", "fresh")
    [aside] = list(store_config.path.parent.glob("queue.db.corrupt-*[0-9]"))
    assert aside.with_name(aside.name + "-wal").read_bytes() == sides["-wal"]
    assert aside.with_name(aside.name + "-shm").exists()


async def test_quarantine_never_overwrites_an_earlier_one(store_config: StoreConfig) -> None:
    contents = [f"not a database, round {round_}\n".encode() * 40 for round_ in range(3)]
    for content in contents:  # three in one second: the names must still differ
        store_config.path.write_bytes(content)
        async with await Store.open(store_config):
            pass
    kept = sorted(p.read_bytes() for p in store_config.path.parent.glob("*.corrupt-*"))
    assert kept == contents


async def test_an_empty_file_is_a_new_store_not_a_corrupt_one(
        store_config: StoreConfig) -> None:
    store_config.path.touch()
    async with await Store.open(store_config) as store:
        await store.put("d", "n")
    assert list(store_config.path.parent.glob("*.corrupt-*")) == []


async def test_a_sound_file_is_kept(store_config: StoreConfig) -> None:
    await make_queue(store_config, 50)
    async with await Store.open(store_config) as store:
        assert (await store.stats()).depth == 50
    assert list(store_config.path.parent.glob("*.corrupt-*")) == []


# --------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder``, unmounted afterwards; skip if we cannot."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (run scripts/test as root)")
    mount = folder
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system of its own: small enough to fill in a moment."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        yield mount


PAD = "x" * 2000
MAX_PUTS = 5000  # 4 MiB holds fewer than 2000 of them: the loop ends by StoreFull


@pytest.mark.root
@pytest.mark.parametrize(("min_free_bytes", "needle"), [
    (0, "is full"),                           # SQLite's own SQLITE_FULL
    (1024 * 1024, "min_free_bytes = 1 MiB"),  # the guard, before SQLite runs out
], ids=["sqlite-full", "guard"])
async def test_a_full_disk_refuses_puts_keeps_the_queue_and_recovers(
        small_disk: Path, min_free_bytes: int, needle: str) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=min_free_bytes)
    queued: list[str] = []
    async with await Store.open(config) as store:
        with pytest.raises(StoreFull, match=needle):
            for i in range(MAX_PUTS):
                queued.append((await store.put("d", "fill", {"i": i, "pad": PAD})).id)
        assert 100 < len(queued) < MAX_PUTS
        for _ in range(3):  # still full: refused, and nothing half-written
            with pytest.raises(StoreFull):
                await store.put("d", "refused", {"pad": PAD})
        with pytest.raises(StoreFull):
            await store.put_many([NewCommand("d", "refused", {"pad": PAD})] * 3)
        assert [c.id for c in await store.list_queued(MAX_PUTS)] == queued
        assert (await store.stats()).depth == len(queued)

        filler.unlink()  # space returns: the same open store takes puts again
        again = await store.put("d", "after", {"pad": PAD})
        queued.append(again.id)
    async with await Store.open(config) as store:
        assert [c.id for c in await store.list_queued(MAX_PUTS)] == queued
        assert (await store.stats()).dead == {}
    with contextlib.closing(sqlite3.connect(config.path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.root
async def test_the_guard_error_says_how_much_is_free(small_disk: Path) -> None:
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=64 * 1024 * 1024)
    async with await Store.open(config) as store:
        with pytest.raises(StoreFull) as refused:
            await store.put("d", "n")
        assert str(small_disk) in str(refused.value)
        assert "MiB free" in str(refused.value)
        assert (await store.stats()).depth == 0


async def fill(store: Store, limit: int) -> int:
    """Put until the store refuses with StoreFull; how many went in (bounded by ``limit``)."""
    done = 0
    with pytest.raises(StoreFull, match="min_free_bytes"):
        while done < limit:
            await store.put_many([NewCommand("d", "fill", {"pad": PAD})] * 20)
            done += 20
    return done


@pytest.mark.root
async def test_draining_a_queue_that_filled_the_disk_makes_room_again(tmp_path: Path) -> None:
    """The uplink comes back after an outage that filled the disk and drains everything.

    The file never shrinks, so the file system stays below the guard; the pages the
    drained commands leave behind inside the file must count as room, or the gateway
    would refuse every new command forever with an empty queue.
    """
    with tmpfs(tmp_path / "disk", "48m") as disk:
        config = StoreConfig(path=disk / "queue.db")  # the default guard: 32 MiB free
        async with await Store.open(config) as store:
            first = await fill(store, 20_000)
            assert first > 1000
            for _ in range(first):  # bounded: one claim per command at most
                batch = await store.claim(500)
                if not batch:
                    break
                await store.ack([c.id for c in batch])
            assert (await store.stats()).depth == 0
            second = await fill(store, 20_000)
            assert second >= first // 2
            assert (await store.stats()).depth == second


def corrupt_files(folder: Path) -> list[Path]:
    return list(folder.glob("*.corrupt-*"))


def fill_to_the_brim(path: Path) -> None:
    """Write zeros until the file system says ENOSPC (bounded: the disk is 4 MiB)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(4096):
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("the small disk never filled up")
    finally:
        os.close(fd)


@pytest.mark.root
async def test_a_restart_on_a_brim_full_disk_keeps_the_queue(small_disk: Path) -> None:
    """SQLite cannot even make its -shm file: that is a full disk, not a corrupt queue."""
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        ids = [c.id for c in await store.put_many([NewCommand("d", "n", {"i": i})
                                                    for i in range(100)])]
    filler = small_disk / "filler"
    fill_to_the_brim(filler)
    with pytest.raises(StoreFull, match="left as it is"):
        await Store.open(config)
    assert corrupt_files(small_disk) == [], "a sound queue was quarantined"
    filler.unlink()
    async with await Store.open(config) as store:
        assert [c.id for c in await store.list_queued(200)] == ids


def remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


@pytest.mark.root
async def test_a_read_only_file_system_is_a_store_error(small_disk: Path) -> None:
    """SD cards remount read-only after errors: a clear StoreError, never an OSError."""
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        await store.put("d", "n")
    (small_disk / "queue.db.lock").unlink()
    broken = StoreConfig(path=small_disk / "broken" / "queue.db", min_free_bytes=0)
    broken.path.parent.mkdir()
    broken.path.write_bytes(b"not a database" * 100)
    remount_read_only(small_disk)
    for drainer in (True, False):
        with pytest.raises(StoreError) as caught:
            await Store.open(config, drainer=drainer)
        assert "Read-only" in str(caught.value) or "unable to open" in str(caught.value)
        with pytest.raises(StoreError):
            await Store.open(broken, drainer=drainer)
    assert broken.path.read_bytes() == b"not a database" * 100


async def test_a_producer_leaves_a_bad_file_to_the_running_service(
        store_config: StoreConfig) -> None:
    """``pigateway send`` must not move the file from under the service that has it open."""
    service = await Store.open(store_config)
    try:
        await service.put("d", "n")
        with store_config.path.open("r+b") as handle:  # the card fails under the service
            handle.write(b"garbage!" * 16)
        with pytest.raises(StoreCorrupt, match="restarted"):
            await Store.open(store_config, drainer=False)
        assert corrupt_files(store_config.path.parent) == []
    finally:
        with contextlib.suppress(StoreError):
            await service.close()
    store_config.path.write_bytes(b"garbage!" * 512)  # still bad once the service stopped
    with pytest.raises(StoreCorrupt, match="started"):  # no service: still only the drainer
        await Store.open(store_config, drainer=False)  # moves it (producers raced)
    assert corrupt_files(store_config.path.parent) == []
    async with await Store.open(store_config) as service:
        await service.put("d", "after")
    assert len(corrupt_files(store_config.path.parent)) == 1


@pytest.mark.root
async def test_a_quarantine_on_a_full_disk_says_the_disk_is_full_and_keeps_the_file(
        tmp_path: Path) -> None:
    """A damaged queue on a disk without room for the salvaged copy: the start stops with
    the file as it was, and says the disk is full (it said "cannot rollback - no
    transaction is active", SQLite's answer to the rollback after its own, which hid the
    cause). Once space is freed the next start salvages every readable row."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        config = StoreConfig(path=disk / "queue.db", min_free_bytes=0)
        await make_queue(config)
        garbage_in_the_middle(config.path)
        damaged = config.path.read_bytes()
        filler = disk / "filler"
        fill_to_the_brim(filler)
        os.truncate(filler, filler.stat().st_size - 256 * 1024)  # room for a little
        for _ in range(2):
            with pytest.raises(StoreFull, match="full") as refused:
                await Store.open(config)
            assert "no transaction" not in str(refused.value)
            assert config.path.read_bytes() == damaged
            assert corrupt_files(disk) == []
            assert not [p for p in disk.iterdir() if "salvage" in p.name]  # nothing left
        filler.unlink()
        async with await Store.open(config) as store:
            assert (await store.stats()).depth > 2000
        assert len([p for p in corrupt_files(disk)
                    if not p.name.endswith(("-wal", "-shm"))]) == 1


@pytest.mark.root
async def test_a_put_too_big_for_the_disk_fails_alone_as_a_full_disk(small_disk: Path) -> None:
    """A put_many bigger than the page cache spills into the WAL while its insert runs; on a
    full disk SQLite then undoes the whole transaction, not the one statement, and the
    savepoint's own rollback failed: every job of the group (small puts of other producers
    too) got "no such savepoint: job", a plain StoreError (send's exit 1, not 3), and the
    full-disk rule never ran. Now the big one is StoreFull and fails alone."""
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        first = await store.put("d", "first")
        big = [NewCommand("d", "big", {"pad": "x" * 60_000, "i": i}) for i in range(100)]
        with pytest.raises(StoreFull, match="full"):
            await store.put_many(big)
        results = await asyncio.gather(store.put_many(big),
                                       *(store.put("d", "small", {"i": i}) for i in range(5)),
                                       return_exceptions=True)
        assert isinstance(results[0], StoreFull), results[0]
        small = results[1:]
        assert all(not isinstance(r, BaseException) for r in small), small
        queued = [c.id for c in await store.list_queued(10)]
        assert queued == [first.id, *(r.id for r in small if not isinstance(r, BaseException))]


@pytest.mark.root
async def test_a_disk_sqlite_found_full_below_the_guard_is_a_refusal_every_view_shows(
        small_disk: Path) -> None:
    """The guard (``store.min_free_bytes``) is one look at statvfs; below it SQLite itself
    can meet a full disk (the guard set low, space taken between the look and the write, no
    inode left). Every put then failed with StoreFull while every view said nothing was
    refused (``refusal`` None: no REFUSING, no LED). What the last commit met is what a put
    meets now, until one writes again."""
    config = StoreConfig(path=small_disk / "queue.db", min_free_bytes=0)
    async with await Store.open(config) as store:
        await store.put("d", "before")
        filler = small_disk / "filler"
        fill_to_the_brim(filler)
        with pytest.raises(StoreFull):
            for _ in range(200):  # bounded: the WAL's room left fills within a few puts
                await store.put("d", "fill", {"pad": PAD})
        assert isinstance(await store.refusal(), StoreFull)
        filler.unlink()
        await store.heartbeat()  # the clock's minute beat: a write that goes through
        assert await store.refusal() is None
