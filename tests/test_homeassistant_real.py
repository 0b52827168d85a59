"""pigateway in a real Home Assistant (2024.3, its own venv, build/ha-venv), through a real
mosquitto, read through HA's own REST API: the entities HA made of the discovery, their
states, unavailable while pigateway is dead and back when it is, and the paused switch
turned on in HA pausing the gateway (``pigateway status``).

The first run installs Home Assistant (a few minutes, once; cached in build/ha-venv); the
test itself takes well under a minute after that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import gateway
from harness.broker import Mosquitto
from harness.ha_helpers import ha_tables
from harness.homeassistant import HomeAssistant, ensure_installed
from harness.service import Service, environment
from pigateway import __version__

pytestmark = [pytest.mark.broker, pytest.mark.homeassistant]

NODE = "pigateway_gw_test"
ENTITIES = {
    "binary_sensor.pigateway_gw_test_uplink": "on",
    "binary_sensor.pigateway_gw_test_problem": "off",
    "switch.pigateway_gw_test_paused": "off",
    "sensor.pigateway_gw_test_depth": "0",
    "sensor.pigateway_gw_test_oldest_age": "unknown",
    "sensor.pigateway_gw_test_dead_letters": "0",
    "sensor.pigateway_gw_test_delivered": "0",
    "sensor.pigateway_gw_test_forwarded": "0",
    "sensor.pigateway_gw_test_refusals": "0",
    "sensor.pigateway_gw_test_last_error": "none",
    "sensor.pigateway_gw_test_version": __version__,
    "sensor.pigateway_gw_test_disk_free": None,  # a number, whatever this disk has
    "button.pigateway_gw_test_flush": None,  # a button's state is when it was last pressed
    "button.pigateway_gw_test_requeue_dead": None,
}


@pytest.fixture(scope="module")
def installed() -> None:
    why = ensure_installed()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def home_assistant(installed: None, tmp_path: Path, mosquitto: Mosquitto
                   ) -> Iterator[HomeAssistant]:
    with HomeAssistant(tmp_path / "ha", mosquitto.port) as ha:
        yield ha


def until(check: Callable[[], bool], timeout: float, what: str, ha: HomeAssistant,
          seen: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s: {seen()}\n{ha.tail(1500)}")


def states(ha: HomeAssistant) -> dict[str, Any]:
    return {s["entity_id"]: s for s in ha.get("/api/states")
            if s["entity_id"].split(".", 1)[1].startswith(NODE)}


def clear_retained(port: int, pattern: str) -> None:
    """Remove every retained message under ``pattern`` (a broker that lost its store)."""
    found = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", pattern,
                            "-v", "--retained-only", "-W", "2"],
                           capture_output=True, timeout=10, check=False).stdout
    topics = {line.split(b" ", 1)[0].decode() for line in found.splitlines() if line}
    assert topics, "nothing retained to clear"
    for topic in topics:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic,
                        "-r", "-n"], check=True, timeout=10)


def pigateway(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pigateway", *args], capture_output=True,
                          env=environment(), timeout=30, check=True)
    return done.stdout.decode()


def status(config: Path) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(pigateway("status", "--json", "--config", str(config)))
    return parsed


def test_home_assistant_shows_and_controls_the_gateway(
        tmp_path: Path, mosquitto: Mosquitto, home_assistant: HomeAssistant,
        unique_prefix: str) -> None:
    ha = home_assistant
    config = gateway.write(tmp_path / "config.toml", gateway.settings(
        tmp_path, port=mosquitto.port, prefix=unique_prefix,
        **ha_tables(log={"level": "info"})))
    with Service(config, tmp_path / "pigateway.log") as service:
        def all_there() -> bool:
            now = states(ha)
            wrong.clear()
            wrong.update({e: now.get(e, {}).get("state") for e, want in ENTITIES.items()
                          if e not in now or want not in (None, now[e]["state"])
                          or now[e]["state"] == "unavailable"})
            return not wrong
        wrong: dict[str, Any] = {}
        until(all_there, 30, "every entity with its state", ha, lambda: wrong)
        now = states(ha)
        assert set(now) == set(ENTITIES), sorted(set(now) ^ set(ENTITIES))
        assert ha.listening() == [f"127.0.0.1:{ha.port}"]  # loopback only, its API alone
        assert float(now["sensor.pigateway_gw_test_disk_free"]["state"]) > 0
        assert now["sensor.pigateway_gw_test_disk_free"]["attributes"][
            "unit_of_measurement"] == "MiB"
        assert now["sensor.pigateway_gw_test_delivered"]["attributes"][
            "state_class"] == "total_increasing"
        assert now["binary_sensor.pigateway_gw_test_uplink"]["attributes"][
            "device_class"] == "connectivity"

        # a command delivered shows in HA's counter; the buttons reach the gateway
        pigateway("send", "--config", str(config), "--device", "lamp", "--command", "on")
        until(lambda: ha.state("sensor.pigateway_gw_test_delivered")["state"] == "1", 10,
              "delivered 1", ha)  # type: ignore[index]
        for button in ("flush", "requeue_dead"):
            ha.post("/api/services/button/press", {"entity_id": f"button.{NODE}_{button}"})
            said = f"homeassistant: {button} PRESS"
            until(lambda: said in service.tail(20_000), 10, f"the {button} button", ha)  # noqa: B023

        # the paused switch, turned on in HA, pauses the gateway
        ha.post("/api/services/switch/turn_on", {"entity_id": "switch.pigateway_gw_test_paused"})
        until(lambda: status(config).get("paused") is True, 10, "pigateway status: paused", ha)
        until(lambda: ha.state("switch.pigateway_gw_test_paused")["state"] == "on", 10,
              "the switch showing on", ha)  # type: ignore[index]
        ha.post("/api/services/switch/turn_off",
                {"entity_id": "switch.pigateway_gw_test_paused"})
        until(lambda: status(config).get("paused") is False, 10, "resumed", ha)

        # pigateway dies: every entity goes unavailable (its last will)
        service.kill()
        until(lambda: all(s["state"] == "unavailable" for s in states(ha).values()), 15,
              "every entity unavailable", ha)
        service.start()
        until(all_there, 30, "every entity back", ha, lambda: wrong)

        # Home Assistant restarts, and the broker has lost the retained discovery meanwhile:
        # the entities come back only because pigateway answers HA's "online" with it again
        ha.stop()
        clear_retained(mosquitto.port, "homeassistant/#")
        ha.start()
        until(all_there, 30, "every entity after HA's restart", ha, lambda: wrong)
        assert "homeassistant: connected" in service.tail(50_000)
    assert service.tail().count("Traceback") == 0
