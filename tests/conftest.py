"""Shared fixtures: a real mosquitto per test, and a store config in a temporary folder."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.broker import Mosquitto, mosquitto_binary
from harness.sockets import short_dir
from pigateway.config import StoreConfig


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real broker on a free loopback port, killed at the end of the test."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; scripts/test installs it")
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder with a short path: unix socket paths are limited to 108 bytes."""
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    """A store in the test's own folder, with the default limits."""
    return StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)


@pytest.fixture
def unique_prefix() -> str:
    """A topic prefix of its own for each test, so retained messages never leak."""
    return f"t{uuid.uuid4().hex[:10]}"


#: ``cli("queue", "ls", ...)`` -> (exit code, stdout, stderr)
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """The command line run in this process: ``cli("send", ...)`` -> (exit code, stdout,
    stderr); argparse's own usage errors are exit codes too."""
    from pigateway.cli import main  # noqa: PLC0415 - only the CLI tests need it

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def set_wall(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Set the wall clock (``time.time``, which every wall reading goes through) some
    seconds from the real one: a Pi's clock stepped by NTP, or behind before it answers."""
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def set_to(seconds: float) -> None:
        offset[0] = seconds
    return set_to
