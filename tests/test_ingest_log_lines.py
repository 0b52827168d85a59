"""What ingest says in the journal, by priority: an operator filtering
``journalctl -u pigateway -p warning`` sees each episode once, and the normal story stays
at info.

- The store refusing ingest's messages (a full queue under ``reject``) is one warning when
  the episode begins, and one info line with its count when it ends; a queue that hovers
  at its limit (taking a part, refusing the rest) stays one episode.
- The local broker going away is one warning per episode (each retry after it at info),
  said again only after ingest was online again.

A real mosquitto on loopback, a real SQLite file.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from harness import gateway
from harness.broker import Mosquitto
from harness.ingest_helpers import ingest_settings, publish
from harness.waits import wait_until
from pigateway.config import from_dict
from pigateway.ingest import Ingest
from pigateway.state import GatewayState, Link
from pigateway.store import Store


def _config(tmp_path: Path, local: Mosquitto, **store: object) -> object:
    data = gateway.settings(tmp_path, gateway_id="gw-test", port=1, prefix="pg",
                            gpio={"enabled": False},
                            uplink={"backoff_initial": 0.05, "backoff_max": 0.2,
                                    "backoff_reset": 0.5})
    data.update(ingest_settings(local))
    data["store"].update(store)
    return from_dict(data)


def _said(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level
            and r.name.startswith("pigateway") and all(w in r.getMessage() for w in words)]


async def test_a_refusal_episode_is_one_warning_and_its_end_one_line_with_its_count(
        tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pigateway")
    cfg = _config(tmp_path, mosquitto, max_commands=3, overflow="reject")
    state = GatewayState()
    async with await Store.open(cfg.store) as store:  # type: ignore[attr-defined]
        ingest = Ingest(cfg, store, state)  # type: ignore[arg-type]
        task = asyncio.create_task(ingest.run())
        try:
            assert await wait_until(lambda: state.local is Link.ONLINE, 10)
            sent = [("z2m/lamp/state", b"%d" % n) for n in range(7)]
            assert await publish(mosquitto, sent) == 7
            assert await wait_until(lambda: ingest.refusing, 10)
            for _ in range(5):  # room for a part at a time: the queue hovers at its limit
                taken = ingest.taken
                await store.purge(queued=True)
                if await wait_until(lambda t=taken: ingest.taken == 7 or (  # type: ignore[misc]
                        ingest.taken > t and ingest.refusing), 5) and ingest.taken == 7:
                    break
            assert await wait_until(lambda: not ingest.refusing, 5)
            assert ingest.taken == 7
        finally:
            await ingest.stop(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("pigateway")]
    assert len(warnings) == 1, warnings
    assert "ingest" in warnings[0] and "queue-full" in warnings[0]
    ended = _said(caplog, logging.INFO, "ingest", "again")
    assert len(ended) == 1, ended
    assert re.search(r"refused \d+ times? over [0-9.]+s", ended[0]), ended


async def test_the_local_broker_going_away_is_one_warning_per_episode(
        tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pigateway")
    cfg = _config(tmp_path, mosquitto)
    state = GatewayState()
    async with await Store.open(cfg.store) as store:  # type: ignore[attr-defined]
        ingest = Ingest(cfg, store, state)  # type: ignore[arg-type]
        task = asyncio.create_task(ingest.run())
        try:
            for _ in range(2):  # two episodes
                assert await wait_until(lambda: state.local is Link.ONLINE, 10)
                before = len(_said(caplog, logging.INFO, "retrying in"))
                mosquitto.kill()
                assert await wait_until(
                    lambda b=before: len(_said(caplog, logging.INFO, "retrying in")) >= b + 3, 10)
                mosquitto.start()
        finally:
            await ingest.stop(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name == "pigateway.ingest"]
    assert len(warned) == 2, warned
    assert all(f"{mosquitto.host}:{mosquitto.port}" in line for line in warned), warned
