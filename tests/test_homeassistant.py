"""The gateway as a Home Assistant device: discovery, state, commands, and what a hostile
publisher on the command topics cannot do (a real mosquitto; the HA side is a plain client
here, tests/test_homeassistant_real.py runs a real Home Assistant)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import re
import socket
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import GATEWAY
from harness.ha_helpers import DISCOVERY, ha_config, watching
from harness.mqttproxy import RefusingProxy
from harness.service import running_gateway
from harness.uplink_helpers import subscribed, wait_until
from pigateway.config import IngestRule, from_dict
from pigateway.counters import COUNTERS
from pigateway.errors import ConfigError
from pigateway.homeassistant import discovery as hadiscovery
from pigateway.homeassistant.bridge import ANNOUNCE_GAP, COMMAND_BURST, marker_path
from pigateway.state import Link

pytestmark = pytest.mark.broker

ALL = ("uplink", "problem", "paused", "depth", "oldest_age", "dead_letters", "delivered",
       "forwarded", "refusals", "last_error", "disk_free", "version", "flush",
       "requeue_dead")


def base(prefix: str) -> str:
    return f"{prefix}/{GATEWAY}/homeassistant"


def config_topic(component: str, key: str) -> str:
    return f"{DISCOVERY}/{component}/{GATEWAY}/{key}/config"


async def test_discovery_announces_one_device_with_every_entity_retained(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    async with watching(mosquitto.port, f"{DISCOVERY}/#", client_id="early") as early, \
            running_gateway(cfg) as gw:
        assert await early.until(lambda: len(early.configs()) == len(ALL), 10)
        # a client that comes later (HA starting after the gateway) gets it all retained
        async with watching(mosquitto.port, f"{DISCOVERY}/#", f"{base(unique_prefix)}/#") as ha:
            assert await ha.until(lambda: len(ha.configs()) == len(ALL)
                                  and ha.last(f"{base(unique_prefix)}/state"), 5)
            assert all(m.retain for m in ha.messages)
            configs = ha.configs()
            keys = {topic.split("/")[3] for topic in configs}
            assert keys == set(ALL)  # no local link without [[ingest]]
            devices = {json.dumps(doc["device"], sort_keys=True) for doc in configs.values()}
            assert len(devices) == 1  # one device per gateway
            device = json.loads(devices.pop())
            assert device["identifiers"] == [f"pigateway_{GATEWAY}"]
            assert device["sw_version"] and device["model"]
            for doc in configs.values():
                assert doc["availability_topic"] == f"{base(unique_prefix)}/availability"
            assert ha.last(f"{base(unique_prefix)}/availability") == b"online"
            switch = configs[config_topic("switch", "paused")]
            assert switch["command_topic"] == f"{base(unique_prefix)}/set/paused"
            assert configs[config_topic("sensor", "delivered")]["state_class"] == \
                "total_increasing"
            assert configs[config_topic("sensor", "disk_free")]["entity_category"] == \
                "diagnostic"
            state = ha.last_json(f"{base(unique_prefix)}/state")
            assert await wait_until(lambda: gw.state.link == Link.ONLINE, 5)
            assert await ha.until(lambda: ha.last_json(
                f"{base(unique_prefix)}/state")["uplink"] == "ON", 5)
            state = ha.last_json(f"{base(unique_prefix)}/state")
            assert state["paused"] == "OFF" and state["depth"] == 0
            assert state["disk_free"] > 0 and state["problem"] == "OFF"


async def test_state_follows_the_one_state_object(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix, uplink={"batch_delay": 60.0})
    async with running_gateway(cfg) as gw, \
            watching(mosquitto.port, f"{base(unique_prefix)}/state") as ha:
        state_topic = f"{base(unique_prefix)}/state"
        assert await wait_until(lambda: gw.state.link == Link.ONLINE, 10)
        assert gw.store is not None
        gw.pause()
        for n in range(3):
            await gw.store.put("lamp", "on", {"n": n})
        queued = await gw.store.put("lamp", "off")
        await gw.store.dead_letter([queued.id], "invalid", "a test's dead letter")
        gw.state.note_error("broker said no\nnext line")

        def shown() -> bool:
            doc = ha.last_json(state_topic) or {}
            return doc.get("depth") == 3 and doc.get("dead_letters") == 1 \
                and doc.get("paused") == "ON" and doc.get("oldest_age") is not None
        assert await ha.until(shown, 5)
        doc = ha.last_json(state_topic)
        assert "\n" not in doc["last_error"] and doc["last_error"].startswith("broker said no")
        gw.resume()
        gw.flush()
        assert await ha.until(lambda: ha.last_json(state_topic)["delivered"] >= 3, 5)


async def test_paused_switch_and_buttons_act_like_the_control_socket(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix, uplink={"batch_delay": 60.0})
    async with running_gateway(cfg) as gw, subscribed(mosquitto.port, unique_prefix) as sub, \
            watching(mosquitto.port, f"{base(unique_prefix)}/state") as ha:
        assert await wait_until(lambda: gw.state.link == Link.ONLINE, 10)
        assert await wait_until(lambda: marker_path(cfg).exists(), 10)
        assert gw.store is not None
        await ha.publish(f"{base(unique_prefix)}/set/paused", "ON")
        assert await wait_until(lambda: gw.state.paused, 5)
        assert await ha.until(
            lambda: (ha.last_json(f"{base(unique_prefix)}/state") or {}).get("paused") == "ON", 5)
        await ha.publish(f"{base(unique_prefix)}/set/paused", "OFF")
        assert await wait_until(lambda: not gw.state.paused, 5)
        # flush: the 60 s batch window is cut short
        await gw.store.put("lamp", "on")
        assert not await sub.wait_for(1, 0.3)
        await ha.publish(f"{base(unique_prefix)}/set/flush", "PRESS")
        assert await sub.wait_for(1, 5)
        # requeue dead: the dead letter is queued again (and sent at the next flush)
        dead = await gw.store.put("lamp", "off")
        await gw.store.dead_letter([dead.id], "refused", "a test's dead letter")
        assert await wait_until(lambda: gw.state.dead_letters == 1, 5)
        await ha.publish(f"{base(unique_prefix)}/set/requeue_dead", "PRESS")
        assert await wait_until(lambda: gw.state.dead_letters == 0, 5)
        await ha.publish(f"{base(unique_prefix)}/set/flush", "PRESS")
        assert await sub.wait_for(2, 5)
        assert dead.id in sub.ids()


async def test_home_assistant_online_brings_discovery_again_coalesced(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    async with running_gateway(cfg):
        assert await wait_until(lambda: marker_path(cfg).exists(), 10)
        await asyncio.sleep(ANNOUNCE_GAP)  # the connect's announcement and its gap are over
        async with watching(mosquitto.port, config_topic("switch", "paused")) as ha:
            assert await ha.until(lambda: len(ha.messages) == 1, 5)  # the retained one
            assert ha.messages[0].retain
            for _ in range(200):  # a restarting HA, said 200 times (a flood)
                await ha.publish(f"{DISCOVERY}/status", "online")
            await ha.publish(f"{DISCOVERY}/status", "offline")
            assert await ha.until(lambda: len(ha.messages) >= 2, 5)
            await asyncio.sleep(ANNOUNCE_GAP + 1.0)
            fresh = [m for m in ha.messages[1:] if not m.retain]
            assert 1 <= len(fresh) <= 2, len(fresh)  # once, or once more after the gap


async def test_hostile_commands_are_each_their_own_failure(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Odd payloads, retained commands, unknown topics and a flood: none acts beyond its
    bounds, none ends the link or the service, and a good command still works after."""
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    set_ = f"{base(unique_prefix)}/set"
    async with watching(mosquitto.port, client_id="retainer") as early:
        # retained before the gateway comes: it would act again at every reconnect
        await early.publish(f"{set_}/paused", "ON", retain=True, qos=1)
    async with running_gateway(cfg) as gw, subscribed(mosquitto.port, unique_prefix) as sub, \
            watching(mosquitto.port, f"{base(unique_prefix)}/availability") as ha:
        assert await wait_until(lambda: marker_path(cfg).exists(), 10)
        assert gw.store is not None
        odd: list[tuple[str, bytes]] = [
            (f"{set_}/paused", b"on please"), (f"{set_}/paused", b"\xff\xfe\x00"),
            (f"{set_}/paused", b"ON" + b" " * 64), (f"{set_}/paused", b"X" * 100_000),
            (f"{set_}/paused", b""), (f"{set_}/paused", b'{"state": "ON"}'),
            (f"{set_}/depth", b"ON"), (f"{set_}/version", b"PRESS"),
            (f"{set_}/flush", b"ON"), (f"{set_}/nothing", b"PRESS"),
            (f"{set_}/paused/deeper", b"ON"), (f"{set_}/" + "p" * 5000, b"ON"),
            (f"{DISCOVERY}/status", b"\x00online"), (f"{DISCOVERY}/status", b"o" * 70_000),
        ]
        for topic, payload in odd:
            await ha.publish(topic, payload)
        await asyncio.sleep(1.0)
        assert not gw.state.paused  # neither the odd ones nor the retained one acted
        await ha.publish(f"{set_}/paused", b"", retain=True, qos=1)  # clear it again
        # a flood: 400 commands at once; at most a burst acts, the link stays up
        for n in range(400):
            await ha.publish(f"{set_}/paused", "ON" if n % 2 else "OFF")
        await asyncio.sleep(1.0)
        await asyncio.sleep(3.0)  # the bucket fills again
        await ha.publish(f"{set_}/paused", " on \n")  # blanks and case are tolerated
        assert await wait_until(lambda: gw.state.paused, 5)
        await ha.publish(f"{set_}/paused", "OFF")
        assert await wait_until(lambda: not gw.state.paused, 5)
        # the service drained on, and the HA link never went away
        await gw.store.put("lamp", "on")
        assert await sub.wait_for(1, 5)
        assert [m.payload for m in ha.messages] == [b"online"]


