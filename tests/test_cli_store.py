"""The queue verbs of the command line against a real file.

``queue requeue-dead`` never replays a stale command unasked; the verbs that only look
(``status``, ``queue ls``, ``queue stats``, ``inbox ls``) never create, migrate or move a
file. The CLI runs in this process (:func:`pigateway.cli.main`), as in test_cli.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from conftest import Run
from pigateway import config as configuration
from pigateway.store import NewCommand, Store
from test_cli import read_queue, write_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def bury(config_file: Path, ttl: float, reason: str | None) -> str:
    """One command put with ``ttl`` and dead-lettered: as ``expired`` by a drainer's claim
    when ``reason`` is None, else with ``reason``."""
    async def run() -> str:
        store_config = configuration.load(config_file).store
        async with await Store.open(store_config) as store:
            command = await store.put("lamp", "on", ttl=ttl)
            if reason is None:
                await asyncio.sleep(ttl + 0.05)
                assert await store.claim(10) == []
            else:
                await store.dead_letter([command.id], reason)
        return command.id
    return asyncio.run(run())


# --------------------------------------------------------------------------- requeue-dead


def test_requeue_dead_all_leaves_expired_commands_dead(cli: Run, config_file: Path) -> None:
    stale = bury(config_file, 0.05, None)
    refused = bury(config_file, 60, "rejected-by-broker")
    code, out, _ = cli("queue", "requeue-dead", "--config", str(config_file))
    assert (code, out) == (0, "requeued 1 dead letter\n")
    assert [r["id"] for r in read_queue(config_file)] == [refused]
    code, out, _ = cli("queue", "ls", "--dead", "--json", "--config", str(config_file))
    assert code == 0 and f'"id": "{stale}"' in out


def test_an_expired_command_is_requeued_only_by_id_with_expired(cli: Run,
                                                                 config_file: Path) -> None:
    stale = bury(config_file, 0.05, None)
    code, _, err = cli("queue", "requeue-dead", "--id", stale, "--config", str(config_file))
    assert code == 2 and "--expired" in err and "delivered" in err
    assert read_queue(config_file) == []
    code, _, err = cli("queue", "requeue-dead", "--expired", "--config", str(config_file))
    assert code == 2 and "--id" in err
    code, out, _ = cli("queue", "requeue-dead", "--id", stale, "--expired",
                       "--config", str(config_file))
    assert (code, out) == (0, "requeued 1 dead letter\n")
    [row] = read_queue(config_file)
    assert row["id"] == stale
    assert row["expires_at"] - row["queued_at"] == pytest.approx(0.05, abs=0.01)


# ------------------------------------------------------------------- the verbs that only look

LOOKING_VERBS = [
    ("status",), ("status", "--json"), ("queue", "ls"), ("queue", "ls", "--dead"),
    ("queue", "ls", "--json"), ("queue", "stats"), ("queue", "stats", "--json"),
    ("inbox", "ls"), ("inbox", "ls", "--json"),
]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("verb", LOOKING_VERBS, ids=" ".join)
def test_a_looking_verb_on_a_missing_queue_creates_nothing(cli: Run, tmp_path: Path,
                                                           verb: tuple[str, ...]) -> None:
    """`pigateway status` as root with the service stopped created a root-owned
    queue.db the service user could not write."""
    config_file = write_config(tmp_path)
    before = listing(tmp_path)
    code, out, err = cli(*verb, "--config", str(config_file))
    assert code == (4 if verb[0] == "status" else 0), err  # status: the service is down
    assert "no queue file" in err
    assert listing(tmp_path) == before
    if "--json" in verb and verb[0] != "status":
        assert out.strip() == "[]" or '"depth": 0' in out


@pytest.mark.parametrize("verb", LOOKING_VERBS, ids=" ".join)
def test_a_looking_verb_on_a_corrupt_queue_reports_and_moves_nothing(
        cli: Run, tmp_path: Path, verb: tuple[str, ...]) -> None:
    config_file = write_config(tmp_path)
    (tmp_path / "queue.db").write_bytes(b"SQLite format 3\x00" + b"\xde\xad\xbe\xef" * 1000)
    before = listing(tmp_path)
    code, _, err = cli(*verb, "--config", str(config_file))
    assert code == 1
    assert str(tmp_path / "queue.db") in err and "left as it is" in err
    assert listing(tmp_path) == before


def test_looking_verbs_neither_migrate_an_old_schema_nor_fail_on_what_it_has(
        cli: Run, tmp_path: Path) -> None:
    from pigateway.store.schema import MIGRATIONS, statements  # noqa: PLC0415

    config_file = write_config(tmp_path)
    with sqlite3.connect(tmp_path / "queue.db") as conn:
        for statement in statements(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    code, out, err = cli("queue", "stats", "--config", str(config_file))
    assert code == 0 and "Queued: 0 commands" in out
    assert "schema version 1" in err and "migrates" in err
    code, _, err = cli("inbox", "ls", "--config", str(config_file))
    assert code == 1 and "run the service once to migrate" in err
    with sqlite3.connect(tmp_path / "queue.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


# --------------------------------------------------------------------------- purge


def test_purge_and_requeue_print_progress_for_long_work(
        cli: Run, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge of a big backlog runs in chunks and says how far it got, on stderr."""
    from pigateway import cli as cli_module  # noqa: PLC0415

    monkeypatch.setattr(cli_module, "PROGRESS_EVERY", 500)

    async def bury_many() -> None:
        async with await Store.open(configuration.load(config_file).store) as store:
            commands = await store.put_many([NewCommand("d", "n")] * 1200)
            await store.dead_letter([c.id for c in commands], "max-attempts")
    asyncio.run(bury_many())
    code, out, err = cli("queue", "requeue-dead", "--config", str(config_file))
    assert (code, out) == (0, "requeued 1,200 dead letters\n")
    assert "requeued 500 rows so far" in err and "requeued 1,000 rows so far" in err
    code, out, err = cli("queue", "purge", "--all", "--yes", "--config", str(config_file))
    assert code == 0 and out.startswith("deleted 1,200 rows")
    assert "deleted 500 rows so far" in err and "deleted 1,000 rows so far" in err
