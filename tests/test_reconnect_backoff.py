"""The reconnect backoff starts over after a connection that stayed up, and only then.

"Stayed up" means: the broker answered CONNACK and the link then held for
``uplink.backoff_reset`` seconds. A broker that drops every link sooner (a flapping one, a
restart loop) keeps the backoff growing to its cap; one restart after a stable link is
waited out from ``uplink.backoff_initial`` again. Real mosquitto, stopped and started on
its own port; the waits are read from what the service logs ("retrying in N s").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from pathlib import Path

import pytest

from harness import gateway
from harness.broker import Mosquitto
from harness.hostile import HostileBroker
from harness.uplink_helpers import make_config, running_uplink
from harness.waits import wait_until
from pigateway.config import from_dict
from pigateway.ingest import Ingest
from pigateway.state import GatewayState, Link
from pigateway.store import Store

INITIAL, MAXIMUM, RESET = 0.1, 0.8, 0.6


def _waits(caplog: pytest.LogCaptureFixture, logger: str) -> list[float]:
    return [float(found.group(1)) for record in caplog.records if record.name == logger
            and (found := re.search(r"retrying in ([0-9.]+)s", record.getMessage()))]


async def test_ingest_starts_its_backoff_over_after_a_link_that_stayed_up(
        tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pigateway.ingest")
    data = gateway.settings(tmp_path, gateway_id="gw-test", port=1, prefix="pg",
                            gpio={"enabled": False},
                            uplink={"backoff_initial": INITIAL, "backoff_max": MAXIMUM,
                                    "backoff_reset": RESET},
                            local={"host": mosquitto.host, "port": mosquitto.port})
    data["ingest"] = [{"topic": "dev/#"}]
    cfg = from_dict(data)
    mosquitto.stop()
    state = GatewayState()
    async with await Store.open(cfg.store) as store:
        ingest = Ingest(cfg, store, state)
        task = asyncio.create_task(ingest.run())
        try:
            assert await wait_until(lambda: len(_waits(caplog, "pigateway.ingest")) >= 5, 10)
            mosquitto.start()
            assert await wait_until(lambda: state.local == Link.ONLINE, 10)
            grown = _waits(caplog, "pigateway.ingest")
            await asyncio.sleep(RESET * 2)  # the link stays up: the backoff starts over
            mosquitto.kill()
            assert await wait_until(
                lambda: len(_waits(caplog, "pigateway.ingest")) >= len(grown) + 1, 10)
        finally:
            await ingest.stop(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert max(grown) >= 0.8 * MAXIMUM, grown  # it grew to the cap while the broker was away
    after = _waits(caplog, "pigateway.ingest")[len(grown)]
    assert after <= INITIAL, (grown, after)  # and started over after the stable link


async def test_a_broker_slow_to_answer_that_drops_every_link_keeps_the_backoff_growing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each link takes longer than ``backoff_reset`` to get its CONNACK, and is cut right
    after it: none stayed up (the time before CONNACK does not count), so the waits grow."""
    caplog.set_level(logging.INFO, logger="pigateway.ingest")
    async with HostileBroker(connack_delay=RESET * 1.5, hold=0.0) as broker:
        data = gateway.settings(tmp_path, gateway_id="gw-test", port=1, prefix="pg",
                                gpio={"enabled": False},
                                uplink={"backoff_initial": INITIAL, "backoff_max": MAXIMUM,
                                        "backoff_reset": RESET},
                                local={"host": "127.0.0.1", "port": broker.port})
        data["ingest"] = [{"topic": "dev/#"}]
        cfg = from_dict(data)
        async with await Store.open(cfg.store) as store:
            ingest = Ingest(cfg, store, GatewayState())
            task = asyncio.create_task(ingest.run())
            try:
                assert await wait_until(lambda: len(_waits(caplog, "pigateway.ingest")) >= 4,
                                        20)
            finally:
                await ingest.stop(1.0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    waits = _waits(caplog, "pigateway.ingest")[:4]
    assert len(broker.sessions) >= 4  # every link had its CONNACK
    assert waits[3] >= 0.8 * MAXIMUM and all(b > a for a, b in itertools.pairwise(waits)), waits


async def test_the_uplink_too_keeps_its_backoff_growing_under_a_slow_broker_that_drops_links(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The uplink's reconnect loop (tenacity) counts a link from its CONNACK as well."""
    caplog.set_level(logging.INFO, logger="pigateway.uplink")
    async with HostileBroker(connack_delay=RESET * 1.5, hold=0.0) as broker:
        cfg = make_config(tmp_path, broker.port, "pg", backoff_initial=INITIAL,
                          backoff_max=MAXIMUM, backoff_reset=RESET)
        async with running_uplink(cfg):
            assert await wait_until(lambda: len(_waits(caplog, "pigateway.uplink")) >= 4, 20)
    waits = _waits(caplog, "pigateway.uplink")[:4]
    assert len(broker.sessions) >= 4
    assert waits[3] >= 0.8 * MAXIMUM and all(b > a for a, b in itertools.pairwise(waits)), waits
