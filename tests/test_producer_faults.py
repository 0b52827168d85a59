"""The Producer (``pigateway send`` without asyncio) under faults: what it promises holds.

Each test names the promise it checks: no command a caller was told is queued may be
missing, and none it was told failed may be queued (its retry would send it twice).
Real SQLite files on disk, bounded loops.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest

from pigateway.config import StoreConfig
from pigateway.store.producer import Producer
from pigateway.store.values import NewCommand

THREADS, PUTS = 8, 50


def stored_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM outbox")]


def test_one_producer_shared_by_threads_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A Producer is a public, synchronous class; its connection is opened with
    ``check_same_thread=False`` (the service's thread needs that), so sqlite3 does not stop
    a second thread from using it. Unserialised, puts from several threads would interleave
    on the one connection: one thread's BEGIN/ROLLBACK would undo another's put after it
    was reported queued (lost), and a put whose COMMIT failed could be committed by another
    thread's RELEASE (its retry duplicating it). Each put must be all or nothing, whatever
    thread it comes from."""
    config = StoreConfig(path=tmp_path / "q.db", min_free_bytes=0, synchronous="normal")
    returned: list[str] = []
    failed: list[tuple[int, int, str]] = []
    keyed: list[str] = []

    with Producer.open(config) as producer:
        def work(number: int) -> None:
            for i in range(PUTS):
                try:
                    returned.append(producer.put("dev", "set", {"n": number, "i": i},
                                                 id=f"T{number:02d}-{i:04d}").id)
                    producer.where(returned[-1])
                except Exception as exc:  # counted and shown below
                    failed.append((number, i, f"{type(exc).__name__}: {exc}"))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        _, first = producer.put_keyed("k", NewCommand("dev", "set", {}))
        keyed.append(first)

    on_file = stored_ids(config.path)
    assert sorted(set(returned) - set(on_file)) == [], "reported queued, not in the file"
    failed_ids = {f"T{n:02d}-{i:04d}" for n, i, _ in failed}
    assert sorted(failed_ids & set(on_file)) == [], "reported failed, yet queued"
    assert failed == []
    assert len(on_file) == THREADS * PUTS + 1 == len(set(on_file))
    assert keyed[0] in on_file


async def test_a_taken_key_is_a_no_op_even_when_the_queue_is_full(tmp_path: Path) -> None:
    """``send --id KEY`` again while the first command is queued prints its id (exit 0):
    a full queue (``reject``) refused the put before the key was looked at, so the resend
    of a command that *is* queued came back as "queue full" (exit 3). Both ways in: the
    Producer (``send``) and the async Store (the Python API)."""
    from pigateway.errors import QueueFull  # noqa: PLC0415
    from pigateway.store import Store  # noqa: PLC0415

    config = StoreConfig(path=tmp_path / "q.db", min_free_bytes=0, max_commands=1)
    with Producer.open(config) as producer:
        first, first_id = producer.put_keyed("k-1", NewCommand("lamp", "on", {}))
        assert first is not None
        assert producer.put_keyed("k-1", NewCommand("lamp", "on", {})) == (None, first_id)
        with pytest.raises(QueueFull):  # a new key on a full queue is refused
            producer.put_keyed("k-2", NewCommand("lamp", "off", {}))
    store = await Store.open(config, drainer=False)
    try:
        assert await store.put_keyed("k-1", NewCommand("lamp", "on", {})) == (None, first_id)
    finally:
        await store.close()
    assert stored_ids(config.path) == [first_id]


@pytest.mark.parametrize("bad", ["", " ", "x" * 129, "\ud800", "a\x00b", "line\nforged"],
                         ids=["empty", "blank", "huge", "lone-surrogate", "nul", "newline"])
async def test_a_bad_key_or_id_is_refused_by_name_and_stores_nothing(
        tmp_path: Path, bad: str) -> None:
    """A producer key or a command id is a name like a device's: a 200 KB key was stored
    whole, and a lone surrogate (argv of non-UTF-8 bytes) came out of SQLite as a bare
    UnicodeEncodeError, a traceback at the CLI. Each way in says which one is bad."""
    from pigateway.errors import InvalidCommand  # noqa: PLC0415
    from pigateway.store import Store  # noqa: PLC0415

    config = StoreConfig(path=tmp_path / "q.db", min_free_bytes=0)
    with Producer.open(config) as producer:
        with pytest.raises(InvalidCommand, match="producer key"):
            producer.put_keyed(bad, NewCommand("lamp", "on", {}))
        with pytest.raises(InvalidCommand, match="command id"):
            producer.put("lamp", "on", id=bad)
        with pytest.raises(InvalidCommand, match="command id"):
            producer.where(bad)
    async with await Store.open(config, drainer=False) as store:
        with pytest.raises(InvalidCommand, match="producer key"):
            await store.put_keyed(bad, NewCommand("lamp", "on", {}))
        with pytest.raises(InvalidCommand, match="command id"):
            await store.where(bad)
    assert stored_ids(config.path) == []
    with contextlib.closing(sqlite3.connect(config.path)) as conn:
        assert conn.execute("SELECT count(*) FROM producer_keys").fetchone() == (0,)


def test_the_cli_names_an_id_that_is_not_utf8(tmp_path: Path) -> None:
    """``pigateway queue show`` / ``send --id`` with bytes that are not UTF-8 in argv (a
    shell variable from a binary file): a clear error and the bad-input exit, no traceback."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    config = tmp_path / "config.toml"
    config.write_text(f'gateway_id = "gw"\n[store]\npath = "{tmp_path / "q.db"}"\n'
                      "min_free_bytes = 0\n")
    base = [sys.executable, "-m", "pigateway"]
    for argv in (["queue", "show", b"\xff\xfe"], ["send", "--device", "lamp", "--command",
                                                   "on", "--id", b"k\xff"]):
        done = subprocess.run([*base, *argv, "--config", str(config)], capture_output=True,
                              text=True, timeout=60, check=False, env=os.environ.copy())
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "lone surrogate" in done.stderr
