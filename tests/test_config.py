"""Config validation: every bad value names its key, the value and what is allowed.

The table below holds one bad value per rule and section; each row says which key the
error must name and which words must appear in it. A gateway that will not start must
say why in one line that an operator can act on without reading the source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pigateway import config as configuration
from pigateway.config import DEFAULT_PATH, Config, StoreConfig
from pigateway.config.schema import options
from pigateway.errors import ConfigError

GW = 'gateway_id = "gw-1"\n'

#: (TOML, the key the error names, words the message must contain)
BAD_VALUES: list[tuple[str, str, tuple[str, ...]]] = [
    ("", "gateway_id", ("is required",)),
    ('gateway_id = "bad id!"', "gateway_id", ("'bad id!'", "letters, digits")),
    ("gateway_id = 5", "gateway_id", ("int 5", "non-empty string")),
    (GW + "store = 5", "store", ("int 5", "must be a table")),
    (GW + "[store]\nmax_commands = 0", "store.max_commands", ("0", "least allowed is 1")),
    (GW + '[store]\nmax_commands = "many"', "store.max_commands",
     ("str 'many'", "whole number")),
    (GW + "[store]\nmax_commands = true", "store.max_commands", ("bool True", "whole number")),
    (GW + "[store]\nmax_commands = 1.5", "store.max_commands", ("float 1.5", "whole number")),
    (GW + "[store]\nmax_bytes = 10", "store.max_bytes", ("10", "least allowed is 1024")),
    (GW + '[store]\noverflow = "drop-newest"', "store.overflow",
     ("'drop-newest'", "'reject', 'drop-oldest'")),
    (GW + '[store]\nsynchronous = "off"', "store.synchronous", ("'off'", "'full', 'normal'")),
    (GW + "[store]\ndefault_ttl = -1", "store.default_ttl", ("-1", "least allowed is 0")),
    (GW + '[store]\ndefault_ttl = "1h"', "store.default_ttl", ("str '1h'", "number")),
    (GW + "[store]\ndefault_ttl = nan", "store.default_ttl", ("float nan", "finite number")),
    (GW + "[store]\ndefault_ttl = inf", "store.default_ttl", ("float inf", "finite number")),
    (GW + "[uplink]\nbatch_delay = -nan", "uplink.batch_delay", ("nan", "finite number")),
    (GW + "[store]\nmax_attempts = 0", "store.max_attempts", ("0", "least allowed is 1")),
    (GW + "[store]\nmin_free_bytes = -1", "store.min_free_bytes", ("-1", "least allowed is 0")),
    (GW + "[store]\nmax_params_bytes = 8", "store.max_params_bytes", ("8", "least allowed")),
    (GW + '[store]\npath = ""', "store.path", ("''", "non-empty string")),
    (GW + "[mqtt]\nport = 70000", "mqtt.port", ("70000", "most allowed is 65535")),
    (GW + "[mqtt]\nport = 0", "mqtt.port", ("0", "least allowed is 1")),
    (GW + '[mqtt]\nprotocol = "4"', "mqtt.protocol", ("'4'", "'5', '3.1.1'")),
    (GW + '[mqtt]\ntopic_prefix = "a/#"', "mqtt.topic_prefix", ("'a/#'", "does not match")),
    (GW + '[mqtt]\ntopic_prefix = "a\\nb"', "mqtt.topic_prefix", ("'a\\nb'", "control character")),
    (GW + "[mqtt]\nkeepalive = 1", "mqtt.keepalive", ("1", "least allowed is 5")),
    (GW + "[mqtt]\nhost = 5", "mqtt.host", ("int 5", "non-empty string")),
    (GW + '[mqtt]\nhost = "broker example"', "mqtt.host", ("'broker example'",
                                                          "host name or an IP address")),
    (GW + '[mqtt]\nhost = "mqtt://broker"', "mqtt.host", ("host name or an IP address",)),
    (GW + '[mqtt]\nusername = "gw\\u0000"', "mqtt.username", ("'gw\\x00'", "control character")),
    (GW + '[mqtt]\nusername = "gw\\nx"', "mqtt.username", ("control character (U+000A",)),
    (GW + '[mqtt]\nhost = "' + "h" * 300 + '"', "mqtt.host", ("...", "host name")),
    (GW + '[mqtt.tls]\nenabled = "yes"', "mqtt.tls.enabled", ("str 'yes'", "true or false")),
    (GW + '[mqtt.tls]\nkey_file = "/k.pem"', "mqtt.tls.key_file", ("mqtt.tls.cert_file",)),
    (GW + "[uplink]\nbatch_delay = 100", "uplink.batch_delay", ("100", "most allowed is 60")),
    (GW + "[uplink]\nmax_inflight = 0", "uplink.max_inflight", ("0", "least allowed is 1")),
    (GW + "[uplink]\nbackoff_initial = 5.0\nbackoff_max = 1.0", "uplink.backoff_max",
     ("1.0", "5.0", ">= uplink.backoff_initial")),
    (GW + "[inbound]\nworkers = 0", "inbound.workers", ("0", "least allowed is 1")),
    (GW + "[inbound]\nbackoff_initial = 9.0\nbackoff_max = 2.0", "inbound.backoff_max",
     ("2.0", "9.0", ">= inbound.backoff_initial")),
    (GW + '[gpio]\npin_factory = "rpigpio"', "gpio.pin_factory",
     ("'rpigpio'", "'auto', 'lgpio', 'mock'")),
    (GW + "[gpio]\ngreen_led = 60", "gpio.green_led", ("60", "most allowed is 53")),
    (GW + "[gpio]\nbargraph = 5", "gpio.bargraph", ("int 5", "must be a list")),
    (GW + '[gpio]\nbargraph = [20, "x"]', "gpio.bargraph[1]", ("str 'x'", "whole number")),
    (GW + "[gpio]\ngreen_led = 5", "gpio", ("used twice", "5")),
    (GW + "[control]\nsocket = 5", "control.socket", ("int 5", "non-empty string")),
    (GW + '[store]\npath = "queue.db"', "store.path", ("'queue.db'", "absolute")),
    (GW + '[store]\npath = "./var/q.db"', "store.path", ("'var/q.db'", "absolute")),
    (GW + '[store]\npath = "/var/q\\u0000.db"', "store.path",
     ("'/var/q\\x00.db'", "control character (U+0000")),
    (GW + '[control]\nsocket = "c.sock"', "control.socket", ("'c.sock'", "absolute")),
    (GW + '[mqtt]\npassword_file = "pw"', "mqtt.password_file", ("'pw'", "absolute")),
    (GW + '[mqtt.tls]\nca_file = "ca.pem"', "mqtt.tls.ca_file", ("'ca.pem'", "absolute")),
    (GW + '[mqtt.tls]\ncert_file = "c.pem"', "mqtt.tls.cert_file", ("'c.pem'", "absolute")),
    (GW + '[mqtt.tls]\ncert_file = "/c.pem"\nkey_file = "k.pem"', "mqtt.tls.key_file",
     ("'k.pem'", "absolute")),
    (GW + '[log]\nlevel = "verbose"', "log.level", ("'verbose'", "'debug', 'info'")),
    (GW + "devices = 5", "devices", ("table",)),
    (GW + "[devices]\nlamp = 5", "devices.lamp", ("must be a table", "handler")),
    (GW + "[devices.lamp]\npin = 4", "devices.lamp.handler", ("is required", "None")),
    (GW + '[devices."bad name"]\nhandler = "log"', "devices.bad name", ("letters, digits",)),
]

UNKNOWN_KEYS: list[tuple[str, str, str]] = [
    (GW + "colour = 1", "colour", "gateway_id"),
    (GW + "[store]\nmax_comands = 1", "store.max_comands", "max_commands"),
    (GW + "[mqtt.tls]\nverify = false", "mqtt.tls.verify", "ca_file"),
    (GW + "[nosuch]\nx = 1", "nosuch", "store"),
    (GW + "[gpio]\nled = 4", "gpio.led", "green_led"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD_VALUES,
                         ids=[row[1] + "-" + str(i) for i, row in enumerate(BAD_VALUES)])
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(
        text: str, key: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        configuration.parse(text)
    assert caught.value.key == key
    message = str(caught.value)
    assert message.startswith(f"config: {key}: ")
    missing = [word for word in words if word not in message]
    assert missing == [], message


@pytest.mark.parametrize(("text", "key", "allowed"), UNKNOWN_KEYS)
def test_unknown_keys_are_errors_that_list_the_allowed_ones(text: str, key: str,
                                                            allowed: str) -> None:
    with pytest.raises(ConfigError, match="unknown key") as caught:
        configuration.parse(text)
    assert caught.value.key == key
    assert allowed in str(caught.value)


def test_defaults_are_what_a_pi_gateway_needs() -> None:
    config = configuration.parse(GW)
    assert config.gateway_id == "gw-1"
    assert config.store == StoreConfig()
    assert config.store.path == Path("/var/lib/pigateway/queue.db")
    assert (config.store.overflow, config.store.synchronous) == ("reject", "full")
    assert config.store.max_commands == 1_000_000
    assert config.store.min_free_bytes > 0 and config.store.default_ttl > 0
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.topic_prefix) == \
        ("localhost", 1883, "pigateway")
    assert config.mqtt.tls.enabled is False
    assert config.gpio.pin_factory == "auto"
    assert config.control.socket == Path("/run/pigateway/control.sock")
    assert config.log.level == "info"
    assert config.devices == {}
    assert config.source is None


def test_values_are_converted_to_their_types() -> None:
    config = configuration.parse(GW + '[store]\npath = "/data/q.db"\ndefault_ttl = 60\n'
                                 '[uplink]\nbatch_delay = 1\n[gpio]\nbargraph = [20, 21]\n'
                                 "red_led = 22\n"
                                 '[devices.lamp]\nhandler = "gpio"\npin = 4\n')
    assert config.store.path == Path("/data/q.db")
    assert isinstance(config.store.default_ttl, float) and config.store.default_ttl == 60.0
    assert isinstance(config.uplink.batch_delay, float)
    assert config.gpio.bargraph == [20, 21]
    lamp = config.devices["lamp"]
    assert (lamp.name, lamp.handler, lamp.options) == ("lamp", "gpio", {"pin": 4})


def test_the_config_is_frozen() -> None:
    config = configuration.parse(GW)
    with pytest.raises(AttributeError):
        config.gateway_id = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.store.max_commands = 1  # type: ignore[misc]


def test_as_dict_is_plain_json() -> None:
    config = configuration.parse(GW + '[devices.lamp]\nhandler = "log"\n')
    data = json.loads(json.dumps(config.as_dict()))
    assert data["store"]["path"] == "/var/lib/pigateway/queue.db"
    assert data["devices"]["lamp"]["handler"] == "log"


@pytest.mark.parametrize("text", [
    GW + "x = " + "[" * 5000 + "]" * 5000,
    GW + "x = " + "{y = " * 3000 + "1" + "}" * 3000,
    GW + "[store]\nmax_commands = " + "9" * 5000,
])
def test_toml_that_python_cannot_hold_is_a_config_error(text: str) -> None:
    """tomllib raises RecursionError on deep nesting and ValueError on a 5,000-digit integer."""
    with pytest.raises(ConfigError) as caught:
        configuration.parse(text, origin="deep.toml")
    assert caught.value.key == "(syntax)" and "deep.toml" in str(caught.value)
    assert len(str(caught.value)) < 500


def test_a_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GW + "[store\n")
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        configuration.load(path)
    assert caught.value.key == "(syntax)"
    assert str(path) in str(caught.value)


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        configuration.load(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(caught.value)


def test_a_file_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        configuration.load(path)


def test_load_remembers_where_the_config_came_from(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(GW)
    assert configuration.load(path).source == path


def test_pigateway_config_is_used_when_no_path_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = tmp_path / "env.toml"
    from_env.write_text('gateway_id = "from-env"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('gateway_id = "explicit"\n')
    monkeypatch.setenv("PIGATEWAY_CONFIG", str(from_env))
    assert configuration.load().gateway_id == "from-env"
    assert configuration.load(explicit).gateway_id == "explicit"  # --config wins


def test_without_a_path_or_environment_the_default_path_is_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIGATEWAY_CONFIG", raising=False)
    assert configuration.config_path() == DEFAULT_PATH == Path("/etc/pigateway/config.toml")
    assert configuration.config_path("x.toml") == Path("x.toml")


def _path_keys() -> list[str]:
    """Every option of the schema whose type is a path (found, not listed by hand)."""
    return [key for key, kind, _, _ in configuration.fields_reference() if "path" in kind]


def _config_with(key: str, value: str) -> dict[str, Any]:
    """A config mapping with ``value`` at the dotted ``key`` (and what it needs beside it)."""
    data: dict[str, Any] = {"gateway_id": "gw"}
    *sections, leaf = key.split(".")
    table = data
    for section in sections:
        table = table.setdefault(section, {})
    table[leaf] = value
    if key in ("mqtt.tls.key_file", "local.tls.key_file"):
        table["cert_file"] = "/etc/pigateway/cert.pem"
    return data


def test_the_schema_has_path_options() -> None:
    assert {"store.path", "control.socket", "mqtt.password_file", "mqtt.tls.ca_file",
            "mqtt.tls.cert_file", "mqtt.tls.key_file"} <= set(_path_keys())


@pytest.mark.parametrize("key", _path_keys())
def test_every_path_option_must_be_absolute(key: str) -> None:
    """A relative path means a different file in each working directory (under systemd,
    ``/run/pigateway``, deleted at every stop): each one, present and future, is refused."""
    with pytest.raises(ConfigError) as caught:
        configuration.from_dict(_config_with(key, "relative/file"))
    assert caught.value.key == key
    assert "'relative/file'" in caught.value.problem and "absolute" in caught.value.problem
    configuration.from_dict(_config_with(key, "/abs/file"))


def test_python_callers_get_the_same_rule() -> None:
    with pytest.raises(ConfigError) as caught:
        StoreConfig(path="queue.db")  # type: ignore[arg-type]
    assert caught.value.key == "store.path"
    with pytest.raises(ConfigError) as caught:
        configuration.ControlConfig(socket=Path("c.sock"))
    assert caught.value.key == "control.socket"
    with pytest.raises(ConfigError, match="NUL"):
        StoreConfig(path="/data/q\x00.db")  # type: ignore[arg-type]
    assert StoreConfig(path="/data/q.db").path == Path("/data/q.db")  # type: ignore[arg-type]


def test_the_reference_covers_every_option() -> None:
    keys = {row[0] for row in configuration.fields_reference()}
    store_keys = {f"store.{opt.name}" for opt in options(StoreConfig)}
    assert "store.busy_timeout" in store_keys and store_keys <= keys
    assert {"mqtt.tls.ca_file", "uplink.max_inflight", "gpio.pin_factory", "log.level"} <= keys
    assert "gateway_id" not in keys and "devices" not in keys
    assert Config.__dataclass_fields__.keys() >= {"gateway_id", "store", "mqtt", "gpio"}


def test_the_store_section_is_a_frozen_value() -> None:
    """``[store]`` is a plain class (``send`` loads no dataclasses), held to what a frozen
    dataclass promises: equal by value, hashable, immutable, copied with changes checked."""
    first = StoreConfig(path=Path("/data/q.db"), max_commands=5)
    assert first == StoreConfig(path=Path("/data/q.db"), max_commands=5) != StoreConfig()
    assert hash(first) == hash(StoreConfig(path=Path("/data/q.db"), max_commands=5))
    assert repr(first).startswith("StoreConfig(path=PosixPath('/data/q.db'), max_commands=5,")
    with pytest.raises(AttributeError):
        first.max_commands = 6  # type: ignore[misc]
    changed = first.replace(max_commands=6)
    assert (changed.max_commands, changed.path, first.max_commands) == (6, first.path, 5)
    with pytest.raises(ConfigError, match="absolute"):
        first.replace(path="queue.db")


def _unit_seconds(key: str) -> float:
    """A time setting of the shipped unit file (``30s``, ``1min``, ``90``) in seconds."""
    unit = Path(__file__).resolve().parent.parent / "systemd" / "pigateway.service"
    [value] = [line.split("=", 1)[1].strip() for line in unit.read_text().splitlines()
               if line.startswith(f"{key}=")]
    number, unit_name = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|)", value).groups()  # type: ignore[union-attr]
    return float(number) * (60 if unit_name == "min" else 1)


def test_the_longest_publish_timeout_lets_a_stop_fit_the_units_timeout() -> None:
    """The bounded stop (app.py) lasts publish_timeout + WIND_DOWN + STOP_SLACK; systemd
    kills the service at TimeoutStopSec. With the largest publish_timeout the config
    accepts, the stop must still end by itself, before the kill."""
    from pigateway.app import STOP_SLACK, WIND_DOWN  # noqa: PLC0415 - the service's parts

    largest = configuration.UplinkConfig.__dataclass_fields__["publish_timeout"].metadata["max"]
    assert largest is not None, "uplink.publish_timeout needs an upper bound"
    assert largest + WIND_DOWN + STOP_SLACK < _unit_seconds("TimeoutStopSec")
    configuration.parse(GW + f"[uplink]\npublish_timeout = {largest}")
    with pytest.raises(ConfigError, match="most allowed") as caught:
        configuration.parse(GW + f"[uplink]\npublish_timeout = {largest + 0.5}")
    assert caught.value.key == "uplink.publish_timeout"
