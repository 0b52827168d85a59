"""Device handlers: the registry, option errors that name the key, and the built-ins."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from harness import gateway
from harness.broker import Mosquitto, mosquitto_binary
from pigateway.config import Config, DeviceConfig
from pigateway.errors import ConfigError, InvalidCommand
from pigateway.handlers import Handler, Request, available, build, check
from pigateway.handlers.gpio import GpioHandler
from pigateway.handlers.log import LogHandler


@pytest.fixture
def pins() -> Iterator[MockFactory]:
    """gpiozero's MockFactory as the process-wide factory, as ``pin_factory = "mock"`` uses."""
    factory = MockFactory()
    Device.pin_factory = factory
    yield factory
    factory.reset()
    Device.pin_factory = None


def config_with(devices: dict[str, Any], **gpio: Any) -> Config:
    return gateway.config(gateway_id="gw", gpio={"pin_factory": "mock", **gpio}, devices=devices)


def make(devices: dict[str, Any], name: str, **gpio: Any) -> Handler:
    config = config_with(devices, **gpio)
    return build(config.devices[name], config)


def request(name: str, params: dict[str, Any] | None = None, id_: str = "c1") -> Request:
    return Request(id=id_, device="dev", name=name, params=params or {})


# --------------------------------------------------------------------------- registry


def test_builtins_are_registered_as_entry_points() -> None:
    assert {"log", "gpio", "mqtt"} <= set(available())


def test_an_unknown_handler_names_the_device_key() -> None:
    with pytest.raises(ConfigError) as caught:
        make({"siren": {"handler": "nope"}}, "siren")
    assert caught.value.key == "devices.siren.handler"
    assert "installed: " in caught.value.problem and "gpio" in caught.value.problem


def test_injected_factories_replace_the_entry_points() -> None:
    config = config_with({"x": {"handler": "mine"}})
    built = build(config.devices["x"], config, {"mine": LogHandler})
    assert isinstance(built, LogHandler)


OPTION_ERRORS = [
    ({"handler": "gpio"}, "devices.dev.pin", "is required"),
    ({"handler": "gpio", "pin": "20"}, "devices.dev.pin", "whole number"),
    ({"handler": "gpio", "pin": 99}, "devices.dev.pin", "too large"),
    ({"handler": "gpio", "pin": 20, "pinn": 3}, "devices.dev.pinn", "unknown option"),
    ({"handler": "gpio", "pin": 20, "initial": "maybe"}, "devices.dev.initial", "not allowed"),
    ({"handler": "gpio", "pin": 17}, "devices.dev.pin", "already gpio.green_led"),
    ({"handler": "log", "level": "loud"}, "devices.dev.level", "not allowed"),
    ({"handler": "mqtt", "topic": "z/{nope}/set"}, "devices.dev.topic", "not a topic template"),
    ({"handler": "mqtt", "topic": "z/#/{device}"}, "devices.dev.topic", "invalid topic"),
    ({"handler": "mqtt", "port": 0}, "devices.dev.port", "too small"),
    ({"handler": "mqtt", "password_file": "/nonexistent/pw"}, "devices.dev.password_file",
     "cannot read"),
    ({"handler": "mqtt", "password_file": "pw"}, "devices.dev.password_file", "absolute"),
    ({"handler": "mqtt", "target": "hall/#"}, "devices.dev.target", "'hall/#'"),
    ({"handler": "mqtt", "target": "hall/+/x"}, "devices.dev.target", "wildcard"),
    ({"handler": "mqtt", "target": "hall\x00"}, "devices.dev.target", "control character"),
    ({"handler": "mqtt", "target": "hall\nlamp"}, "devices.dev.target", "control character"),
    ({"handler": "mqtt", "target": "x" * 70_000}, "devices.dev.target", "65535"),
    ({"handler": "mqtt", "topic": "z/\x7f/{device}"}, "devices.dev.topic", "control character"),
    ({"handler": "mqtt", "topic": "z/{device:>70000}"}, "devices.dev.topic", "65535"),
    ({"handler": "mqtt", "host": "broker example"}, "devices.dev.host", "host name"),
    ({"handler": "mqtt", "host": "a" * 300}, "devices.dev.host", "host name"),
    ({"handler": "mqtt", "username": "gw\x00"}, "devices.dev.username", "control character"),
    ({"handler": "mqtt", "password_credential": "../../etc/shadow"},
     "devices.dev.password_credential", "credential name"),
]


