"""Inbound commands through the real service: a test client publishes to a real mosquitto,
``pigateway run`` (a subprocess) runs them, and the results come back on the broker.

The service is stopped with SIGTERM and killed with SIGKILL by the PID this test started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness import gateway as harness_gateway
from harness.broker import Mosquitto
from harness.operator import GATEWAY, Operator, operating, until
from harness.service import Service, argv
from pigateway.config import load
from pigateway.inbound import list_inbox

pytestmark = pytest.mark.broker


def write_config(tmp_path: Path, broker: Mosquitto, prefix: str,
                 devices: dict[str, dict[str, Any]]) -> Path:
    return harness_gateway.write(tmp_path / "config.toml", harness_gateway.settings(
        tmp_path, gateway_id=GATEWAY, port=broker.port, prefix=prefix,
        uplink={"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5},
        inbound={"backoff_initial": 0.05, "backoff_max": 0.2},
        gpio={"pin_factory": "mock"}, devices=devices))


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, broker: Mosquitto, prefix: str,
                  devices: dict[str, dict[str, Any]]) -> AsyncIterator[tuple[Service, Operator]]:
    service = Service(write_config(tmp_path, broker, prefix, devices), tmp_path / "service.log")
    async with operating(service, broker.port, prefix, ("results", "state"),
                         also=(f"{prefix}-local/#",)) as observer:
        yield service, observer


async def start(service: Service, observer: Operator) -> None:
    seen = observer.online
    service.start()
    await until(lambda: observer.online > seen, 20, "the service to come online", service)


# --------------------------------------------------------------------------- the tests


async def test_commands_reach_log_gpio_and_mqtt_devices(tmp_path: Path, mosquitto: Mosquitto,
                                                        unique_prefix: str) -> None:
    devices = {
        "lamp": {"handler": "log"},
        "relay": {"handler": "gpio", "pin": 20},
        "bulb": {"handler": "mqtt", "port": mosquitto.port,
                 "topic": f"{unique_prefix}-local/{{device}}/set"},
    }
    async with gateway(tmp_path, mosquitto, unique_prefix, devices) as (service, observer):
        await start(service, observer)
        await observer.send({"v": 1, "id": "l1", "device": "lamp", "name": "hello",
                             "params": {"n": 1}})
        await observer.send({"v": 1, "id": "g1", "device": "relay", "name": "on", "params": {}})
        await observer.send({"v": 1, "id": "g2", "device": "relay", "name": "state",
                             "params": {}})
        await observer.send({"v": 1, "id": "m1", "device": "bulb", "name": "set",
                             "params": {"state": "ON"}})
        await until(lambda: len(observer.results) >= 4, 20, "four results", service)
        await until(lambda: bool(observer.other), 5, "the republished message", service)
        assert service.stop() == 0
    results = {d["id"]: d for d in observer.results}
    assert {d["status"] for d in results.values()} == {"ok"}
    for document in results.values():
        assert set(document) <= {"v", "id", "status", "detail", "finished_at"}
        assert document["v"] == 1
    assert results["g1"]["detail"] == {"on": True}
    assert results["g2"]["detail"] == {"on": True}  # the pin stayed as commanded
    assert observer.other == [(f"{unique_prefix}-local/bulb/set", b'{"state":"ON"}')]


async def test_malformed_messages_are_answered_and_the_service_stays_up(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    devices = {"lamp": {"handler": "log"}}
    bad: list[bytes | dict[str, Any]] = [
        b"not json", b"\xc3\x28 invalid utf-8", b"[]", b"{" * 5000,
        b'{"v": 1, "id": "big", "device": "lamp", "name": "x", "params": {"p": "'
        + b"y" * 70_000 + b'"}}',
        {"v": 1, "id": "no-device", "device": "toaster", "name": "on", "params": {}},
        {"v": 9, "id": "future", "device": "lamp", "name": "on", "params": {}},
        {"v": 1, "id": "no-params", "device": "lamp", "name": "on"},
    ]
    async with gateway(tmp_path, mosquitto, unique_prefix, devices) as (service, observer):
        await start(service, observer)
        for payload in bad:
            await observer.send(payload)
        await observer.send({"v": 1, "id": "good", "device": "lamp", "name": "on",
                             "params": {}})
        # taken side by side (the intake's window), so their results may come in any order
        answered = {"no-device", "future", "no-params", "good"}
        await until(lambda: answered <= set(observer.by_id()), 20, "the four answers",
                    service)
        assert service.alive
        assert service.stop() == 0
    results = {d["id"]: d for d in observer.results}
    assert set(results) == answered
    assert "unknown device 'toaster'" in results["no-device"]["detail"]
    assert "unsupported version v=9" in results["future"]["detail"]
    assert "'params' is missing" in results["no-params"]["detail"]
    assert results["good"]["status"] == "ok"
    log = service.log.read_text(errors="replace")
    # five dropped within a minute: said once (the first), counted in the metrics
    assert log.count("dropped a message on the commands topic") == 1


async def test_unstorable_and_oversized_commands_are_rejected_and_the_service_stays_up(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Through the real service: a command the store cannot hold (a number JSON cannot
    carry, a lone surrogate, a field name 13,000 long) is answered ``rejected``, once; the
    service neither exits nor has it redelivered at its next start."""
    devices = {"lamp": {"handler": "log"}}
    edges: dict[str, bytes] = {
        "inf": b'{"v":1,"id":"inf","device":"lamp","name":"on","params":{"x":1e400}}',
        "neg": b'{"v":1,"id":"neg","device":"lamp","name":"on","params":{"x":[-1e999]}}',
        "sur": b'{"v":2,"id":"sur","device":"\\ud800","name":"on","params":{"k":"\\udfff"}}',
        "key": json.dumps({"v": 1, "id": "key", "device": "lamp", "name": "on", "params": {},
                           "k" * 13_000: 1}).encode(),
    }
    async with gateway(tmp_path, mosquitto, unique_prefix, devices) as (service, observer):
        await start(service, observer)
        for payload in edges.values():
            await observer.send(payload)
        await observer.send({"v": 1, "id": "good", "device": "lamp", "name": "on",
                             "params": {}})
        await until(lambda: {*edges, "good"} <= set(observer.by_id()), 20, "every answer",
                    service)
        assert service.alive
        assert service.stop() == 0
        seen = len(observer.results)
        await start(service, observer)  # every message was acknowledged: nothing comes again
        await asyncio.sleep(1.0)
        assert service.stop() == 0
        assert len(observer.results) == seen
    results = {d["id"]: d for d in observer.results}
    assert {results[i]["status"] for i in edges} == {"rejected"}
    assert "'params.x'" in results["inf"]["detail"]
    assert "'params.x[0]'" in results["neg"]["detail"]
    assert "'device'" in results["sur"]["detail"]
    assert "unknown field 'kkk" in results["key"]["detail"]
    assert len(results["key"]["detail"]) <= 500
    assert results["good"]["status"] == "ok"


