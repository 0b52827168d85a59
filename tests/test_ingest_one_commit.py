"""Ingest acknowledges a group only once everything it makes of it is committed: its rows
and its dead letters (a payload that is not a command, an undecodable packet) alike.

Real parts: two mosquittos on loopback, the Gateway in this process, a real SQLite file
that another process's connection holds locked (as ``pigateway send`` or ``sqlite3`` can)
for longer than ``store.busy_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness.broker import Mosquitto
from harness.gateway import settings
from harness.ingest_helpers import brokers, collecting, ingest_settings, publish
from harness.service import running_gateway
from harness.waits import until, wait_until
from pigateway.config import Config, from_dict
from pigateway.mqtt.forwarded import ID_PROPERTY
from pigateway.state import Link

FAST = {"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    yield from brokers(tmp_path)


def command_config(folder: Path, local: Mosquitto, uplink: Mosquitto) -> Config:
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST,
                    store={"busy_timeout": 0.2})
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    data["ingest"] = [{"topic": "cmd/+/+", "mode": "command"}]
    return from_dict(data)


async def _dead(gateway: Any, count: int) -> bool:
    return gateway.store is not None and (await gateway.store.stats()).dead_total >= count


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another process's write lock on the queue file, held while the block runs."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_a_dead_letter_the_store_refuses_is_not_acknowledged(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """Messages that become dead letters (not JSON, not an object) while the queue file is
    locked past the busy timeout are not acknowledged: the local broker keeps them, and
    once the lock is gone each one is a dead letter. None is acknowledged and dropped."""
    local, uplink = pair
    cfg = command_config(folder, local, uplink)
    bad = [("cmd/blind/stop", b"no json"), ("cmd/blind/open", b"[1]"),
           ("cmd/lamp/on", b"\"on\"")]
    async with running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        with locked(cfg.store.path):
            assert await publish(local, bad) == len(bad)
            await asyncio.sleep(1.0)  # ingest meets the lock (busy_timeout 0.2 s) meanwhile
        assert await until(lambda: _dead(gateway, len(bad)), 15), \
            "a dead letter the locked store refused was acknowledged and dropped"
        assert gateway.store is not None
        dead = await gateway.store.list_dead()
    assert sorted(d.command.name for d in dead) == ["on", "open", "stop"]
    assert {d.reason for d in dead} == {"invalid"}


async def test_a_topic_level_of_spaces_is_forwarded_or_dead_lettered_never_dropped(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """A topic of spaces is a topic MQTT and mosquitto take. Forwarded, it reaches the
    uplink (its local topic only orders it); as a command's device it is a dead letter.
    Neither is acknowledged and then dropped because the store refuses its device name."""
    local, uplink = pair
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST)
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    data["ingest"] = [{"topic": "cmd/+/+", "mode": "command"}, {"topic": " "},
                      {"topic": " /+"}]
    cfg = from_dict(data)
    async with collecting(uplink, "pg/#") as collector, running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        sent = [(" ", b"one"), (" /x", b"two"), ("cmd/ /on", b"{}")]
        assert await publish(local, sent) == len(sent)
        assert await wait_until(lambda: {g.payload for g in collector.got} >= {b"one", b"two"},
                                10), collector.got
        assert await until(lambda: _dead(gateway, 1), 10), "the command was dropped"
        assert gateway.store is not None
        [dead] = await gateway.store.list_dead()
    assert dead.reason == "invalid" and dead.command.name == "on"
    assert {g.topic for g in collector.got if g.payload in (b"one", b"two")} == {
        "pg/gw-test/forward/ ", "pg/gw-test/forward/ /x"}


async def test_a_message_over_max_params_bytes_is_a_dead_letter_never_dropped(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """Under a small ``store.max_params_bytes`` a forwarded message bigger than it, or a
    command payload that is not JSON, cannot be a row: each is a dead letter (what is kept
    of its payload cut to fit), never acknowledged and dropped."""
    local, uplink = pair
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST,
                    store={"max_params_bytes": 300})
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    data["ingest"] = [{"topic": "cmd/+/+", "mode": "command"}, {"topic": "z2m/#"}]
    cfg = from_dict(data)
    async with running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        sent = [("z2m/big", "é".encode() * 1500), ("cmd/lamp/on", b"\x01" * 3000)]
        assert await publish(local, sent) == len(sent)
        assert await until(lambda: _dead(gateway, 2), 10), "a message was dropped"
        assert gateway.store is not None
        dead = await gateway.store.list_dead()
    assert sorted(d.command.device for d in dead) == ["lamp", "z2m/big"]
    assert all(d.reason == "invalid" and d.command.params["bytes"] in (3000,) for d in dead)


async def test_a_forward_carries_only_its_own_command_id(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """A device that sets the user property pigateway-id itself (the same value on every
    message) must not give its forwards an id: a receiver that drops a repeated id (as
    docs/ingest.md says to) would drop all but the first. Each forward carries exactly
    one pigateway-id, its own command's, and the device's other properties as they came."""
    local, uplink = pair
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST)
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    cfg = from_dict(data)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [(ID_PROPERTY, "spoofed"), ("room", "hall")]
    async with collecting(uplink, "pg/gw-test/forward/#") as collector, \
            running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        sent = [("z2m/a/state", b"1"), ("z2m/a/state", b"2")]
        assert await publish(local, sent, properties=props) == 2
        assert await wait_until(lambda: len(collector.got) >= 2, 10), collector.got
    ids = [[v for k, v in g.user_properties if k == ID_PROPERTY] for g in collector.got[:2]]
    assert all(len(found) == 1 and found[0] != "spoofed" for found in ids), ids
    assert ids[0] != ids[1]
    assert all(("room", "hall") in g.user_properties for g in collector.got[:2])
