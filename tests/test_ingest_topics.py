"""A forwarded message whose uplink topic cannot be published fails alone, at ingest.

The uplink topic of a forward is ``remote_topic`` with the local topic in it: a local topic
near MQTT's 65,535-byte limit makes one over it, and a cloud profile's own limits (AWS IoT:
256 bytes, 7 slashes) can be passed the same way. Such a message is dead-lettered
``invalid`` with the reason when it is taken, and acknowledged: never queued, so the drain
never meets it, and the messages around it go on. Real brokers on loopback, the Gateway in
this process, a real SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Mosquitto
from harness.gateway import settings
from harness.ingest_helpers import brokers, collecting, publish
from harness.service import running_gateway
from harness.waits import until, wait_until
from pigateway.config import from_dict
from pigateway.ingest.service import forward_topic_problem
from pigateway.state import Link

FAST = {"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    yield from brokers(tmp_path)


async def _dead(gateway: Any) -> int:
    return 0 if gateway.store is None else (await gateway.store.stats()).dead_total


async def test_a_local_topic_too_long_to_forward_is_dead_lettered_alone(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    local, uplink = pair
    data = settings(folder, port=uplink.port, prefix="pg", uplink=FAST,
                    store={"max_params_bytes": 256 * 1024, "min_free_bytes": 0})
    data["gpio"] = {"enabled": False}
    data["local"] = {"host": local.host, "port": local.port}
    data["ingest"] = [{"topic": "z2m/#"}]
    long_topic = "z2m/" + "x" * 65_520  # fine locally; "pg/gw-test/forward/" makes it too long
    async with collecting(uplink, "pg/gw-test/forward/#") as collector, \
            running_gateway(from_dict(data)) as gateway:
        assert await wait_until(lambda: gateway.state.local is Link.ONLINE, 10)
        assert await publish(local, [("z2m/a", b"before"), (long_topic, b"too long"),
                                     ("z2m/a", b"after")], window=1) == 3
        assert await wait_until(lambda: [g.payload for g in collector.got] == [
            b"before", b"after"], 10), [g.payload for g in collector.got]
        assert await until(lambda: _wait_dead(gateway), 5)
        assert gateway.store is not None
        dead = await gateway.store.list_dead()
        assert gateway.state.local is Link.ONLINE
    assert len(dead) == 1
    assert dead[0].reason == "invalid"
    assert "65535 bytes" in (dead[0].detail or "")
    assert len(dead[0].command.device) <= 128


async def _wait_dead(gateway: Any) -> bool:
    return await _dead(gateway) == 1


def test_a_cloud_profile_limits_forwarded_topics_too(tmp_path: Path) -> None:
    data = settings(tmp_path, port=8883, prefix="pg")
    data["mqtt"].update(profile="aws-iot", tls={"enabled": True})
    data["local"] = {"host": "127.0.0.1", "port": 1883}
    data["ingest"] = [{"topic": "z2m/#"}]
    config = from_dict(data)
    assert forward_topic_problem(config, "pg/gw/forward/z2m/a") is None
    assert "256" in (forward_topic_problem(config, "pg/" + "y" * 300) or "")
    assert "slashes" in (forward_topic_problem(config, "a/b/c/d/e/f/g/h/i") or "")
    assert "wildcard" in (forward_topic_problem(config, "pg/+/x") or "")
