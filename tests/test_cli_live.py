"""``pigateway status`` of a real service, as an operator runs it: online, paused, with a
fault, and not running (exit 4). Real parts: mosquitto on loopback (one refusing anonymous
logins for the fault), ``pigateway run`` as a child process, ``pigateway status`` as a child.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import settings, write
from harness.ingest_helpers import as_us
from harness.service import CONSOLE_SCRIPT, Service, environment

pytestmark = pytest.mark.broker

#: What Python leaks into text when a value is printed as it is.
PYTHON = ("None", "True", "False", "{'", "[Errno")


def config_file(folder: Path, broker: Mosquitto) -> Path:
    data = settings(folder, port=broker.port, uplink={"backoff_initial": 0.05,
                                                      "backoff_max": 0.3})
    data["gpio"] = {"enabled": False}
    return write(folder / "config.toml", data)


def pigateway(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONSOLE_SCRIPT), *argv, "--config", str(config)],
                          capture_output=True, text=True, timeout=30, env=environment(),
                          check=False)


def status_until(config: Path, ready: Callable[[str], bool]) -> str:
    """``pigateway status`` (exit 0) once its text satisfies ``ready`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        done = pigateway(config, "status")
        if done.returncode == 0 and ready(done.stdout):
            return done.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"status never got there: {done}")
        time.sleep(0.1)


def test_status_of_a_running_service_online_paused_and_stopped(tmp_path: Path,
                                                               folder: Path) -> None:
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        config = config_file(folder, broker)
        with Service(config, folder / "service.log"):
            online = status_until(config, lambda text: "- online" in text)
            assert online.startswith("● pigateway - online · queue 0 · dead 0\n")
            assert "Local: not configured" in online and "Limits: 8 batches in flight" in online
            said = pigateway(config, "pause")
            assert (said.returncode, said.stdout) == (
                0, "paused: queueing goes on, nothing is sent until `pigateway resume`\n")
            paused = status_until(config, lambda text: "paused" in text.splitlines()[0])
            assert "Draining: paused: queueing goes on" in paused
            for text in (online, paused):
                assert not [leak for leak in PYTHON if leak in text], text
        stopped = pigateway(config, "status")
    assert stopped.returncode == 4
    assert stopped.stdout.startswith("○ pigateway - not running\n")


def test_status_shows_a_refused_login_as_a_fault_first(tmp_path: Path, folder: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "gw", "s3cret"], check=True,
                   capture_output=True)
    extra = [*as_us(), "allow_anonymous false", f"password_file {passwd}"]
    with Mosquitto(tmp_path / "broker", extra=extra) as broker:
        config = config_file(folder, broker)
        with Service(config, folder / "service.log"):
            text = status_until(config, lambda text: "FAULT" in text)
    head, fault = text.splitlines()[:2]
    assert head.startswith("● pigateway - FAULT login refused")
    assert fault.strip().startswith("Fault: login refused by the broker")
    assert fault.endswith("(an operator must act)")
    # it says where the password is read from, as the operator must put it there
    assert "/etc/credstore/pigateway.mqtt-password" in fault and "mqtt.password_file" in fault
    assert not [leak for leak in PYTHON if leak in text], text
