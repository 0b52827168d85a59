"""The whole service as systemd runs it: a subprocess with NOTIFY_SOCKET and WATCHDOG_USEC.

The MQTT port is one where nothing listens, so everything here happens before (and without)
a broker: READY must not wait for one.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness.service
from harness import gateway
from harness.ports import free_port
from harness.sockets import DatagramListener
from pigateway.listeners.control import request

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
STOP_BOUND = 10.0  # seconds from SIGTERM to exit at most (publish_timeout 1 + wind-down 2)


class Service:
    """``pigateway run`` (the console script, as the unit runs it) in a subprocess, killed by
    PID at the end whatever happens."""

    def __init__(self, folder: Path, notify: DatagramListener, **env: str) -> None:
        self.folder = folder
        self.socket = folder / "control.sock"
        config = gateway.write(folder / "config.toml", gateway.settings(
            folder, gateway_id="gw-sd", port=free_port(),  # nothing listens there
            uplink={"backoff_initial": 0.2, "backoff_max": 1.0, "publish_timeout": 1.0},
            gpio={"pin_factory": "mock", "green_led": 10, "red_led": 11, "pause_button": 20,
                  "flush_button": 21},
            log={"level": "debug"}))
        self.service = harness.service.Service(config, folder / "stderr", console_script=True,
                                               env={"NOTIFY_SOCKET": str(notify.path), **env})
        self.service.start()
        assert self.service.process is not None
        self.proc = self.service.process

    def log(self) -> str:
        return self.service.tail(size=1 << 20)

    def terminate(self) -> float:
        """SIGTERM, then the seconds until the process exited."""
        started = time.monotonic()
        self.service.stop(timeout=STOP_BOUND + 5)
        return time.monotonic() - started

    def close(self) -> None:
        self.service.kill()


@pytest.fixture
def notify() -> Iterator[DatagramListener]:
    listener = DatagramListener("notify.sock")
    yield listener
    listener.close()


@pytest.fixture
def service(folder: Path, notify: DatagramListener) -> Iterator[Service]:
    svc = Service(folder, notify, WATCHDOG_USEC=str(WATCHDOG_USEC))
    yield svc
    svc.close()


def test_ready_before_any_broker_then_status_watchdog_and_a_bounded_stop(
    service: Service, notify: DatagramListener
) -> None:
    ready = notify.wait_for(lambda t: t == "READY=1", timeout=30)
    assert service.proc.poll() is None, service.log()
    texts = notify.texts()
    assert not [t for t in texts[: texts.index("READY=1")] if t.startswith("WATCHDOG")]
    # STATUS mirrors the state: offline (nothing listens on the MQTT port), queue 0
    notify.wait_for(lambda t: t.startswith("STATUS=") and "queue 0" in t, timeout=10)
    statuses = [t for t in notify.texts() if t.startswith("STATUS=")]
    assert any(t.startswith(("STATUS=offline", "STATUS=connecting")) for t in statuses), statuses
    # WATCHDOG at half of WATCHDOG_USEC
    time.sleep(2.2)
    pings = [d.at for d in notify.messages() if d.text == "WATCHDOG=1" and d.at > ready.at]
    assert 3 <= len(pings) <= 8, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert all(0.2 < g < 1.0 for g in gaps), gaps  # period 0.5 s, loose for a busy CI
    # STOPPING on SIGTERM, and the process is gone within its bound
    took = service.terminate()
    assert "STOPPING=1" in notify.texts()
    assert service.proc.returncode == 0, service.log()
    assert took < STOP_BOUND
    assert not service.socket.exists(), "the control socket is removed on stop"


def test_status_follows_pause_from_the_control_socket(
    service: Service, notify: DatagramListener
) -> None:
    notify.wait_for(lambda t: t == "READY=1", timeout=30)
    reply = asyncio.run(request(service.socket, "pause"))
    assert reply["state"]["paused"] is True
    paused = notify.wait_for(lambda t: t.startswith("STATUS=") and "paused" in t, timeout=5)
    asyncio.run(request(service.socket, "resume"))
    deadline = time.monotonic() + 5
    while not [d for d in notify.messages() if d.at > paused.at
               and d.text.startswith("STATUS=") and "paused" not in d.text]:
        assert time.monotonic() < deadline, notify.texts()[-5:]
        time.sleep(0.02)
    service.terminate()


def test_a_stopped_process_gets_no_more_watchdog_pings(
    service: Service, notify: DatagramListener
) -> None:
    """SIGSTOP freezes the loop: the pings stop (systemd would kill and restart it)."""
    notify.wait_for(lambda t: t == "READY=1", timeout=30)
    notify.wait_for(lambda t: t == "WATCHDOG=1", timeout=5)
    service.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    time.sleep(1.5)
    thawed_at = time.monotonic()
    service.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    pings = [d.at for d in notify.messages() if d.text == "WATCHDOG=1"]
    assert not [p for p in pings if frozen_at + 0.1 < p < thawed_at]
    assert any(p > thawed_at for p in pings), "pings did not resume"
    service.terminate()
