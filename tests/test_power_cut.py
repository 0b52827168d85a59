"""A power cut drops the page cache: what was not fsynced is gone after the reboot.

``kill -9`` (tests/test_store_crash.py) and ``cgroup.kill`` (scripts/e2e) keep the kernel's
page cache, so they cannot tell a commit that was fsynced from one that was not. These
tests put the queue's folder on lossyfs (tests/harness/lossy.py), which keeps every change
in memory until it is fsynced: first the layer is shown to lose what a real cut loses and
to keep what it keeps, then a store without fsyncs (``synchronous = OFF``) is shown to lose
acknowledged commands on it (so the layer can catch the bug it is here for), then the real
service, ``pigateway send`` (with and without ``--id``), the Python API's ``put``, ingest
and inbound commands from the cloud are cut at random moments: no acknowledged command, no
local PUBACK, no ``--id`` key, no command the service acknowledged to the uplink broker and
no recorded result may be lost, no command may run again once its result is recorded, and
no file may be corrupt or quarantined.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import found, inbound_cuts, lossy, powercut
from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import settings, to_toml
from harness.ports import free_port
from harness.service import spawn, terminate

REASON = lossy.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"lossyfs cannot run: {REASON}")
HELPERS = Path(__file__).parent / "harness" / "programs"
CUTS = 30
SEED = 20261207


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[lossy.LossyMount]:
    mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lossyfs.log")
    with mount:
        yield mount


def write(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_the_layer_keeps_only_what_was_fsynced(mounted: lossy.LossyMount) -> None:
    mnt, disk = mounted.mountpoint, mounted.backing
    write(mnt / "synced", b"one", sync=True)
    with open(mnt / "synced", "r+b") as f:  # an overwrite and an append, never fsynced
        f.write(b"TWO and more")
    write(mnt / "never-synced", b"gone", sync=False)
    write(mnt / "shrunk", b"0123456789", sync=True)
    os.truncate(mnt / "shrunk", 3)  # not fsynced
    write(mnt / "renamed", b"r", sync=True)
    os.rename(mnt / "renamed", mnt / "renamed-new")  # the folder not fsynced
    write(mnt / "removed", b"x", sync=True)
    os.unlink(mnt / "removed")  # the folder not fsynced
    write(mnt / "datasynced", b"ds", sync=False)
    fd = os.open(mnt / "datasynced", os.O_WRONLY)
    os.fdatasync(fd)
    os.close(fd)
    # the mount shows every change, as the page cache would
    assert (mnt / "synced").read_bytes() == b"TWO and more"
    assert (mnt / "shrunk").read_bytes() == b"012"
    assert names(mnt) == {"synced", "never-synced", "shrunk", "renamed-new", "datasynced"}

    dropped = {d.name: d for d in mounted.cut()}

    assert dropped == {
        "synced": lossy.Dropped("synced", 12, False, False),
        "never-synced": lossy.Dropped("never-synced", 4, False, True),
        "shrunk": lossy.Dropped("shrunk", 0, True, False),
        "renamed-new": lossy.Dropped("renamed-new", 0, False, True),
        "removed": lossy.Dropped("removed", 0, False, True),
    }
    assert names(disk) == {"synced", "shrunk", "renamed", "removed", "datasynced"}
    assert (disk / "synced").read_bytes() == b"one"
    assert (disk / "shrunk").read_bytes() == b"0123456789"
    assert (disk / "renamed").read_bytes() == b"r"
    assert (disk / "datasynced").read_bytes() == b"ds"


def test_a_folder_fsync_makes_names_durable_but_not_data(mounted: lossy.LossyMount) -> None:
    mnt, disk = mounted.mountpoint, mounted.backing
    write(mnt / "old", b"old", sync=True)
    write(mnt / "a", b"a", sync=True)
    write(mnt / "b", b"b", sync=True)
    write(mnt / "created", b"not synced", sync=False)
    os.rename(mnt / "old", mnt / "new")
    os.rename(mnt / "a", mnt / "b")  # replaces b
    write(mnt / "doomed", b"d", sync=True)
    os.unlink(mnt / "doomed")
    fsync_folder(mnt)
    write(mnt / "late", b"after the folder's fsync", sync=False)

    mounted.cut()

    assert names(disk) == {"new", "b", "created"}
    assert (disk / "new").read_bytes() == b"old"
    assert (disk / "b").read_bytes() == b"a"
    assert (disk / "created").read_bytes() == b""  # its entry is durable, its data not


def test_the_layer_comes_back_with_what_the_disk_holds(mounted: lossy.LossyMount) -> None:
    mnt = mounted.mountpoint
    write(mnt / "kept", b"v1", sync=True)
    mounted.cut()
    with mounted:
        assert (mnt / "kept").read_bytes() == b"v1"
        write(mnt / "kept", b"v2", sync=False)
        with sqlite3.connect(mnt / "t.db") as conn:  # WAL and its mmapped -shm work here
            assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
            conn.execute("CREATE TABLE t (x)")
            conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
        with sqlite3.connect(mnt / "t.db") as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (100,)
    assert (mounted.backing / "kept").read_bytes() == b"v1"


def test_a_cut_at_a_write_keeps_what_was_fsynced_before_it(tmp_path: Path) -> None:
    mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", cut_at_write=5)
    with mount:
        fd = os.open(mount.mountpoint / "log", os.O_WRONLY | os.O_CREAT, 0o644)
        for _ in range(4):
            os.write(fd, b"0123456789")
            os.fsync(fd)
        os.write(fd, b"the fifth")  # taken, as the page cache takes it; then the power goes
        assert mount.powered_off.wait(10)
        with pytest.raises(OSError):
            os.fsync(fd)
        with pytest.raises(OSError):
            os.write(fd, b"after")
        os.close(fd)
        dropped = mount.cut()
    assert dropped == [lossy.Dropped("log", 9, False, False)]
    assert (mount.backing / "log").read_bytes() == b"0123456789" * 4


def test_strict_names_need_the_folders_fsync(tmp_path: Path) -> None:
    mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", strict_names=True)
    with mount:
        write(mount.mountpoint / "named", b"kept", sync=True)
        fsync_folder(mount.mountpoint)
        write(mount.mountpoint / "named", b"also kept", sync=True)
        write(mount.mountpoint / "synced-unnamed", b"data", sync=True)  # no folder fsync
    assert names(mount.backing) == {"named"}
    assert (mount.backing / "named").read_bytes() == b"also kept"


def test_the_store_keeps_every_put_when_only_a_folder_fsync_keeps_names(
        tmp_path: Path) -> None:
    """SQLite fsyncs the folder after creating its journal and its WAL, not after creating
    the database: the queue holds even where a file's fsync makes no name durable."""
    mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", strict_names=True)
    with mount:
        printed, queued = _put_then_cut(mount, "full")
    assert len(printed) == 40
    assert [id_ for id_ in printed if id_ not in queued] == []


