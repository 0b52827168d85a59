"""Real AF_UNIX datagram sockets standing in for systemd's notify and journal sockets.

A listener binds a socket in a short temporary folder (unix socket paths are limited to
108 bytes, pytest's tmp_path can be longer), and a thread records every datagram with the
time it arrived, so tests can check what was sent, and when, while the event loop under
test is busy or even blocked.
"""

from __future__ import annotations

import array
import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def short_dir() -> Path:
    """A fresh folder under /tmp with a short path (remove it with shutil.rmtree)."""
    return Path(tempfile.mkdtemp(prefix="pgw-", dir="/tmp"))


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() on arrival
    data: bytes
    fds: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class DatagramListener:
    """Binds ``name`` in a short folder and records what arrives until :meth:`close`."""

    def __init__(self, name: str = "notify.sock") -> None:
        self.folder = short_dir()
        self.path = self.folder / name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.received: list[Datagram] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dgram-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd_space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(1 << 20, fd_space)
            except TimeoutError:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            with self._lock:
                self.received.append(Datagram(time.monotonic(), data, tuple(fds)))

    def messages(self) -> list[Datagram]:
        with self._lock:
            return list(self.received)

    def texts(self) -> list[str]:
        return [d.text for d in self.messages()]

    def wait_for(self, match: Callable[[str], bool], timeout: float = 5.0) -> Datagram:
        """The first datagram whose text matches; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for dgram in self.messages():
                if match(dgram.text):
                    return dgram
            time.sleep(0.01)
        raise AssertionError(f"no matching datagram within {timeout}s; got {self.texts()[-10:]}")

    async def until(self, match: Callable[[str], bool], timeout: float = 5.0) -> Datagram:
        """:meth:`wait_for` for async tests: lets the event loop run while waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for dgram in self.messages():
                if match(dgram.text):
                    return dgram
            await asyncio.sleep(0.01)
        raise AssertionError(f"no matching datagram within {timeout}s; got {self.texts()[-10:]}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        for dgram in self.received:
            for fd in dgram.fds:
                os.close(fd)
        shutil.rmtree(self.folder, ignore_errors=True)
