"""The running service under a flood of its listeners, as a local user could make it: the
real ``pigateway run`` in a child process with a tight descriptor limit, a real broker, real
sockets. Whatever its listeners are sent, the control socket keeps answering and the log
keeps to a few lines (no traceback per refused connection)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import gateway, service
from harness.broker import Mosquitto
from harness.ports import free_port
from harness.waits import until, wait_until
from pigateway.listeners import control

#: The child's descriptor limit: far below what the flood opens, above what the service
#: needs with every listener at its cap.
NOFILE = 128
#: Connections each flood opens, several times the child's whole descriptor limit.
FLOOD = 3 * NOFILE
#: Lines the log may gain while flooded (the refusals are said once per interval).
MAX_NEW_LINES = 12

LIMITED = ("import os, resource, sys; "
           f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
           "os.execv(sys.executable, [sys.executable, '-m', 'pigateway', *sys.argv[1:]])")


@pytest.fixture
def limited(folder: Path, mosquitto: Mosquitto) -> Iterator[tuple[Path, int, Path]]:
    """``pigateway run`` with at most :data:`NOFILE` descriptors, /metrics on a loopback
    port: (control socket, metrics port, log)."""
    port = free_port()
    config = gateway.write(folder / "config.toml", gateway.settings(
        folder, port=mosquitto.port, metrics={"listen": f"127.0.0.1:{port}"}))
    log = folder / "service.log"
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, "-c", LIMITED, "run", "--config", str(config)],
                                 stdout=out, stderr=out, cwd=folder, env=service.environment())
    try:
        yield folder / "control.sock", port, log
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(10)


def _flood(family: socket.AddressFamily, address: str | tuple[str, int],
           count: int) -> list[socket.socket]:
    """``count`` connections that send nothing (the ones the kernel refuses are skipped)."""
    held = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(address)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


async def _status_within(path: Path, seconds: float) -> bool:
    started = time.monotonic()
    reply = await control.request(path, "status", timeout=seconds)
    return bool(reply["ok"]) and time.monotonic() - started < seconds


async def _served(path: Path) -> bool:
    try:
        return bool((await control.request(path, "status", timeout=1.0))["ok"])
    except control.ControlError:  # busy until the held connections are gone
        return False


async def test_a_flood_of_idle_metrics_connections_leaves_the_control_socket_answering(
        limited: tuple[Path, int, Path]) -> None:
    sock_path, port, log = limited
    assert await wait_until(lambda: "serving /metrics" in log.read_text()
                            and "online" in log.read_text(), 20), log.read_text()
    before = len(log.read_text().splitlines())
    held = _flood(socket.AF_INET, ("127.0.0.1", port), FLOOD)
    try:
        await asyncio.sleep(2.0)  # long enough for many accept retries
        assert await _status_within(sock_path, 2.0)
        await asyncio.sleep(1.0)
        assert await _status_within(sock_path, 2.0)
    finally:
        for sock in held:
            sock.close()
    text = log.read_text()
    new = text.splitlines()[before:]
    assert "Traceback" not in text, "\n".join(new[:40])
    assert len(new) <= MAX_NEW_LINES, "\n".join(new[:40])


async def test_a_flood_of_the_control_socket_is_turned_away_and_the_service_recovers(
        limited: tuple[Path, int, Path]) -> None:
    sock_path, _port, log = limited
    assert await wait_until(lambda: "serving /metrics" in log.read_text(), 20), log.read_text()
    before = len(log.read_text().splitlines())
    held = _flood(socket.AF_UNIX, str(sock_path), FLOOD)
    try:
        await asyncio.sleep(1.0)
        with contextlib.suppress(control.ControlError):
            await control.request(sock_path, "status", timeout=1.0)  # busy, or served
    finally:
        for sock in held:
            sock.close()
    # the held connections end as their clients close; then the socket serves again
    assert await until(lambda: _served(sock_path), 3)
    assert await _status_within(sock_path, 2.0)
    new = log.read_text().splitlines()[before:]
    assert "Traceback" not in log.read_text(), "\n".join(new[:40])
    assert len(new) <= MAX_NEW_LINES, "\n".join(new[:40])


async def _trickle(port: int, seconds: float) -> None:
    """A slow-loris client: a request head one byte at a time, never finished."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not reader.at_eof():
            writer.write(b"G")
            await writer.drain()
            await asyncio.sleep(0.1)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _oversize(port: int) -> None:
    """A request head twenty times the bound, sent at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20 * 8192)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_slow_and_oversized_metrics_requests_leave_the_control_socket_answering(
        limited: tuple[Path, int, Path]) -> None:
    sock_path, port, log = limited
    assert await wait_until(lambda: "serving /metrics" in log.read_text(), 20), log.read_text()
    before = len(log.read_text().splitlines())
    clients = [asyncio.create_task(_trickle(port, 3.0)) for _ in range(20)]
    clients += [asyncio.create_task(_oversize(port)) for _ in range(20)]
    try:
        await asyncio.sleep(1.0)
        assert await _status_within(sock_path, 2.0)
    finally:
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 10)
    assert await _status_within(sock_path, 2.0)
    new = log.read_text().splitlines()[before:]
    assert "Traceback" not in log.read_text(), "\n".join(new[:40])
    assert len(new) <= MAX_NEW_LINES, "\n".join(new[:40])