def _put_then_kill(db: Path, synchronous: str) -> list[str]:
    """sync_putter.py puts 40 commands through the store with ``synchronous`` and is
    SIGKILLed; every id it printed."""
    process = subprocess.Popen([sys.executable, str(HELPERS / "sync_putter.py"), str(db),
                                synchronous, "40"], stdout=subprocess.PIPE)
    assert process.stdout is not None
    printed = []
    deadline = time.monotonic() + 60
    for raw in process.stdout:
        line = raw.decode().strip()
        if line == "done" or time.monotonic() > deadline:
            break
        printed.append(line)
    process.kill()
    process.wait(30)
    process.stdout.close()
    return printed


def _put_then_cut(mounted: lossy.LossyMount, synchronous: str) -> tuple[list[str], set[str]]:
    """40 puts on the mount, then the cut; every id printed, and the ids the disk holds."""
    printed = _put_then_kill(mounted.mountpoint / "queue.db", synchronous)
    mounted.cut()
    check, queued, _ = powercut.read_disk(mounted.backing / "queue.db")
    assert check == "ok"
    return printed, queued


def test_a_store_that_does_not_fsync_loses_acknowledged_puts(
        mounted: lossy.LossyMount) -> None:
    """The control: the layer catches ``synchronous = OFF``, which kill -9 cannot."""
    printed, queued = _put_then_cut(mounted, "off")
    assert len(printed) == 40
    lost = [id_ for id_ in printed if id_ not in queued]
    assert len(lost) == 40, f"only {len(lost)} of 40 unsynced puts were lost"