async def test_a_command_flood_acts_at_most_a_burst(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    async with running_gateway(cfg) as gw, watching(mosquitto.port, "unused/#") as ha:
        assert await wait_until(lambda: marker_path(cfg).exists(), 10)
        changes: list[bool] = []
        real = gw.state.set_paused

        def counted(paused: bool) -> bool:
            changes.append(paused)
            return real(paused)
        gw.state.set_paused = counted  # type: ignore[method-assign]
        for n in range(300):
            await ha.publish(f"{base(unique_prefix)}/set/paused", "ON" if n % 2 else "OFF")
        await asyncio.sleep(1.5)
        assert 1 <= len(changes) <= COMMAND_BURST + 4, len(changes)


async def test_availability_goes_offline_at_a_clean_stop(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    topic = f"{base(unique_prefix)}/availability"
    async with watching(mosquitto.port, topic) as ha:
        async with running_gateway(cfg):
            assert await ha.until(lambda: ha.last(topic) == b"online", 10)
        assert await ha.until(lambda: ha.last(topic) == b"offline", 5)


async def test_disabled_removes_what_an_earlier_run_announced(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    async with running_gateway(cfg):
        assert await wait_until(lambda: marker_path(cfg).exists(), 10)
    off = ha_config(tmp_path, mosquitto.port, unique_prefix, ha={"enabled": False})
    async with running_gateway(off):
        assert await wait_until(lambda: not marker_path(cfg).exists(), 10)
    async with watching(mosquitto.port, f"{DISCOVERY}/#", f"{base(unique_prefix)}/#") as ha:
        await asyncio.sleep(1.0)
        assert ha.messages == []  # no retained config, state or availability is left


async def test_announcing_fewer_entities_removes_the_rest(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """With [[ingest]] the local link is an entity; without, its config is removed."""
    local = Mosquitto(tmp_path / "local")
    with local:
        cfg = ha_config(tmp_path, mosquitto.port, unique_prefix,
                        local={"host": "127.0.0.1", "port": local.port})
        cfg = dataclasses.replace(cfg, ingest=[IngestRule(topic="sensors/#")])
        async with running_gateway(cfg) as gw:
            assert await wait_until(lambda: gw.state.local == Link.ONLINE, 10)
            async with watching(mosquitto.port, f"{DISCOVERY}/#") as ha:
                assert await ha.until(
                    lambda: ha.configs().get(config_topic("binary_sensor", "local")), 10)
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    # watching first: the removal is an empty retained message, which the broker keeps not
    async with watching(mosquitto.port, f"{DISCOVERY}/#") as ha, running_gateway(cfg):
        assert await ha.until(lambda: config_topic("binary_sensor", "local") in ha.configs()
                              and ha.configs()[config_topic("binary_sensor", "local")] is None,
                              10)


async def test_a_silent_home_assistant_broker_never_delays_the_drain(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """[homeassistant] on a local broker that accepts and never answers: the uplink drains."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = ha_config(tmp_path, mosquitto.port, unique_prefix, ha={"link": "local"},
                        local={"host": "127.0.0.1", "port": silent.getsockname()[1]})
        async with running_gateway(cfg) as gw, subscribed(mosquitto.port, unique_prefix) as sub:
            assert gw.store is not None
            for n in range(20):
                await gw.store.put(f"dev{n % 4}", "on")
            assert await sub.wait_for(20, 5)


def test_local_link_needs_a_local_section() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"gateway_id": "gw", "homeassistant": {"enabled": True, "link": "local"}})
    assert caught.value.key == "homeassistant.link"
    from_dict({"gateway_id": "gw", "local": {"port": 1884},
               "homeassistant": {"enabled": True, "link": "local"}})
    with pytest.raises(ConfigError):
        from_dict({"gateway_id": "gw", "homeassistant": {"discovery_prefix": "home/assistant"}})
    with pytest.raises(ConfigError) as caught:
        from_dict({"gateway_id": "gw", "mqtt": {"profile": "azure-iot-hub",
                                                "host": "hub.azure-devices.net"},
                   "homeassistant": {"enabled": True}})
    assert caught.value.key == "homeassistant.link"


def test_gateway_ids_become_discovery_node_ids_one_to_one() -> None:
    """HA's node ids take letters, digits, '_' and '-'; a gateway id takes '.' too. Two
    gateways on one broker never share a node (their retained configs would overwrite each
    other's, and one's retirement would remove the other's entities)."""
    assert hadiscovery.object_id("gw_kitchen-1") == "gw_kitchen-1"  # unchanged when it fits
    ids = ["gw.kitchen-1", "gw_kitchen-1", "gw-kitchen.1", "a.b_c", "a_b.c", "a.b.c", "a_b_c"]
    nodes = [hadiscovery.object_id(gateway) for gateway in ids]
    assert len(set(nodes)) == len(ids), dict(zip(ids, nodes, strict=True))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", node) for node in nodes)
    configs = [from_dict({"gateway_id": gateway, "homeassistant": {"enabled": True}})
               for gateway in ids]
    topics = {hadiscovery.Topics(config).discovery(hadiscovery.ENTITIES[0])
              for config in configs}
    assert len(topics) == len(ids)


async def test_forwarded_messages_are_counted_for_home_assistant(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A local device's message forwarded by ingest and acknowledged: HA's counter moves."""
    with Mosquitto(tmp_path / "local") as local:
        cfg = ha_config(tmp_path, mosquitto.port, unique_prefix,
                        local={"host": "127.0.0.1", "port": local.port})
        cfg = dataclasses.replace(cfg, ingest=[IngestRule(topic="sensors/#")])
        state = f"{base(unique_prefix)}/state"
        before = copy.copy(COUNTERS)  # one per process: earlier tests' deliveries are in it
        async with watching(mosquitto.port, state) as ha, running_gateway(cfg) as gw:
            assert await wait_until(lambda: gw.state.local == Link.ONLINE, 10)
            async with watching(local.port, client_id="device") as device:
                for n in range(3):
                    await device.publish(f"sensors/t{n}", b"21.5", qos=1)
            assert await ha.until(
                lambda: (ha.last_json(state) or {}).get("forwarded") == before.forwarded + 3,
                10)
            assert ha.last_json(state)["delivered"] == before.delivered + 3


async def test_a_failure_inside_the_home_assistant_link_never_stops_the_gateway(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in building the discovery (here: the first two attempts raise) is said and the
    link tried again; the drain goes on meanwhile."""
    real = hadiscovery.discovery_document
    failures = [RuntimeError("a bug"), KeyError("another")]

    def flaky(*args: object, **kwargs: object) -> dict[str, object]:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(hadiscovery, "discovery_document", flaky)
    cfg = ha_config(tmp_path, mosquitto.port, unique_prefix)
    async with watching(mosquitto.port, f"{DISCOVERY}/#") as ha, running_gateway(cfg) as gw, \
            subscribed(mosquitto.port, unique_prefix) as sub:
        assert gw.store is not None
        await gw.store.put("lamp", "on")
        assert await sub.wait_for(1, 5)
        assert await ha.until(lambda: len(ha.configs()) == len(ALL), 10)
        assert failures == []


async def test_what_the_broker_refuses_home_assistant_is_one_warning_not_one_per_message(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """An ACL without Home Assistant's topics refuses every entity's discovery message and
    every state refresh: a warning each (a dozen at each announce, one a state_interval
    forever). One warning while it lasts, one info line once a message is taken again."""
    refusing_now = [True]

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        ha = where.startswith(f"{DISCOVERY}/") or where.startswith(base(unique_prefix))
        return 0x87 if ha and refusing_now[0] else None

    caplog.set_level(logging.INFO)
    proxy = await RefusingProxy(mosquitto.port, decide).start()
    try:
        cfg = ha_config(tmp_path, proxy.port, unique_prefix)
        async with running_gateway(cfg) as gw:
            assert await wait_until(lambda: gw.state.link == Link.ONLINE, 10)
            assert await wait_until(lambda: len(proxy.refused) >= 10, 10)
            refusing_now[0] = False
            gw.pause()  # a state change: published within STATE_GAP, taken now
            assert await wait_until(lambda: any(
                "homeassistant" in r.getMessage() and "takes our messages again" in r.getMessage()
                for r in caplog.records), 10)
    finally:
        await proxy.close()
    said = [r for r in caplog.records if r.name.startswith("pigateway")
            and r.levelno >= logging.WARNING and "refused" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said][:5]
