"""How the store is opened, and by whom.

Only the drainer, holding its lock, checks a queue file in full and moves a bad one aside;
a producer (``pigateway send``) checks cheaply and refuses a bad file, so concurrent sends
cannot move each other's fresh queue aside with their commands in it. The drainer
lock belongs to the real file, whatever name it was opened by. Real processes, real files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.errors import StoreCorrupt, StoreError
from pigateway.store import NewCommand, Store

SENDERS = 24


def write_config(folder: Path) -> Path:
    path = folder / "config.toml"
    path.write_text('gateway_id = "gw-open"\n'
                    f'[control]\nsocket = "{folder / "control.sock"}"\n'
                    f'[store]\npath = "{folder / "queue.db"}"\nmin_free_bytes = 0\n')
    return path


def send(config: Path, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pigateway", "send", "--config", str(config),
         "--device", f"lamp{n}", "--command", "on"],
        capture_output=True, text=True, timeout=120, check=False)


def ids_in(path: Path) -> set[str]:
    """The command ids a queue file holds; none when it is not a readable queue."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return {row[0] for row in conn.execute("SELECT id FROM outbox")}
    except sqlite3.DatabaseError:
        return set()


@pytest.mark.parametrize("damage", [b"this is not a queue\n" * 200, b"SQLite format 3\x00ab"])
def test_concurrent_sends_on_a_corrupt_queue_never_strand_a_printed_id(
        tmp_path: Path, damage: bytes) -> None:
    """13 of 36 sends that printed an id ended up in queue.db.corrupt-*: each producer
    quarantined whatever the path named then, a fresh queue of another sender included."""
    config = write_config(tmp_path)
    (tmp_path / "queue.db").write_bytes(damage)
    with concurrent.futures.ThreadPoolExecutor(SENDERS) as pool:
        done = list(pool.map(lambda n: send(config, n), range(SENDERS)))
    printed = {d.stdout.strip() for d in done if d.returncode == 0}
    stranded = printed - ids_in(tmp_path / "queue.db")
    assert stranded == set(), f"{len(stranded)} printed ids are not in the live queue"
    for result in done:
        assert result.returncode in (0, 1), result.stderr
        if result.returncode:
            assert "queue.db" in result.stderr and "started" in result.stderr
    assert list(tmp_path.glob("queue.db.corrupt-*")) == [], "a producer moved the file"
    assert (tmp_path / "queue.db").read_bytes() == damage, "a producer changed the file"


@contextlib.contextmanager
def statements_seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every SQL statement any sqlite3 connection of this process runs (sqlite3's trace)."""
    seen: list[str] = []
    connect: Callable[..., sqlite3.Connection] = sqlite3.connect

    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(seen.append)
        return conn
    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", traced)
        yield seen


async def test_a_producer_does_not_run_the_full_check_and_the_drainer_does(
        store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `pigateway send` ran PRAGMA quick_check (1.0 s at a 1M backlog)."""
    async with await Store.open(store_config) as store:
        await store.put_many([NewCommand("d", "n")] * 100)
    with statements_seen(monkeypatch) as seen:
        async with await Store.open(store_config, drainer=False) as producer:
            await producer.put("d", "n")
    assert seen, "the trace saw nothing: the check below would prove nothing"
    assert not [s for s in seen if "_check" in s.lower()]
    with statements_seen(monkeypatch) as seen:
        async with await Store.open(store_config):
            pass
    assert [s for s in seen if "integrity_check" in s.lower()], "the drainer must check in full"


@pytest.mark.parametrize("damage", ["not-a-database", "truncated-header", "bad-schema"])
async def test_a_producer_refuses_a_corrupt_file_clearly_and_moves_nothing(
        store_config: StoreConfig, damage: str) -> None:
    async with await Store.open(store_config) as store:
        await store.put("d", "n")
    path = store_config.path
    if damage == "not-a-database":
        path.write_text("[store]\n" * 500)
    elif damage == "truncated-header":
        with path.open("r+b") as handle:
            handle.truncate(60)
    else:  # the header is fine; the schema on page 1 is garbage
        with path.open("r+b") as handle:
            handle.seek(100)
            handle.write(b"\xde\xad\xbe\xef" * 400)
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match=str(path)):
        await Store.open(store_config, drainer=False)
    assert path.read_bytes() == before
    assert list(path.parent.glob("queue.db.corrupt-*")) == []


async def test_a_symlinked_path_does_not_get_a_second_drainer(tmp_path: Path) -> None:
    """The drainer lock was keyed on the path string."""
    real = tmp_path / "data" / "queue.db"
    real.parent.mkdir()
    (tmp_path / "link").mkdir()
    alias = tmp_path / "link" / "queue.db"
    alias.symlink_to(real)
    dotted = tmp_path / "link" / ".." / "data" / "queue.db"
    async with await Store.open(StoreConfig(path=real, min_free_bytes=0)):
        for name in (alias, dotted):
            with pytest.raises(StoreError, match="already draining"):
                second = await Store.open(StoreConfig(path=name, min_free_bytes=0))
                await second.close()  # a second drainer opened: close it, then fail
