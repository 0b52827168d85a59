"""Issue 9: the queue verbs of the command line against a real file (P11, P13, class 4).

``queue requeue-dead`` never replays a stale command unasked; the verbs that only look
(``status``, ``queue ls``, ``queue stats``, ``inbox ls``) never create, migrate or move a
file. The CLI runs in this process (:func:`pigateway.cli.main`), as in test_cli.py.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from pigateway import config as configuration
from pigateway.store import Store

sys.path.insert(0, str(Path(__file__).parent))

from pigateway.cli import main
from test_cli import Run, read_queue, write_config


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """``cli("queue", ...)`` -> (exit code, stdout, stderr), in this process."""
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err
    return run


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


# --------------------------------------------------------------------------- P11


def test_requeue_dead_all_leaves_expired_commands_dead(cli: Run, config_file: Path) -> None:
    stale = bury(config_file, 0.05, None)
    refused = bury(config_file, 60, "rejected-by-broker")
    code, out, _ = cli("queue", "requeue-dead", "--config", str(config_file))
    assert (code, out) == (0, "requeued 1 dead letter(s)\n")
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
    assert (code, out) == (0, "requeued 1 dead letter(s)\n")
    [row] = read_queue(config_file)
    assert row["id"] == stale
    assert row["expires_at"] - row["queued_at"] == pytest.approx(0.05)
