"""Ingest with two real mosquittos on loopback: the gateway's own broker and the uplink.

Each test runs the Gateway in this process against real brokers and a real SQLite file;
what it checks is what a subscriber of the uplink broker receives.
"""

from __future__ import annotations

import asyncio
import json
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
from pigateway.handlers import Request
from pigateway.handlers.mqtt import MqttHandler
from pigateway.mqtt.forwarded import ID_PROPERTY
from pigateway.mqtt.topics import topic_matches
from pigateway.state import Link

FORWARDED = "pg/gw-test/forward/#"
FAST = {"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    yield from brokers(tmp_path)


def gateway_config(folder: Path, local: Mosquitto, uplink: Mosquitto, *,
                   rules: list[dict[str, Any]] | None = None, **tables: Any) -> Config:
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST, **tables)
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    if rules is not None:
        data["ingest"] = rules
    return from_dict(data)


def test_topic_filters_match_as_mqtt_says() -> None:
    assert topic_matches("z2m/+/state", "z2m/lamp/state")
    assert not topic_matches("z2m/+/state", "z2m/lamp/state/x")
    assert topic_matches("z2m/#", "z2m")
    assert topic_matches("z2m/#", "z2m/a/b")
    assert not topic_matches("#", "$SYS/broker/uptime")
    assert not topic_matches("a/b", "a/c")


async def test_forward_keeps_the_message_whole(pair: tuple[Mosquitto, Mosquitto],
                                               folder: Path) -> None:
    """Payload bytes (binary too), retain, content type, user properties and expiry arrive
    on {prefix}/{gateway}/forward/{topic}, with the command id as pigateway-id."""
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/octet-stream"
    props.UserProperty = [("device", "lamp")]
    props.MessageExpiryInterval = 600
    binary = bytes(range(256))
    async with collecting(uplink, FORWARDED) as collector, running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        assert await publish(local, [("z2m/lamp/state", binary)], properties=props) == 1
        await publish(local, [("z2m/lamp/state", b'{"state":"ON"}')])
        await publish(local, [("other/topic", b"not taken")])
        assert await wait_until(lambda: len(collector.got) >= 2, 10), collector.got
        first, second = collector.got[:2]
    assert first.topic == "pg/gw-test/forward/z2m/lamp/state"
    assert first.payload == binary
    assert first.content_type == "application/octet-stream"
    assert ("device", "lamp") in first.user_properties
    assert any(key == ID_PROPERTY for key, _ in first.user_properties)
    assert first.expiry is not None and 590 <= first.expiry <= 600
    assert second.payload == b'{"state":"ON"}'
    assert not any(g.payload == b"not taken" for g in collector.got)


async def test_forward_keeps_retain(pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink)
    async with running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        taken = gateway.ingest.taken if gateway.ingest else 0
        await publish(local, [("z2m/hall/state", b"kept")], retain=True)
        assert await wait_until(lambda: gateway.ingest is not None
                                and gateway.ingest.taken > taken, 10)
        assert await until(lambda: _depth_zero(gateway), 10)
        await asyncio.sleep(0.3)
    async with collecting(uplink, "pg/gw-test/forward/#", client_id="late") as late:
        assert await wait_until(lambda: bool(late.got), 5)  # a late subscriber: retained
    assert late.got[0].retain and late.got[0].payload == b"kept"


async def _depth_zero(gateway: Any) -> bool:
    return gateway.store is not None and (await gateway.store.stats()).depth == 0


async def test_command_mode_turns_levels_and_json_into_commands(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """cmd/<device>/<name> with a JSON object becomes a queued command; a bad payload is
    dead-lettered 'invalid' with the reason and the service keeps running."""
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink, rules=[{"topic": "cmd/+/+", "mode": "command"}])
    async with collecting(uplink, "pg/#") as collector, running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        await publish(local, [("cmd/blind/close", b'{"to": 30}'), ("cmd/blind/open", b"[1]"),
                              ("cmd/blind/stop", b"no json")])
        assert await wait_until(
            lambda: any("/actions" in g.topic for g in collector.got), 10)
        assert gateway.store is not None
        assert await until(lambda: _dead_count(gateway, 2), 10)
        dead = await gateway.store.list_dead()
        await publish(local, [("cmd/blind/close", b'{"to": 40}')])
        assert await wait_until(lambda: sum("/actions" in g.topic for g in collector.got) >= 2,
                                10)
    batch = json.loads(next(g for g in collector.got if "/actions" in g.topic).payload)
    action = batch["actions"][0]
    assert action["device"] == "blind"
    assert action["commands"][0]["name"] == "close"
    assert action["commands"][0]["params"] == {"to": 30}
    reasons = {d.command.name: (d.reason, d.detail) for d in dead}
    assert reasons["open"][0] == "invalid" and "not an object" in (reasons["open"][1] or "")
    assert reasons["stop"][0] == "invalid" and "not JSON" in (reasons["stop"][1] or "")