@pytest.mark.parametrize(("options", "key", "words"), OPTION_ERRORS,
                         ids=[f"{o['handler']}-{k.rsplit('.', 1)[1]}-{w}" for o, k, w in
                              OPTION_ERRORS])
def test_option_errors_name_the_device_and_key(pins: MockFactory, options: dict[str, Any],
                                               key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make({"dev": options}, "dev")
    assert caught.value.key == key
    assert words in caught.value.problem


# --------------------------------------------------------------------------- log


async def test_log_handler_records_the_command_with_its_id(
        caplog: pytest.LogCaptureFixture) -> None:
    handler = make({"dev": {"handler": "log"}}, "dev")
    with caplog.at_level(logging.INFO, logger="pigateway.handlers.log"):
        assert await handler.run(request("beep", {"n": 2}, id_="abc")) is None
    [record] = [r for r in caplog.records if r.name == "pigateway.handlers.log"]
    assert record.levelno == logging.INFO
    assert record.command_id == "abc"  # type: ignore[attr-defined]
    assert record.device == "dev"  # type: ignore[attr-defined]
    assert "beep" in record.getMessage() and "'n': 2" in record.getMessage()
    await handler.close()
    await handler.close()


# --------------------------------------------------------------------------- gpio


async def test_gpio_on_off_drive_the_pin(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 20}}, "dev")
    pin = pins.pin(20)
    assert pin.state is False
    assert await handler.run(request("on")) == {"on": True}
    assert pin.state is True
    assert await handler.run(request("on", id_="c2")) == {"on": True}  # idempotent
    assert await handler.run(request("off", id_="c3")) == {"on": False}
    assert pin.state is False
    assert await handler.run(request("state", id_="c4")) == {"on": False}
    await handler.close()
    await handler.close()


async def test_gpio_active_low_relay_inverts_the_level(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 21, "active_high": False,
                            "initial": "off"}}, "dev")
    assert pins.pin(21).state is True  # off = high on an active-low board
    await handler.run(request("on"))
    assert pins.pin(21).state is False
    await handler.close()


async def test_gpio_toggle_is_safe_to_repeat_per_command_id(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 22}}, "dev")
    assert await handler.run(request("toggle", id_="t1")) == {"on": True}
    assert await handler.run(request("toggle", id_="t1")) == {"on": True}  # a re-run
    assert pins.pin(22).state is True
    assert await handler.run(request("toggle", id_="t2")) == {"on": False}
    await handler.close()


async def test_gpio_pulse_turns_on_for_the_duration_then_off(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 23}}, "dev")
    pin = pins.pin(23)
    pin.clear_states()
    assert await handler.run(request("pulse", {"duration": 0.2})) == {"on": False}
    pin.assert_states([False, True, False])
    on_time = pin.states[2].timestamp
    assert 0.15 <= on_time < 2.0
    await handler.close()


async def test_gpio_pulse_cancelled_still_ends_off(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 24}}, "dev")
    task = asyncio.create_task(handler.run(request("pulse", {"duration": 30})))
    await asyncio.sleep(0.05)
    assert pins.pin(24).state is True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pins.pin(24).state is False
    await handler.close()


@pytest.mark.parametrize(("name", "params", "words"), [
    ("explode", {}, "does not know 'explode'"),
    ("on", {"x": 1}, "takes no params"),
    ("pulse", {"duration": -1}, "must be > 0"),
    ("pulse", {"duration": "1"}, "number of seconds"),
    ("pulse", {"duration": 1, "count": 2}, "only 'duration'"),
])
async def test_gpio_bad_commands_are_invalid_and_leave_the_pin(
        pins: MockFactory, name: str, params: dict[str, Any], words: str) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 25}}, "dev")
    with pytest.raises(InvalidCommand, match=words):
        await handler.run(request(name, params))
    assert pins.pin(25).state is False
    await handler.close()


