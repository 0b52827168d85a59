"""Work pigateway turns away never looks healthy: the disk at ``store.min_free_bytes`` or a
full queue (``overflow = "reject"``) shows in the state, ``pigateway status`` (the control
socket, and its rendering for people), systemd's STATUS= line, the LEDs, a metric with the
reason, and the journal at warning, once per episode; and ingest refusing the local
broker's messages shows the same.

A real gateway runs in this process on a real SQLite file; the disk reserve is one no disk
can keep (2**62 bytes), so every put is refused as on a full disk; ingest reads a real
mosquitto on loopback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import gateway
from harness.broker import Mosquitto
from harness.ingest_helpers import brokers, ingest_settings, publish
from harness.ports import free_port
from harness.service import running_gateway
from harness.waits import wait_until
from pigateway.app import Gateway
from pigateway.cli import report
from pigateway.config import from_dict
from pigateway.errors import StoreFull
from pigateway.listeners import metrics
from pigateway.listeners.control import request
from pigateway.pins.panel import Show, show_for
from pigateway.state import Link
from pigateway.store import Store
from pigateway.systemd import status_line

NO_DISK_KEEPS = 2**62


async def _views(gw: Gateway) -> tuple[str, Show, str, dict[str, object]]:
    """STATUS=, the LEDs, the metrics and the control socket's state, as each shows it."""
    assert gw.store is not None
    text = metrics.render(await metrics.snapshot(gw.state, gw.store)).decode()
    reply = await request(gw.config.control.socket, "status")
    return status_line(gw.state), show_for(gw.state), text, reply["state"]


async def test_a_disk_at_its_reserve_shows_in_every_view_and_once_in_the_journal(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = gateway.config(folder, port=free_port(), gpio={"enabled": False},
                         uplink={"backoff_initial": 0.2, "backoff_max": 0.5})
    async with await Store.open(cfg.store) as store:  # a queue with one command
        await store.put("pump1", "start")
    full = from_dict({**gateway.plain(cfg), "store": {**gateway.plain(cfg)["store"],
                                                      "min_free_bytes": NO_DISK_KEEPS}})
    with caplog.at_level(logging.INFO):
        async with running_gateway(full) as gw:
            assert gw.store is not None
            with pytest.raises(StoreFull):  # what a producer meets
                await gw.store.put("pump1", "stop")
            assert await wait_until(lambda: gw.state.refusing is not None, 5)
            line, show, text, state = await _views(gw)
            await _wait_a_few_refreshes(gw)
    assert line.startswith("REFUSING disk-reserve · "), line
    assert show is Show.REFUSING
    shown = report.status_running(state, line, time.time())
    assert "Refusing" in shown and "queue: disk-reserve: only " in shown, shown
    assert 'pigateway_refusing{reason="disk-reserve"} 1.0' in text
    assert 'pigateway_refusing{reason="queue-full"} 0.0' in text
    assert state["refusing"].startswith("queue: disk-reserve: only ")
    assert state["refusals"][0]["reason"] == "disk-reserve"
    said = [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "refusing work" in r.getMessage()]
    assert len(said) == 1, said
    assert "store.min_free_bytes" in said[0]


async def _wait_a_few_refreshes(gw: Gateway) -> None:
    version = gw.state.version
    await wait_until(lambda: gw.state.version > version + 2, 3)


async def test_a_full_queue_under_reject_shows_and_clears_when_it_drains(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = gateway.config(folder, port=free_port(), gpio={"enabled": False},
                         store={"max_commands": 2, "overflow": "reject"})
    caplog.set_level(logging.INFO)
    async with running_gateway(cfg) as gw:
        assert gw.store is not None
        for n in range(2):
            await gw.store.put("pump1", "start", {"n": n})
        assert await wait_until(lambda: gw.state.refusing is not None, 5)
        line, show, text, _ = await _views(gw)
        assert line.startswith("REFUSING queue-full · ")
        assert show is Show.REFUSING
        assert 'pigateway_refusing{reason="queue-full"} 1.0' in text
        await gw.store.purge(queued=True)
        assert await wait_until(lambda: gw.state.refusing is None, 5)
        line, show, text, state = await _views(gw)
    assert not line.startswith("REFUSING")
    assert 'pigateway_refusing{reason="queue-full"} 0.0' in text
    assert state["refusals"] == []
    assert any("takes work again" in r.getMessage() for r in caplog.records)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    yield from brokers(tmp_path)


async def test_ingest_refused_by_the_store_shows_as_ingest_refusing(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    local, uplink = pair
    uplink.stop()
    data = gateway.settings(folder, port=uplink.port, prefix="pg", gpio={"enabled": False})
    data.update(ingest_settings(local))
    data["store"]["min_free_bytes"] = NO_DISK_KEEPS
    async with running_gateway(from_dict(data)) as gw:
        assert await wait_until(lambda: gw.state.local is Link.ONLINE, 10)
        assert await publish(local, [("z2m/lamp/state", b"on")]) == 1
        assert await wait_until(
            lambda: any(r["by"] == "ingest" for r in gw.state.refusals()), 10)
        line, show, _, state = await _views(gw)
    assert line.startswith("REFUSING disk-reserve · ")
    assert show is Show.REFUSING
    assert {(r["by"], r["reason"]) for r in state["refusals"]} == {
        ("ingest", "disk-reserve"), ("queue", "disk-reserve")}


async def test_a_look_at_a_disk_that_is_gone_is_a_store_error(tmp_path: Path) -> None:
    """The views' look at the disk fails as the store's verbs do (said and tried again by
    the app), never with an OSError that would end the service."""
    import shutil  # noqa: PLC0415

    from pigateway.errors import StoreError  # noqa: PLC0415

    cfg = gateway.config(tmp_path / "q", store={"min_free_bytes": 1})  # its files in q/
    (tmp_path / "q").mkdir()
    async with await Store.open(cfg.store) as store:
        assert await store.refusal() is None
        shutil.rmtree(tmp_path / "q")  # its files stay open; the folder is gone
        with pytest.raises(StoreError, match="cannot look at the disk"):
            await store.refusal()