async def test_commands_sent_while_stopped_run_after_the_start(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    devices = {"lamp": {"handler": "log"}}
    async with gateway(tmp_path, mosquitto, unique_prefix, devices) as (service, observer):
        await start(service, observer)  # makes the persistent session and its subscription
        assert service.stop() == 0
        for i in range(5):
            await observer.send({"v": 1, "id": f"off{i}", "device": "lamp", "name": "on",
                                 "params": {}})
        await asyncio.sleep(0.2)
        assert observer.results == []
        await start(service, observer)
        await until(lambda: len(observer.by_id()) >= 5, 20, "five results", service)
        assert service.stop() == 0
    assert {d["status"] for d in observer.results} == {"ok"}
    assert set(observer.by_id()) == {f"off{i}" for i in range(5)}


async def test_sigkill_mid_run_every_command_ends_with_exactly_one_result(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    devices = {"r1": {"handler": "gpio", "pin": 20}, "r2": {"handler": "gpio", "pin": 21}}
    ids = [f"k{i:02d}" for i in range(16)]
    async with gateway(tmp_path, mosquitto, unique_prefix, devices) as (service, observer):
        await start(service, observer)
        for i, command_id in enumerate(ids):
            await observer.send({"v": 1, "id": command_id, "device": f"r{i % 2 + 1}",
                                 "name": "pulse", "params": {"duration": 0.15}})
        await until(lambda: len(observer.results) >= 3, 20, "the first results", service)
        service.kill()  # mid-run: pulses are running and more are pending
        finished_before = len(observer.by_id())
        assert finished_before < len(ids)
        await start(service, observer)
        await until(lambda: set(observer.by_id()) >= set(ids), 30, "every result", service)
        assert service.stop() == 0
    for command_id, documents in observer.by_id().items():
        # at-least-once on the wire, but one recorded result: repeats are identical
        assert all(d == documents[0] for d in documents), command_id
        assert documents[0]["status"] == "ok"
    entries = await list_inbox(load(tmp_path / "config.toml"), limit=1000)
    assert sorted(e["id"] for e in entries) == ids
    assert {(e["state"], e["status"]) for e in entries} == {("done", "ok")}


async def test_a_bad_device_option_fails_the_start_naming_the_key(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    config = write_config(tmp_path, mosquitto, unique_prefix,
                          {"porch": {"handler": "gpio", "pinn": 20}})
    child = await asyncio.create_subprocess_exec(
        *argv(config), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(child.communicate(), 30)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode != 0
    assert b"devices.porch.pin: is required" in out
