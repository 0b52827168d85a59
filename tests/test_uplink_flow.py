"""The broker's flow control from CONNACK (MQTT 5), against a real mosquitto.

mosquitto sends ``max_inflight_messages`` to MQTT 5 clients as Receive Maximum and
``retain_available false`` as Retain Available = 0. The unacknowledged publishes are
counted at an MQTT-aware proxy between the gateway and the broker, not in the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Mosquitto
from harness.mqttproxy import RefusingProxy
from harness.ports import free_port
from harness.service import Service, environment
from harness.uplink_helpers import (
    drained,
    make_config,
    running_uplink,
    subscribed,
    wait_until,
    write_service_config,
)
from harness.waits import until
from pigateway.store import NewCommand

pytestmark = pytest.mark.broker


def many(count: int, devices: int = 20) -> list[NewCommand]:
    return [NewCommand(f"dev{n % devices}", "set", {"n": n, "pad": "p" * 80})
            for n in range(count)]


async def test_receive_maximum_bounds_unacknowledged_publishes(
        tmp_path: Path, unique_prefix: str) -> None:
    with Mosquitto(tmp_path / "broker", extra=["max_inflight_messages 2"]) as broker:
        proxy = await RefusingProxy(broker.port, lambda *_: None).start()
        try:
            cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=16,
                              max_batch_bytes=1024, state_interval=1)
            async with subscribed(broker.port, unique_prefix) as sub, \
                    running_uplink(cfg) as run:
                await run.store.put_many(many(600))
                assert await wait_until(lambda: len(sub.ids()) >= 600, 30)
                assert await drained(run.store, 10)
                limits = run.state.limits
                document = run.uplink.state_document()
        finally:
            await proxy.close()
    assert proxy.max_unacked == 2  # the window was used, and never exceeded
    assert limits is not None and limits["receive_maximum"] == 2
    assert limits["max_inflight"] == 2
    assert document["limits"] == limits


async def test_without_receive_maximum_max_inflight_is_the_bound(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """The counter can see more than 2: the bound above is the broker's, not the proxy's."""
    proxy = await RefusingProxy(mosquitto.port, lambda *_: None).start()
    try:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_inflight=6,
                          max_batch_bytes=1024)
        async with running_uplink(cfg) as run:
            await run.store.put_many(many(600))
            assert await drained(run.store, 30)
    finally:
        await proxy.close()
    assert 2 < proxy.max_unacked <= 6 + 1  # the batches and at most one state document


async def test_no_retain_available_sends_the_state_unretained_with_a_warning(
        tmp_path: Path, unique_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pigateway")
    with Mosquitto(tmp_path / "broker", extra=["retain_available false"]) as broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix)
        async with subscribed(broker.port, unique_prefix) as sub, running_uplink(cfg) as run:
            await run.store.put("lamp", "on")
            assert await drained(run.store, 15)
            assert await wait_until(lambda: sub.states, 10)
            limits = run.state.limits
    assert limits is not None and limits["retain_available"] is False
    assert "Retain Available = 0" in caplog.text


def status(config: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pigateway", "status", "--json", "--config",
                           str(config)], check=False, capture_output=True, text=True,
                          timeout=30, env=environment())
    result: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {}
    return result


async def test_pigateway_status_shows_the_limits_in_force(folder: Path, unique_prefix: str) -> None:
    with Mosquitto(folder / "broker", extra=["max_inflight_messages 2"]) as broker:
        config = write_service_config(folder, broker.port, unique_prefix, max_inflight=4,
                                      max_messages_per_second=50)
        with Service(config, folder / "service.log") as service:
            async def online() -> bool:
                shown = await asyncio.to_thread(status, config)
                return shown.get("link") == "online" and bool(shown.get("limits"))
            assert await until(online, 20, step=0.2), service.tail()
            limits = (await asyncio.to_thread(status, config))["limits"]
    assert limits["receive_maximum"] == 2 and limits["max_inflight"] == 2
    assert limits["max_messages_per_second"] == 50
    assert limits["retain_available"] is True


async def test_a_broker_never_reached_since_the_start_is_a_warning_once_per_episode(
        tmp_path: Path, unique_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway started with a broker it cannot reach (a wrong port, a broker down at boot)
    says so at warning, where ``journalctl -u pigateway -p warning`` looks, once: not silence
    at every attempt, and not a warning at every attempt either."""
    caplog.set_level(logging.INFO, logger="pigateway")
    port = free_port()  # nothing listens there
    cfg = make_config(tmp_path, port, unique_prefix)
    async with running_uplink(cfg) as run:
        await run.store.put("lamp", "on")
        assert await wait_until(lambda: caplog.text.count("retrying in") >= 3, 15)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "pigateway.uplink" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"127.0.0.1:{port}" in warnings[0] and "wait on disk" in warnings[0]


async def test_a_slot_is_free_at_the_puback_while_the_rows_wait_to_be_deleted(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """``uplink.max_inflight`` counts batches the broker has not acknowledged: with one slot,
    the next batch goes out while the first one's delete still waits for the store (a slow
    fsync), instead of one batch per round trip and commit."""
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, max_inflight=1, max_actions=1)
    async with subscribed(mosquitto.port, unique_prefix) as sub, running_uplink(cfg) as run:
        real_ack = run.store.ack
        acks: list[str] = []
        waited: list[bool] = []

        async def slow_ack(ids: Sequence[str], batch: str | None = None) -> int:
            acks.extend(ids)
            if len(acks) == 1:  # the first delete waits for the second batch to arrive
                waited.append(await wait_until(lambda: len(sub.ids()) >= 2, 5))
            return await real_ack(ids, batch)

        run.store.ack = slow_ack  # type: ignore[method-assign]
        await run.store.put_many([NewCommand("a", "set", {}), NewCommand("b", "set", {})])
        assert await drained(run.store, 15)
    assert waited == [True]
