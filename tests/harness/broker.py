"""A real mosquitto for the tests, the demo and the benches: started on a free 127.0.0.1
port in a temporary folder.

The tests start it, stop it, kill it (SIGKILL) and start it again on the same port, so an
outage is a real one. Only the process this object started is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.ports import free_port

__all__ = ["Mosquitto", "free_port", "mosquitto_binary"]


def mosquitto_binary() -> str | None:
    """Where mosquitto is (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


class Mosquitto:
    """One mosquitto process listening on 127.0.0.1:``port``, configured in ``folder``."""

    def __init__(self, folder: Path, *, port: int | None = None, persistence: bool = True,
                 extra: list[str] | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.folder = folder
        self.port = port or free_port()
        self.persistence = persistence
        self.extra = list(extra or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "mosquitto.log"
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            # as root mosquitto drops to the user 'mosquitto', who cannot write a folder of
            # ours: the persistence file is never saved (one "Permission denied" in the log)
            # and a restart forgets every persistent session and the messages queued for it
            *([] if any(line.startswith("user ") for line in self.extra)
              else [f"user {pwd.getpwuid(os.geteuid()).pw_name}"]),
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            # as a broker for gateways should be: no 40 ms Nagle/delayed-ACK stall per packet
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            *self.extra,
        ]
        path = self.folder / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 10.0) -> None:
        """Start (or start again) on the same port; return once it accepts connections."""
        if self.running:
            return
        config = self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(config)], stdout=log, stderr=log, cwd=self.folder
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(self.address, 0.2):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """A clean stop (SIGTERM): mosquitto saves its persistence file."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """A crash (SIGKILL): whatever was not saved is gone, as on a power cut."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
