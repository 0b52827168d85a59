"""An SD card that went read-only under a running gateway.

A card that reports errors is remounted read-only by ext4 (``errors=remount-ro``, Raspberry
Pi OS's default for its root) while every process keeps its files open; it stays so until a
reboot and an fsck. The store must say that, not blame the file's owner, keep every command
it holds, and find them all after the reboot. The card here is a real ext4 file system in a
file on a loop device, failed by ext4's own ``trigger_fs_error`` (root only; skipped with a
reason otherwise).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Run
from harness import gateway
from pigateway.config import StoreConfig
from pigateway.errors import StoreError, StoreReadOnly
from pigateway.state import Refusal
from pigateway.store import NewCommand, Store

pytestmark = pytest.mark.root


@dataclass
class Card:
    """An ext4 file system in ``image``, mounted on ``mount`` with errors=remount-ro."""

    image: Path
    mount: Path

    def fail(self) -> None:
        """What a card reporting an error does: ext4 makes the mount read-only at once."""
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(self.mount)],
                                capture_output=True, text=True, check=True).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("1")
        with pytest.raises(OSError, match="Read-only"):
            (self.mount / "probe").write_text("x")

    def reboot(self) -> None:
        """Unmounted (every process gone), checked and repaired, mounted again."""
        subprocess.run(["umount", str(self.mount)], check=True)
        subprocess.run(["fsck.ext4", "-y", "-f", str(self.image)], capture_output=True,
                       check=False)  # exit 1: "errors corrected", as after a real one
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.image),
                        str(self.mount)], check=True)


@pytest.fixture
def card(tmp_path: Path) -> Iterator[Card]:
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted ext4 needs root (run scripts/test as root)")
    image, mount = tmp_path / "card.img", tmp_path / "card"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                          text=True, check=False)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount)],
        capture_output=True, text=True, check=False).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make and loop-mount an ext4 here: {made.stderr.strip()}")
    try:
        yield Card(image, mount)
    finally:
        if subprocess.run(["umount", str(mount)], check=False,
                          capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def queued(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return [row[0] for row in conn.execute("SELECT id FROM outbox ORDER BY seq")]


def test_a_send_on_a_card_gone_read_only_says_so_and_keeps_the_queue(
        card: Card, cli: Run) -> None:
    """It said "cannot be written by user root (Permission denied: owner root, group root,
    mode 0644) ... chown root: ...": a wrong diagnosis, and a fix that cannot work."""
    config = gateway.write(card.mount.parent / "config.toml", gateway.settings(
        card.mount, gateway_id="gw-card"))
    ids = []
    for n in range(3):
        code, out, err = cli("send", "--config", str(config), "--device", "d",
                             "--command", "set", "--param", f"n={n}")
        assert code == 0, err
        ids.append(out.split()[0])
    card.fail()
    code, out, err = cli("send", "--config", str(config), "--device", "d", "--command", "set")
    assert code != 0 and out == ""
    assert "read-only file system" in err.lower(), err
    assert "chown" not in err and "Permission denied" not in err, err
    code, out, err = cli("queue", "ls", "--config", str(config))  # looking still works
    assert code == 0 and all(id_ in out for id_ in ids), err
    card.reboot()
    assert queued(card.mount / "queue.db") == ids


async def test_the_drain_on_a_card_gone_read_only_says_so_and_keeps_the_queue(
        card: Card) -> None:
    """The service's claim met "disk I/O error", and its last error said no more."""
    config = StoreConfig(path=card.mount / "queue.db", min_free_bytes=0)
    store = await Store.open(config)
    try:
        ids = [c.id for c in await store.put_many([NewCommand("d", "set", {"i": i})
                                                    for i in range(20)])]
        card.fail()
        for _ in range(2):  # the same answer each time: nothing half-done in between
            with pytest.raises(StoreError, match="Read-only file system"):
                batch = await store.claim(10)
                await store.ack([c.id for c in batch])
        with pytest.raises(StoreError, match="Read-only file system"):
            await store.put("d", "refused")
    finally:
        with contextlib.suppress(StoreError):
            await store.close()
        with pytest.raises(StoreError, match="Read-only file system"):
            await Store.open(config)  # a restart meanwhile: the same words
    card.reboot()
    assert queued(config.path) == ids
    async with await Store.open(config) as store:
        assert [c.id for c in await store.claim(100)] == ids


async def test_an_idle_store_on_a_card_gone_read_only_shows_it_as_a_refusal(card: Card) -> None:
    """With nothing queued, nothing the drain does writes: every view said all was well
    (``online · queue 0``, not a line in the journal) while every ``pigateway send`` failed
    and every command from the broker waited unacknowledged. The clock's heartbeat writes
    once a minute anyway: what it meets is what a producer would meet, and every view reads
    that (``refusal``: ``REFUSING store-busy``, the *refusing work* LEDs)."""
    config = StoreConfig(path=card.mount / "queue.db", min_free_bytes=0)
    store = await Store.open(config)
    try:
        await store.heartbeat()
        assert await store.refusal() is None
        card.fail()
        with pytest.raises(StoreReadOnly):
            await store.heartbeat()
        refusal = await store.refusal()
        assert isinstance(refusal, StoreReadOnly), refusal
        assert Refusal.of(refusal) is Refusal.STORE_BUSY
    finally:
        with contextlib.suppress(StoreError):
            await store.close()
