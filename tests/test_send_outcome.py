"""Producers that learn the outcome: ``send --id``, ``send --wait``, ``queue show``.

Real parts: a mosquitto on loopback (stopped and started for outages), ``pigateway run`` as
a child process (SIGKILLed in one test), ``pigateway`` verbs as child processes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import settings, write
from harness.ingest_helpers import as_us
from harness.service import CONSOLE_SCRIPT, Service, environment


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", extra=as_us()) as mosq:
        yield mosq


def config_file(folder: Path, broker: Mosquitto) -> Path:
    data = settings(folder, port=broker.port, prefix="pg", uplink={
        "batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.3})
    data["gpio"] = {"enabled": False}
    data["inbound"] = {"enabled": False}
    return write(folder / "config.toml", data)


def pigateway(config: Path, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONSOLE_SCRIPT), *argv, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout,
                          env=environment(), check=False)


def started(config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CONSOLE_SCRIPT), *argv, "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment())


def show(config: Path, command_id: str) -> dict[str, object]:
    done = pigateway(config, "queue", "show", command_id, "--json")
    return json.loads(done.stdout) if done.stdout else {"state": "?", "err": done.stderr}


def test_send_id_twice_queues_once(broker: Mosquitto, folder: Path) -> None:
    broker.stop()
    config = config_file(folder, broker)
    first = pigateway(config, "send", "--device", "lamp", "--command", "on", "--id", "k-1")
    again = pigateway(config, "send", "--device", "lamp", "--command", "on", "--id", "k-1")
    other = pigateway(config, "send", "--device", "lamp", "--command", "on", "--id", "k-2")
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert other.stdout != first.stdout
    stats = json.loads(pigateway(config, "queue", "stats", "--json").stdout)
    assert stats["depth"] == 2
    assert show(config, first.stdout.strip())["state"] == "queued"


def test_send_wait_delivered_then_show(broker: Mosquitto, folder: Path) -> None:
    config = config_file(folder, broker)
    with Service(config, folder / "service.log"):
        done = pigateway(config, "send", "--device", "lamp", "--command", "on", "--wait",
                         "--timeout", "20")
    assert done.returncode == 0, done.stderr
    command_id, batch_id = done.stdout.split()
    where = show(config, command_id)
    assert where["state"] == "delivered" and where["batch"] == batch_id


def test_send_wait_times_out_with_exit_5_and_stays_queued(broker: Mosquitto,
                                                          folder: Path) -> None:
    broker.stop()
    config = config_file(folder, broker)
    with Service(config, folder / "service.log"):
        started_at = time.monotonic()
        done = pigateway(config, "send", "--device", "lamp", "--command", "on", "--wait",
                         "--timeout", "1")
        assert done.returncode == 5, done.stderr
        assert 1.0 <= time.monotonic() - started_at < 10
        assert "queued, not yet delivered" in done.stderr
        command_id = done.stderr.split()[0]
        assert show(config, command_id)["state"] in ("queued", "in-flight")
    assert show(config, command_id)["position"] == 0


def test_send_wait_dead_letter_exit_3(broker: Mosquitto, folder: Path) -> None:
    """A TTL that runs out during an outage: dead-lettered 'expired', exit 3 with why."""
    broker.stop()
    config = config_file(folder, broker)
    with Service(config, folder / "service.log"):
        waiting = started(config, "send", "--device", "lamp", "--command", "on", "--ttl",
                          "0.2", "--wait", "--timeout", "20")
        time.sleep(1.0)
        broker.start()
        _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 3, err
    assert "expired" in err
    assert show(config, err.split()[0])["state"] == "dead"


def test_send_wait_survives_a_service_restart(broker: Mosquitto, folder: Path) -> None:
    broker.stop()
    config = config_file(folder, broker)
    service = Service(config, folder / "service.log").start()
    try:
        waiting = started(config, "send", "--device", "lamp", "--command", "on", "--wait",
                          "--timeout", "30")
        time.sleep(0.8)
        service.kill()
        service.start()
        broker.start()
        out, err = waiting.communicate(timeout=40)
    finally:
        service.stop()
    assert waiting.returncode == 0, err
    assert len(out.split()) == 2


def test_queue_show_unknown(broker: Mosquitto, folder: Path) -> None:
    config = config_file(folder, broker)
    pigateway(config, "send", "--device", "lamp", "--command", "on")  # makes the store
    done = pigateway(config, "queue", "show", "01NOPE")
    assert done.returncode == 2 and "unknown" in done.stdout