def test_gpio_pin_in_use_is_a_config_error(pins: MockFactory) -> None:
    config = config_with({"a": {"handler": "gpio", "pin": 26}, "b": {"handler": "gpio",
                                                                      "pin": 26}})
    first = GpioHandler(config.devices["a"], config)
    with pytest.raises(ConfigError) as caught:
        GpioHandler(config.devices["b"], config)
    assert caught.value.key == "devices.b.pin"
    first.output.close()


def test_gpio_panel_pins_do_not_clash_when_the_panel_is_off(pins: MockFactory) -> None:
    config = config_with({"dev": {"handler": "gpio", "pin": 17}}, enabled=False)
    handler = GpioHandler(DeviceConfig("dev", "gpio", {"pin": 17}), config)
    handler.output.close()


# --------------------------------------------------------------------------- mqtt


@pytest.mark.broker
async def test_mqtt_handler_republishes_params_to_the_local_broker(mosquitto: Any) -> None:
    import aiomqtt  # noqa: PLC0415 (tests may talk MQTT directly)

    handler = make({"hall": {"handler": "mqtt", "port": mosquitto.port, "target": "hall lamp",
                             "topic": "z2m/{device}/{name}"}}, "hall")
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe("z2m/#", qos=1)
        result = await handler.run(Request(id="m1", device="hall", name="set",
                                           params={"state": "ON", "brightness": 80}))
        assert result == {"topic": "z2m/hall lamp/set"}
        async with asyncio.timeout(5):
            message = await anext(aiter(client.messages))
    assert str(message.topic) == "z2m/hall lamp/set"
    assert message.payload == b'{"state":"ON","brightness":80}'
    await handler.close()
    await handler.close()


@pytest.mark.broker
async def test_mqtt_handler_broker_down_is_retryable_then_reconnects(mosquitto: Any) -> None:
    from pigateway.errors import RetryableHandlerError  # noqa: PLC0415

    handler = make({"hall": {"handler": "mqtt", "port": mosquitto.port}}, "hall")
    await handler.run(Request(id="m1", device="hall", name="set", params={"state": "ON"}))
    mosquitto.kill()
    with pytest.raises(RetryableHandlerError, match="local broker"):
        for _ in range(3):  # the first publish may still find the dead socket open
            await handler.run(Request(id="m2", device="hall", name="set", params={}))
    mosquitto.start()
    assert await handler.run(Request(id="m3", device="hall", name="set", params={})) == {
        "topic": "zigbee2mqtt/hall/set"}
    await handler.close()


async def test_gpio_pulse_longer_than_the_handler_timeout_is_rejected(pins: MockFactory) -> None:
    config = gateway.config(gateway_id="gw", gpio={"pin_factory": "mock"},
                            inbound={"handler_timeout": 5},
                            devices={"dev": {"handler": "gpio", "pin": 19}})
    handler = build(config.devices["dev"], config)
    with pytest.raises(InvalidCommand, match=r"inbound\.handler_timeout"):
        await handler.run(request("pulse", {"duration": 6}))
    await handler.close()


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    """A mosquitto password file with user ``gw``, password ``s3cret``."""
    if shutil.which("mosquitto_passwd") is None or mosquitto_binary() is None:
        pytest.skip("mosquitto and mosquitto_passwd are needed")
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "gw", "s3cret"], check=True,
                   capture_output=True)
    return path


