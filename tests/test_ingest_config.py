"""What ``config check`` refuses in ``[local]`` and ``[[ingest]]``, each naming the keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Run
from harness.gateway import settings, write
from pigateway.config import Config, from_dict
from pigateway.errors import ConfigError
from pigateway.mqtt.topics import NAME_SLOT, filter_may_match


def ingest_config(folder: Path, *rules: dict[str, Any], **tables: Any) -> Config:
    data = settings(folder, port=18830, **tables)
    data["local"] = {"host": "127.0.0.1", "port": 1883, **data.get("local", {})}
    data["ingest"] = list(rules)
    return from_dict(data)


def test_qos_zero_is_refused_because_nothing_would_be_acknowledged(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ingest_config(tmp_path, {"topic": "z2m/#", "qos": 0})
    assert caught.value.key == "ingest[0].qos"
    assert "never acknowledged" in str(caught.value)


@pytest.mark.parametrize("qos", [1, 2])
def test_qos_one_and_two_are_accepted(tmp_path: Path, qos: int) -> None:
    assert ingest_config(tmp_path, {"topic": "z2m/#", "qos": qos}).ingest[0].qos == qos


def loop_config(folder: Path, *, protocol: str = "3.1.1", rule: str = "z2m/#",
                port: int = 1883, template: str = "z2m/{device}/set") -> Path:
    data = settings(folder, port=18830)
    data["local"] = {"host": "127.0.0.1", "port": 1883, "protocol": protocol}
    data["ingest"] = [{"topic": "zigbee2mqtt/+/state"}, {"topic": rule}]
    data["devices"] = {"lamp": {"handler": "mqtt", "host": "localhost", "port": port,
                                "topic": template}}
    return write(folder / "config.toml", data)


def test_config_check_refuses_a_loop_mqtt_3_cannot_break(tmp_path: Path, cli: Run) -> None:
    """Under MQTT 3.1.1 the local link has no user properties: ingest cannot tell the mqtt
    handler's own publishes from a device's, and a rule matching the handler's topic would
    send them to the cloud. config check names the rule, the handler and the way out."""
    code, _, err = cli("config", "check", "--config", str(loop_config(tmp_path)))
    assert code == 78, err
    assert "devices.lamp.topic" in err and "ingest[1].topic" in err
    assert "local.protocol" in err


@pytest.mark.parametrize("change", [
    {"protocol": "5"},  # the origin property keeps the handler's publishes out
    {"rule": "z2m/+/state"},  # the rule cannot match z2m/<device>/set
    {"port": 1884},  # the handler publishes to another broker
    {"rule": "z2m/lamp/set/x"},
])
def test_config_check_accepts_what_cannot_loop(tmp_path: Path, cli: Run,
                                               change: dict[str, Any]) -> None:
    code, _, err = cli("config", "check", "--config", str(loop_config(tmp_path, **change)))
    assert code == 0, err


@pytest.mark.parametrize(("pattern", "template", "loops"), [
    ("#", "a/{name}", True),
    ("a/+/c", "a/{name}", True),  # a command name may hold a '/'
    ("a/b", "a/{name}/c", False),
    ("+/+", "{gateway}/x", True),
    ("z2m/lamp/set", "z2m/{device}/set", True),
    ("z2m/hall/set", "z2m/{device}/set", False),
    ("z2m/#", "zigbee2mqtt/{device}/set", False),
])
def test_a_rule_can_match_a_handler_topic(pattern: str, template: str, loops: bool) -> None:
    topic = template.format(device="lamp", gateway="gw", name=NAME_SLOT)
    assert filter_may_match(pattern, topic) is loops
