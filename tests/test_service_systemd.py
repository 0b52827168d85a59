"""The whole service as systemd runs it: a subprocess with NOTIFY_SOCKET and WATCHDOG_USEC.

The MQTT port is one where nothing listens, so everything here happens before (and without)
a broker: READY must not wait for one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigateway.control import request
from sockets import DatagramListener

PIGATEWAY = Path(sys.executable).parent / "pigateway"
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
STOP_BOUND = 10.0  # seconds from SIGTERM to exit at most (publish_timeout 1 + wind-down 2)


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """``pigateway run`` in a subprocess, killed by PID at the end whatever happens."""

    def __init__(self, folder: Path, notify: DatagramListener, **env: str) -> None:
        self.folder = folder
        self.socket = folder / "control.sock"
        config = folder / "config.toml"
        config.write_text(
            'gateway_id = "gw-sd"\n'
            f'[store]\npath = "{folder / "queue.db"}"\nmin_free_bytes = 0\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {free_port()}\n'
            '[uplink]\nbackoff_initial = 0.2\nbackoff_max = 1.0\npublish_timeout = 1.0\n'
            '[gpio]\npin_factory = "mock"\ngreen_led = 10\nred_led = 11\n'
            'pause_button = 20\nflush_button = 21\n'
            f'[control]\nsocket = "{self.socket}"\n'
            '[log]\nlevel = "debug"\n'
        )
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("WATCHDOG_", "JOURNAL"))}
        environ.update(NOTIFY_SOCKET=str(notify.path), **env)
        self.stderr = (folder / "stderr").open("wb")
        self.proc = subprocess.Popen(
            [str(PIGATEWAY), "run", "--config", str(config)],
            env=environ, stdout=subprocess.DEVNULL, stderr=self.stderr, cwd=folder,
        )

    def log(self) -> str:
        return (self.folder / "stderr").read_text(errors="replace")

    def terminate(self) -> float:
        """SIGTERM, then the seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=STOP_BOUND + 5)
        return time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stderr.close()


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