@pytest.mark.broker
async def test_mqtt_handler_reads_its_password_from_a_systemd_credential(
        tmp_path: Path, passwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "z2m-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    # as root, mosquitto would drop to its own user and not read our password file
    extra = ["user root", "allow_anonymous false", f"password_file {passwd}"]
    with Mosquitto(tmp_path / "broker", extra=extra) as broker:
        devices = {"hall": {"handler": "mqtt", "port": broker.port, "username": "gw",
                            "password_credential": "z2m-password"}}
        handler = make(devices, "hall")
        assert await handler.run(Request(id="p1", device="hall", name="set", params={})) == {
            "topic": "zigbee2mqtt/hall/set"}
        await handler.close()
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        with pytest.raises(ConfigError) as caught:
            make(devices, "hall")
    assert caught.value.key == "devices.hall.password_credential"


def test_check_validates_every_device_without_claiming_pins(pins: MockFactory) -> None:
    good = config_with({"porch": {"handler": "gpio", "pin": 20}, "probe": {"handler": "log"},
                        "bulb": {"handler": "mqtt", "port": 1}})
    check(good)
    from gpiozero import DigitalOutputDevice  # noqa: PLC0415

    DigitalOutputDevice(20, pin_factory=pins).close()  # the pin is still free
    for devices, key in [({"porch": {"handler": "gpio"}}, "devices.porch.pin"),
                         ({"probe": {"handler": "log", "lvl": 1}}, "devices.probe.lvl"),
                         ({"bulb": {"handler": "mqtt", "topic": "#"}}, "devices.bulb.topic"),
                         ({"bulb": {"handler": "mqtt", "target": "hall/#"}},
                          "devices.bulb.target"),
                         ({"x": {"handler": "nope"}}, "devices.x.handler")]:
        with pytest.raises(ConfigError) as caught:
            check(config_with(devices))
        assert caught.value.key == key


class _Fussy(LogHandler):
    """A third-party handler whose check() raises a builtin exception on a bad option."""

    @staticmethod
    def check(device: DeviceConfig, config: Config) -> int:
        return int(device.options["volume"])  # ValueError, KeyError


@pytest.mark.parametrize("options", [{"volume": "loud"}, {}])
def test_a_builtin_error_of_a_handlers_check_is_a_config_error(options: dict[str, Any]) -> None:
    config = config_with({"siren": {"handler": "fussy", **options}})
    with pytest.raises(ConfigError) as caught:
        check(config, {"fussy": _Fussy})
    assert caught.value.key == "devices.siren"
    assert "'fussy'" in caught.value.problem and len(caught.value.problem) < 400


def test_config_check_names_a_bad_device_option(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('gateway_id = "gw"\n[devices.hall]\nhandler = "mqtt"\nprot = 1883\n')
    done = subprocess.run([sys.executable, "-m", "pigateway", "config", "check", "--config",
                           str(config)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 78  # EX_CONFIG
    assert "devices.hall.prot: unknown option for handler 'mqtt'" in done.stderr


@pytest.mark.parametrize("name", ["a\nb", "a/#", "+", "x\x00", "\ud800", "n" * 70_000])
async def test_mqtt_a_name_that_makes_no_topic_is_rejected_bounded(name: str) -> None:
    """Target and template are checked at start, so a bad topic at run time is the name's
    fault: a typed rejection that says so, short, before any connection is tried."""
    handler = make({"hall": {"handler": "mqtt", "topic": "z/{device}/{name}", "port": 1}},
                   "hall")
    with pytest.raises(InvalidCommand, match="the command name") as caught:
        await handler.run(Request(id="b1", device="hall", name=name, params={}))
    assert len(str(caught.value)) < 400
    await handler.close()


@pytest.mark.parametrize("params", [{"x": float("inf")}, {"x": float("nan")},
                                    {"x": "\ud800"}, {"\udfff": 1}])
async def test_mqtt_params_a_receiver_could_not_read_are_rejected(params: dict[str, Any]) -> None:
    """``Infinity`` is not JSON and a lone surrogate is not UTF-8: rejected before connecting,
    never published (nor a builtin exception that reads as a handler bug)."""
    handler = make({"hall": {"handler": "mqtt", "port": 1}}, "hall")
    with pytest.raises(InvalidCommand, match="params"):
        await handler.run(Request(id="b2", device="hall", name="set", params=params))
    await handler.close()


async def test_log_handler_lines_are_bounded_and_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    handler = make({"dev": {"handler": "log"}}, "dev")
    with caplog.at_level(logging.INFO, logger="pigateway.handlers.log"):
        await handler.run(request("forged\nERROR line", {"k" * 50_000: "v" * 50_000}))
    [record] = [r for r in caplog.records if r.name == "pigateway.handlers.log"]
    assert "\n" not in record.getMessage() and len(record.getMessage()) < 1000


async def test_gpio_rejections_are_bounded(pins: MockFactory) -> None:
    handler = make({"dev": {"handler": "gpio", "pin": 25}}, "dev")
    for name, params in [("x" * 100_000, {}), ("on", {f"k{i}": i for i in range(10_000)}),
                         ("pulse", {"duration": 10 ** 5000}), ("pulse", {"d" * 100_000: 1})]:
        with pytest.raises(InvalidCommand) as caught:
            await handler.run(request(name, params))
        assert len(str(caught.value)) < 400
    await handler.close()