async def _dead_count(gateway: Any, count: int) -> bool:
    return gateway.store is not None and (await gateway.store.stats()).dead_total >= count


async def test_the_mqtt_handler_publish_is_not_ingested(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """No loop: what the mqtt handler publishes on a topic an ingest rule matches stays out."""
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink, rules=[{"topic": "z2m/#"}],
                         devices={"lamp": {"handler": "mqtt", "host": local.host,
                                           "port": local.port, "topic": "z2m/{device}/set"}})
    handler = MqttHandler(cfg.devices["lamp"], cfg)
    async with collecting(uplink, FORWARDED) as collector, running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        try:
            await handler.run(Request(id="c1", device="lamp", name="set",
                                      params={"state": "ON"}))
        finally:
            await handler.close()
        await publish(local, [("z2m/lamp/state", b"marker")])  # after the handler's
        assert await wait_until(lambda: any(g.payload == b"marker" for g in collector.got), 10)
        await asyncio.sleep(0.3)
    assert [g.payload for g in collector.got if "forward" in g.topic] == [b"marker"]


async def test_local_broker_restart_loses_nothing(pair: tuple[Mosquitto, Mosquitto],
                                                  folder: Path) -> None:
    """The local broker is SIGKILLed and started again: the link shows it, ingest
    reconnects (its session restored from the broker's last save), what it had taken
    arrives, and so does everything published after the restart."""
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink)
    async with collecting(uplink, FORWARDED) as collector, running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        await publish(local, [("z2m/a/state", b"1")])
        assert gateway.ingest is not None
        assert await wait_until(lambda: gateway.ingest is not None and gateway.ingest.taken, 5)
        local.kill()  # SIGKILL: what ingest took is on our disk, not in the broker's
        assert await wait_until(lambda: gateway.state.local is not Link.ONLINE, 5)
        assert "local" in gateway.state.as_dict() and gateway.state.as_dict()["local"] != "online"
        local.start()
        # a broker that crashed may have lost the session it had not saved yet: what it
        # accepts before ingest subscribed again is its loss, so publish once we are back
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        await publish(local, [("z2m/a/state", str(n).encode()) for n in range(2, 50)])
        assert await wait_until(lambda: len(collector.first_order(
            "pg/gw-test/forward/z2m/a/state")) >= 49, 15), len(collector.got)
        assert gateway.state.local is Link.ONLINE
    assert collector.first_order("pg/gw-test/forward/z2m/a/state") == [
        str(n).encode() for n in range(1, 50)]


async def test_a_full_queue_leaves_messages_with_the_local_broker(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    """Queue full under 'reject' with the uplink down: ingest stops acknowledging, the local
    broker keeps the rest, and all of it arrives once the uplink drains the queue."""
    local, uplink = pair
    cfg = gateway_config(folder, local, uplink,
                         store={"max_commands": 10, "overflow": "reject"})
    sent = [("z2m/b/state", str(n).encode()) for n in range(60)]
    async with collecting(uplink, FORWARDED) as collector:
        uplink.stop()  # the collector's persistent session stays, saved by the broker
        async with running_gateway(cfg) as gateway:
            assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
            assert await publish(local, sent) == 60
            assert await until(lambda: _depth_is(gateway, 10), 10)
            await asyncio.sleep(0.5)
            assert await _depth_is(gateway, 10)  # the rest stays with the local broker
            uplink.start()
            gateway.flush()
            assert await wait_until(lambda: len(collector.first_order(
                "pg/gw-test/forward/z2m/b/state")) >= 60, 30), collector.first_order(
                "pg/gw-test/forward/z2m/b/state")
    assert collector.first_order("pg/gw-test/forward/z2m/b/state") == [p for _, p in sent]


async def _depth_is(gateway: Any, depth: int) -> bool:
    return gateway.store is not None and (await gateway.store.stats()).depth == depth


async def test_queue_stats_count_forwarded_messages_apart(
        pair: tuple[Mosquitto, Mosquitto], folder: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`pigateway queue stats` and `pigateway status` show ingest: forwarded rows counted
    apart from commands, the local link in the state."""
    from harness.gateway import write  # noqa: PLC0415
    from pigateway.cli import main  # noqa: PLC0415

    local, uplink = pair
    uplink.stop()
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST)
    data.update(ingest_settings(local))
    data["gpio"] = {"enabled": False}
    path = write(folder / "config.toml", data)
    async with running_gateway(from_dict(data)) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        assert gateway.store is not None
        await gateway.store.put("lamp", "on")
        await publish(local, [("z2m/x/state", b"abc"), ("z2m/y/state", b"de")])
        assert await until(lambda: _depth_is(gateway, 3), 10)
        assert gateway.state.as_dict()["local"] == "online"
        code = await asyncio.to_thread(main, ["queue", "stats", "--config", str(path)])
        out = capsys.readouterr().out
    assert code == 0
    assert "Queued: 1 command," in out
    assert "Forwarded: 2 messages" in out
