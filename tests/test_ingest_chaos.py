"""zigbee2mqtt-like traffic through ingest while everything fails, side by side with a
mosquitto bridge: every message the local broker accepted reaches the uplink subscriber.

Real parts only: three mosquittos on loopback (the gateway's broker for pigateway, a second
gateway broker that bridges to the uplink the way operators do it today, the uplink broker),
``pigateway run`` as a child process SIGKILLed and restarted at random moments (bounded
rounds), the uplink broker down for part of the run, and the bridging broker SIGKILLed once
during that outage. The test asserts pigateway's zero; the bridge's loss is printed (bench).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import settings, write
from harness.ingest_helpers import V5, Collector, as_us, collecting
from harness.service import Service
from harness.waits import until, wait_until

#: Messages and topics (z2m/<device>/state); override with PIGATEWAY_CHAOS_MESSAGES.
MESSAGES = int(os.environ.get("PIGATEWAY_CHAOS_MESSAGES", "5000"))
TOPICS = 20
#: SIGKILLs of pigateway at most (random moments), and the bound on the whole run.
KILLS = 3
DEADLINE = 90.0


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto, Mosquitto]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    uplink = Mosquitto(tmp_path / "uplink", extra=as_us())
    local = Mosquitto(tmp_path / "local", extra=as_us())
    uplink.start()
    # mosquitto's own defaults for the bridging broker: it saves to disk every 1800 s
    bridged = Mosquitto(tmp_path / "bridged", extra=[
        *as_us(), "autosave_interval 1800", "connection cloud",
        f"address 127.0.0.1:{uplink.port}", 'topic z2m/# out 1 "" bridge/',
        "cleansession false", "restart_timeout 1 2"])
    try:
        local.start()
        bridged.start()
        yield local, bridged, uplink
    finally:
        for broker in (local, bridged, uplink):
            broker.kill()


def traffic(seed: int) -> list[tuple[str, bytes]]:
    """MESSAGES messages over TOPICS topics, payloads unique and partly binary."""
    rng = random.Random(seed)
    out = []
    for n in range(MESSAGES):
        topic = f"z2m/dev{rng.randrange(TOPICS):02d}/state"
        out.append((topic, b'{"n":%d,"linkquality":%d}' % (n, rng.randrange(255))
                    + bytes([0, 255, n % 256])))
    return out


async def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]],
                      accepted: list[tuple[str, bytes]], *, window: int = 20) -> None:
    """Publish in order at QoS 1, reconnecting while the broker is down; ``accepted`` gets
    each message whose PUBACK came, in order. A message without PUBACK is sent again."""
    position = 0
    for _ in range(1000):  # bounded reconnects
        if position >= len(messages):
            return
        try:
            async with aiomqtt.Client(broker.host, broker.port, protocol=V5,
                                      max_inflight_messages=window) as client:
                client.pending_calls_threshold = window + 10
                while position < len(messages):
                    chunk = messages[position:position + window]
                    await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in chunk))
                    accepted.extend(chunk)
                    position += len(chunk)
                    await asyncio.sleep(0.005)  # a gateway's pace, not a flood
        except (aiomqtt.MqttError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("the publisher could not finish")


def gateway_file(folder: Path, local: Mosquitto, uplink: Mosquitto) -> Path:
    data: dict[str, Any] = settings(folder, port=uplink.port, prefix="pg", uplink={
        "batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5,
        "max_inflight": 32})
    data["store"]["synchronous"] = "full"
    data["gpio"] = {"enabled": False}
    data["inbound"] = {"enabled": False}
    data["local"] = {"host": local.host, "port": local.port}
    data["ingest"] = [{"topic": "z2m/+/state"}]
    return write(folder / "config.toml", data)


async def chaos(service: Service, uplink: Mosquitto, bridged: Mosquitto, rng: random.Random, *,
                log: list[str], received: Collector) -> None:
    """Uplink down for a while; pigateway SIGKILLed (KILLS rounds) at random moments, once
    during the outage and then while it publishes or drains the backlog; the bridging
    broker SIGKILLed once during the outage."""
    await asyncio.sleep(rng.uniform(0.3, 1.0))
    uplink.stop()
    log.append(f"uplink down ({len(received.got)} received)")
    await asyncio.sleep(rng.uniform(0.5, 1.5))
    service.kill()
    log.append("pigateway SIGKILL (outage)")
    await asyncio.sleep(rng.uniform(0.1, 0.5))
    service.start()
    await asyncio.sleep(rng.uniform(0.5, 1.5))
    bridged.kill()
    log.append("bridge SIGKILL (outage)")
    await asyncio.sleep(0.3)
    bridged.start()
    await asyncio.sleep(rng.uniform(0.5, 1.5))
    uplink.start()
    log.append(f"uplink up ({len(received.got)} received)")
    for _ in range(KILLS - 1):  # while it publishes, or drains the backlog
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        service.kill()
        log.append("pigateway SIGKILL (online)")
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        service.start()


async def _all_in(collector: Collector, accepted: list[tuple[str, bytes]]) -> bool:
    return check_arrived(collector, accepted, "pg/gw-test/forward/")[0] == 0


def check_arrived(collector: Collector, accepted: list[tuple[str, bytes]],
                  prefix: str) -> tuple[int, list[str]]:
    """(how many accepted messages are missing, order problems) for topics under prefix."""
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in accepted:
        by_topic.setdefault(topic, []).append(payload)
    missing = 0
    problems = []
    for topic, payloads in by_topic.items():
        firsts = collector.first_order(prefix + topic)
        got = set(firsts)
        missing += sum(1 for p in payloads if p not in got)
        kept = [p for p in firsts if p in set(payloads)]
        if kept != [p for p in payloads if p in got]:
            problems.append(topic)
    return missing, problems


async def test_nothing_accepted_is_lost_through_kills_and_an_outage(
        three: tuple[Mosquitto, Mosquitto, Mosquitto], folder: Path) -> None:
    local, bridged, uplink = three
    seed = int(os.environ.get("PIGATEWAY_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    messages = traffic(seed)
    service = Service(gateway_file(folder, local, uplink), folder / "service.log")
    ours: list[tuple[str, bytes]] = []
    theirs: list[tuple[str, bytes]] = []
    events: list[str] = []
    async with collecting(uplink, "pg/gw-test/forward/#", client_id="c-ours") as mine, \
            collecting(uplink, "bridge/#", client_id="c-bridge") as bridge:
        service.start()
        # the local broker keeps messages for ingest once its session exists: the first
        # start must have subscribed before the devices' messages count as kept for it
        assert await wait_until(lambda: "ingest: online" in service.tail(100_000), 20), \
            service.tail()
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(chaos(service, uplink, bridged, rng, log=events,
                                           received=mine),
                                     publish_all(local, messages, ours),
                                     publish_all(bridged, messages, theirs))
                await until(lambda: _all_in(mine, ours), DEADLINE)
                await asyncio.sleep(1.0)  # what the bridge still had in its queue
        except TimeoutError:
            pass
        finally:
            service.stop()
    missing, disorder = check_arrived(mine, ours, "pg/gw-test/forward/")
    lost_by_bridge, _ = check_arrived(bridge, theirs, "bridge/")
    duplicates = len(mine.got) - len({g.payload for g in mine.got})
    print(f"\nseed {seed}; {len(ours)} accepted; events {events}; pigateway lost {missing}, "
          f"duplicates {duplicates}; bridge lost {lost_by_bridge} of {len(theirs)}")
    if missing:
        got = {g.payload for g in mine.got}
        lost = [p[:12] for _, p in ours if p not in got]
        print("lost:", lost[:5], "...", lost[-5:], "of", len(mine.got), "received")
        print("first received:", [(g.topic, g.payload[:14]) for g in mine.got[:3]])
    if missing and service.log is not None and os.environ.get("PIGATEWAY_CHAOS_LOG"):
        print(*[line for line in service.log.read_text(errors="replace").splitlines()
                if "acknowledged by the broker" not in line][-60:], sep="\n")
    assert len(ours) == MESSAGES
    assert missing == 0, (f"seed {seed}: {missing} accepted messages never arrived; "
                          f"{service.tail()}")
    assert disorder == [], f"seed {seed}: first deliveries out of order on {disorder}"
    assert all(g.payload in {p for _, p in ours} for g in mine.got)