def test_synchronous_normal_loses_the_last_commits_at_a_cut(
        mounted: lossy.LossyMount) -> None:
    """What docs/config.md says of ``store.synchronous = "normal"``: in WAL mode it fsyncs
    only at checkpoints, so a power cut takes the commits since the last one."""
    printed, queued = _put_then_cut(mounted, "normal")
    assert len(printed) == 40
    assert [id_ for id_ in printed if id_ not in queued], "normal lost nothing at a cut"


def test_kill_9_alone_cannot_see_a_store_that_does_not_fsync(tmp_path: Path) -> None:
    """Why the layer exists: with the page cache kept, the same unsynced puts all survive."""
    printed = _put_then_kill(tmp_path / "queue.db", "off")
    assert len(printed) == 40
    _, queued, _ = powercut.read_disk(tmp_path / "queue.db")
    assert [id_ for id_ in printed if id_ not in queued] == []


def test_reading_the_disk_after_a_cut_leaves_the_wal_as_the_cut_left_it(
        tmp_path: Path) -> None:
    """The checks after a cut read what the rebooted machine finds without writing it: a
    read-write open would checkpoint the WAL into queue.db and delete it at its close, so
    the restarted service would never have to recover the WAL the cut left."""
    db = tmp_path / "queue.db"
    printed = _put_then_kill(db, "full")
    wal = tmp_path / "queue.db-wal"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (db, wal)}
    assert len(before["queue.db-wal"][0]) > 0, "the kill left no WAL to keep"

    _, queued, _ = powercut.read_disk(db)
    inbox = inbound_cuts.read_inbox(db)

    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (db, wal)} == before
    assert set(printed) <= queued  # read through the WAL, as the service will
    assert inbox.states == {}


def test_the_store_as_configured_keeps_every_acknowledged_put(
        mounted: lossy.LossyMount) -> None:
    printed, queued = _put_then_cut(mounted, "full")
    assert len(printed) == 40
    assert [id_ for id_ in printed if id_ not in queued] == []


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_inbound_receipt_without_fsyncs_is_caught_losing_what_it_acknowledged(
        tmp_path: Path) -> None:
    """The inbound control: with ``store.synchronous = "normal"`` (no fsync but at a
    checkpoint) the commands the gateway acknowledged to the broker are gone after a cut,
    and the ledger of the power-cut run says so (so it can catch an acknowledgement made
    before its commit was durable)."""
    gateway, prefix = "gw-ctl", "ctl"
    with Mosquitto(tmp_path / "uplink-broker") as uplink, \
            Mosquitto(tmp_path / "local-broker") as local:
        inbound_cuts.make_uplink_session(uplink, gateway, prefix)
        watch = inbound_cuts.AckWatch(uplink.port, f"{prefix}/{gateway}/commands").open()
        runs = inbound_cuts.Runs(local, "ctl-runs")
        cloud = inbound_cuts.Cloud(uplink, gateway, prefix, random.Random(SEED), pause=0.05,
                                   burst=4, name="ctl-cloud")
        mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lossyfs.log")
        data = settings(tmp_path / "mnt", gateway_id=gateway, port=watch.port, prefix=prefix,
                        devices=inbound_cuts.devices(local))
        data["store"]["synchronous"] = "normal"
        data["control"] = {"socket": str(tmp_path / "control.sock")}
        data["gpio"] = {"enabled": False}
        config = tmp_path / "ctl.toml"
        config.write_text(to_toml(data))
        ledger = inbound_cuts.Ledger()
        try:
            with mount:
                service = spawn(config, tmp_path / "service.log")
                cloud.running.set()
                deadline = time.monotonic() + 30
                while len(watch.snapshot()) < 20 and time.monotonic() < deadline:
                    time.sleep(0.05)
                service.send_signal(signal.SIGKILL)
                service.wait(30)
            ledger.check_cut("the cut", mount.backing / "queue.db", cloud, watch, runs)
        finally:
            cloud.close()
            runs.close()
            watch.shut()
    assert len(watch.acked) >= 20
    assert any("acknowledged are not in the inbox" in p for p in ledger.problems), \
        ledger.problems


