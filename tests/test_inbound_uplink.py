"""Inbound messages through a real mosquitto and the real uplink: whatever one message does,
the link stays up and the message is taken once or dropped, never redelivered for ever."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiomqtt import Client  # the tests play the cloud side

from harness import gateway
from harness.broker import Mosquitto
from harness.uplink_helpers import RecordingState, make_config, running_uplink, wait_until
from pigateway.config import Config
from pigateway.errors import StoreError, StoreFull
from pigateway.inbound import Inbound
from pigateway.state import Link
from pigateway.uplink.intake import TAKE_TRIES
from pigateway.wire import topic

pytestmark = pytest.mark.broker


async def publish(cfg: Config, port: int, payload: bytes, where: str | None = None) -> None:
    async with Client("127.0.0.1", port) as cloud:
        await cloud.publish(where or topic(cfg, "commands"), payload, qos=1)


def went_offline(state: RecordingState) -> bool:
    """Whether the link dropped after it first came online."""
    links = state.history.get("link", [])
    online = links.index(Link.ONLINE) if Link.ONLINE in links else len(links)
    return Link.OFFLINE in links[online:]


async def redelivered(cfg: Config, seconds: float = 1.5) -> list[bytes]:
    """What the broker sends to a fresh start of the gateway's session within ``seconds``."""
    again: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        again.append(payload)

    async with running_uplink(cfg, on_command=on_command) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await wait_until(lambda: bool(again), seconds)
    return again


async def test_a_store_error_is_waited_out_with_the_link_up(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    calls: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        calls.append(payload)
        if len(calls) <= 2:
            raise StoreError("database is locked (simulated)")

    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    state = RecordingState()
    async with running_uplink(cfg, on_command=on_command, state=state) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await publish(cfg, mosquitto.port, b"first")
        assert await wait_until(lambda: len(calls) == 3, 10)
        assert not went_offline(state)
    assert await redelivered(cfg) == []  # acknowledged once it was taken


async def test_a_full_disk_is_one_warning_per_episode_not_one_per_message_and_retry(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Under the disk reserve every command of the window waits, each retried with
    backoff: a warning per message and retry filled the journal, the last thing left to
    fill on a full disk. One warning when the episode begins (what the uplink does
    meanwhile), one info line when it ends, with its count."""
    calls: list[bytes] = []
    full = [True]

    async def on_command(payload: bytes) -> None:
        calls.append(payload)
        if full[0]:
            raise StoreFull("only 1.0 MiB free under store.min_free_bytes (simulated)")

    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    caplog.set_level(logging.INFO)
    async with running_uplink(cfg, on_command=on_command, state=RecordingState()) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        for n in range(10):
            await publish(cfg, mosquitto.port, f"m{n}".encode())
        assert await wait_until(lambda: len(calls) >= 25, 15)  # every one refused twice+
        full[0] = False
        assert await wait_until(lambda: {f"m{n}".encode() for n in range(10)}
                                <= {c for c in calls[25:]}, 15)
        await asyncio.sleep(0.2)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "inbound" in said[0].getMessage() and "unacknowledged" in said[0].getMessage()
    ended = [r for r in caplog.records if "inbound takes work again" in r.getMessage()]
    assert len(ended) == 1 and ended[0].levelno == logging.INFO
    assert "refused" in ended[0].getMessage()
    assert await redelivered(cfg) == []


async def test_a_message_that_breaks_on_command_is_dropped_after_bounded_tries(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    calls: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        calls.append(payload)
        if payload == b"poison":
            raise RuntimeError("a bug in on_command")

    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    state = RecordingState()
    async with running_uplink(cfg, on_command=on_command, state=state) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await publish(cfg, mosquitto.port, b"poison")
        await publish(cfg, mosquitto.port, b"good")
        assert await wait_until(lambda: calls.count(b"poison") == TAKE_TRIES, 15)
        assert await wait_until(lambda: b"good" in calls, 5)
        assert not await wait_until(lambda: calls.count(b"poison") > TAKE_TRIES, 1.0)
        assert not went_offline(state)
    assert await redelivered(cfg) == []


def ignored(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "ignored a message on" in r.getMessage()]


async def test_a_message_on_an_old_subscription_is_acknowledged_not_run(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    taken: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        taken.append(payload)

    old = make_config(tmp_path, mosquitto.port, f"{unique_prefix}old")
    async with running_uplink(old, on_command=on_command) as run:  # the session subscribes
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
    new = make_config(tmp_path, mosquitto.port, f"{unique_prefix}new")
    async with running_uplink(new, on_command=on_command) as run:  # same session, new prefix
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await publish(new, mosquitto.port, b"stale", where=topic(old, "commands"))
        await publish(new, mosquitto.port, b"fresh")
        assert await wait_until(lambda: b"fresh" in taken, 10)
        assert await wait_until(lambda: len(ignored(caplog)) == 1, 5)
    assert taken == [b"fresh"]
    assert await redelivered(new) == []
    async with running_uplink(new, on_command=on_command) as run:  # unsubscribed for good
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await publish(new, mosquitto.port, b"stale again", where=topic(old, "commands"))
        await publish(new, mosquitto.port, b"fresh again")
        assert await wait_until(lambda: b"fresh again" in taken, 10)
        await asyncio.sleep(0.3)
    assert taken == [b"fresh", b"fresh again"] and len(ignored(caplog)) == 1


def inbound_config(tmp_path: Path, port: int, prefix: str, **store: Any) -> Config:
    return gateway.config(
        tmp_path, gateway_id="gw-test", port=port, prefix=prefix, store=store,
        mqtt={"keepalive": 5},
        uplink={"batch_delay": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4},
        gpio={"enabled": False}, devices={"lamp": {"handler": "log"}})


async def test_under_the_disk_reserve_a_command_stays_at_the_broker(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = inbound_config(tmp_path, mosquitto.port, unique_prefix)
    short = replace(cfg, store=cfg.store.replace(min_free_bytes=1 << 62))  # more than any disk
    command = json.dumps({"v": 1, "id": "c-1", "device": "lamp", "name": "on", "params": {}})
    state = RecordingState()
    inbound: list[Inbound] = []  # made on the uplink's own store (one drainer per file)

    async def on_command(payload: bytes) -> None:
        await inbound[0].accept(payload)

    async with running_uplink(short, on_command=on_command, state=state) as run:
        inbound.append(Inbound(short, run.store))
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await publish(cfg, mosquitto.port, command.encode())
        await asyncio.sleep(1.0)  # it is refused meanwhile: the store is under its reserve
        assert await run.store.inbox.find("c-1") is None
        assert not went_offline(state)
    inbound.clear()
    async with running_uplink(cfg, on_command=on_command) as run:
        inbound.append(Inbound(cfg, run.store))
        for _ in range(200):  # bounded: 200 x 50 ms
            if await run.store.inbox.find("c-1") is not None:
                break
            await asyncio.sleep(0.05)
        # the broker kept it and delivered it again once there was room
        assert await run.store.inbox.find("c-1") is not None