def _queued_rows(db: Path) -> int:
    if not db.exists():
        return 0
    with found.as_found(db) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0]) \
            if "outbox" in names else 0


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_the_services_own_writer_without_fsyncs_is_caught_losing_what_ingest_took(
        tmp_path: Path, synchronous: str) -> None:
    """The control of the service's own writer (``send``'s and the API's have theirs
    above): ingest commits what the local broker hands it and acknowledges it there, the
    uplink away so it stays queued; after a cut the power-cut run's check of ingest finds
    every message lost under ``store.synchronous = "normal"`` (the setting the service
    takes that does not fsync a commit), none under ``"full"``."""
    with powercut.brokers(tmp_path) as (local, uplink_broker):
        powercut.make_ingest_session(local)
        mount = lossy.LossyMount(tmp_path / "disk", tmp_path / "mnt", tmp_path / "lossyfs.log")
        away = powercut.write_config(tmp_path / "away.toml", mount.mountpoint / "queue.db",
                                     local, free_port(), tmp_path / "control.sock",
                                     synchronous=synchronous)
        publisher = powercut.LocalPublisher(local)
        uplink = powercut.Uplink(uplink_broker)
        try:
            with mount:
                service = spawn(away, tmp_path / "service.log")
                publisher.running.set()
                deadline = time.monotonic() + 30
                while len(publisher.acked) < 40 and time.monotonic() < deadline:
                    time.sleep(0.05)
                publisher.running.clear()
                time.sleep(0.1)  # an acknowledgement on its way
                with publisher.lock:
                    tokens = set(publisher.acked)
                while (_queued_rows(mount.mountpoint / "queue.db") < len(tokens)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                taken = _queued_rows(mount.mountpoint / "queue.db")
                service.send_signal(signal.SIGKILL)
                service.wait(30)
            kept = _queued_rows(mount.backing / "queue.db")
            back = powercut.write_config(tmp_path / "back.toml", mount.backing / "queue.db",
                                         local, uplink_broker.port,
                                         tmp_path / "control-back.sock")
            service = spawn(back, tmp_path / "service-back.log")
            try:
                missing = powercut.unforwarded(uplink, tokens,
                                               20.0 if synchronous == "full" else 5.0)
            finally:
                terminate(service)
        finally:
            uplink.close()
            publisher.close()
    assert len(tokens) >= 40
    assert taken >= len(tokens), f"ingest took {taken} of {len(tokens)} before the cut"
    if synchronous == "full":
        assert kept >= len(tokens)
        assert missing == set()
    else:  # gone from the disk, and so never forwarded (not merely late)
        assert kept < len(tokens)
        assert missing == tokens, f"only {len(missing)} of {len(tokens)} were lost"


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_power_cuts_at_random_moments_lose_nothing_acknowledged(tmp_path: Path) -> None:
    outcome = powercut.run(tmp_path, CUTS, SEED, log=print)
    print(f"\n{outcome.summary()}\n{outcome.table()}\n{outcome.inbound.windows.table()}")
    assert outcome.problems == []
    assert outcome.cuts == CUTS
    rows = outcome.rows
    # each writer was acknowledged often enough for the cuts to have proved something
    assert rows["send"].acknowledged >= 10
    assert rows["send --id"].acknowledged >= 10
    assert rows["put (API)"].acknowledged >= 1000
    assert rows["drain"].acknowledged >= 100
    assert rows["ingest"].acknowledged >= 100
    assert rows["inbound QoS 1"].acknowledged >= 100
    assert rows["inbound QoS 2"].acknowledged >= 100
    assert rows["inbound results"].acknowledged >= 200
    # the cuts fell while commands were received, run and answered (the narrow windows of
    # the receipt are tests/test_inbound_kill.py's to hit every time)
    found = outcome.inbound.windows.cuts
    assert all(found[w] for w in ("at the broker", "pending", "done, result not at the cloud")
               ), outcome.inbound.windows.table()
    assert found["running, before its run"] + found["running, after its run"], \
        outcome.inbound.windows.table()
    assert outcome.command_cuts >= 4, outcome.summary()
    # the cuts bit: most of those right after a write threw away writes to the queue
    assert outcome.write_cuts >= 8, outcome.summary()
    assert outcome.dropping_cuts >= outcome.write_cuts // 2, outcome.summary()
    # and the restarted service recovered the WAL the cut left (the checks read a copy)
    assert outcome.wal_cuts >= CUTS // 2, outcome.summary()
    assert all(row.lost == 0 for row in rows.values()), outcome.table()
