"""Every listener of the service is bounded, the same way, on real sockets: connections
(closed unread past the cap), request size, request time (a slow-loris is cut), connection
time; and the log keeps to a few lines however many clients misbehave. Each test runs
against each listener: the /metrics HTTP listener on 127.0.0.1 and the control unix socket.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.waits import wait_until
from pigateway import listeners
from pigateway.config import MetricsConfig, StoreConfig
from pigateway.listeners import Bounds, Listener, control, metrics
from pigateway.listeners.control import ControlServer
from pigateway.listeners.metrics import Exporter
from pigateway.state import GatewayState
from pigateway.store import Store

SERVICE = Path(__file__).resolve().parent.parent / "service" / "pigateway"
#: Small bounds, so a test sees each one reached in well under a second.
SMALL = {"connections": 4, "request_seconds": 0.5, "connection_seconds": 2.0}
#: Warnings one test may leave in the log, whatever it sent.
MAX_WARNINGS = 3

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclasses.dataclass
class Served:
    """One listener of the service, running, and how a client talks to it."""

    name: str
    listener: Listener
    connect: Callable[[], Awaitable[Streams]]
    #: a whole good request, and what its answer starts with
    good: bytes
    answer: bytes
    #: a well-formed request of about ``size`` bytes
    sized: Callable[[int], bytes]


@pytest.fixture(params=["metrics", "control"])
async def served(request: pytest.FixtureRequest, folder: Path,
                 store_config: StoreConfig) -> AsyncIterator[Served]:
    if request.param == "metrics":
        port = free_port()
        async with await Store.open(store_config) as store:
            exporter = Exporter(MetricsConfig(listen=f"127.0.0.1:{port}"), GatewayState(), store,
                                bounds=dataclasses.replace(metrics.BOUNDS, **SMALL))
            await exporter.bind()
            try:
                yield Served("metrics", exporter.listener,
                             lambda: asyncio.open_connection("127.0.0.1", port),
                             b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n", b"HTTP/1.1 200",
                             lambda n: b"GET /metrics HTTP/1.1\r\nX: " + b"a" * n + b"\r\n\r\n")
            finally:
                await exporter.listener.aclose()
    else:
        path = folder / "control.sock"
        server = ControlServer(path, _Board(),
                               bounds=dataclasses.replace(control.BOUNDS, **SMALL))
        async with server:
            yield Served("control", server.listener,
                         lambda: asyncio.open_unix_connection(str(path)),
                         b'{"cmd": "status"}\n', b'{"ok": true',
                         lambda n: b'{"cmd": "status", "x": "' + b"a" * n + b'"}\n')


class _Board:
    """The smallest real ``control.Controls``."""

    def __init__(self) -> None:
        self.state = GatewayState()

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def flush(self) -> None: ...


async def _ask(served: Served) -> bytes:
    """The answer to one good request on a fresh connection."""
    reader, writer = await served.connect()
    try:
        writer.write(served.good)
        await writer.drain()
        return await asyncio.wait_for(reader.read(2048), 3)
    finally:
        writer.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection, which must be within ``seconds``."""
    received = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(65536):
            received += chunk
    return received


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_connections_past_the_cap_are_closed_unread_and_the_rest_are_served(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    cap = served.listener.bounds.connections
    idle = [await served.connect() for _ in range(cap)]
    assert await wait_until(lambda: served.listener.open == cap, 3)
    for _ in range(10 * cap):
        reader, writer = await served.connect()
        said = await _closed_within(reader, 1.0)  # unread: it sent nothing
        assert said == served.listener.bounds.busy, said
        writer.close()
    assert served.listener.open == cap
    assert served.listener.refused.count == 10 * cap
    for _, writer in idle:
        writer.close()
    assert await wait_until(lambda: served.listener.open == 0, 3)
    assert (await _ask(served)).startswith(served.answer)
    warned = _warnings(caplog)
    assert len(warned) == 1 and "refused a connection" in warned[0], warned


async def test_idle_connections_are_cut_after_the_request_time(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    bounds = served.listener.bounds
    idle = [await served.connect() for _ in range(bounds.connections)]
    started = time.monotonic()
    for reader, writer in idle:
        assert await _closed_within(reader, bounds.request_seconds + 1.0) == b""
        writer.close()
    assert time.monotonic() - started < bounds.request_seconds + 1.0
    assert (await _ask(served)).startswith(served.answer)
    assert len(_warnings(caplog)) <= MAX_WARNINGS


async def test_a_slow_loris_request_is_cut_at_the_request_time(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """One byte at a time, never quite done: the deadline is for the whole request."""
    bounds = served.listener.bounds
    reader, writer = await served.connect()
    started = time.monotonic()
    try:
        for byte in served.good[:-1]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof() or time.monotonic() - started > 3 * bounds.request_seconds:
                break
        said = await _closed_within(reader, bounds.request_seconds + 1.0)
    except ConnectionResetError:
        # the cut met a byte on its way (or unread): the kernel answers it with a reset, not
        # a FIN; the server sent nothing either way
        said = b""
    finally:
        writer.close()
    assert not said.startswith(served.answer)
    assert time.monotonic() - started < bounds.request_seconds + 1.0
    assert len(served.good) * 0.05 > bounds.request_seconds, "the trickle outlasts the bound"
    assert await wait_until(lambda: served.listener.open == 0, 2)
    assert (await _ask(served)).startswith(served.answer)
    assert len(_warnings(caplog)) <= MAX_WARNINGS


async def test_an_oversized_request_is_refused_and_the_listener_goes_on(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    limit = served.listener.bounds.request_bytes
    for _ in range(5):
        reader, writer = await served.connect()
        said = b""
        async with asyncio.timeout(3):  # closed, not left reading or waiting
            with contextlib.suppress(ConnectionError):  # closed unread: maybe a reset
                writer.write(served.sized(20 * limit))
                await writer.drain()
                said = await _closed_within(reader, 3)
        assert not said.startswith(served.answer), said
        writer.close()
        assert await wait_until(lambda: served.listener.open == 0, 2)
    assert (await _ask(served)).startswith(served.answer)
    assert len(_warnings(caplog)) <= MAX_WARNINGS


async def test_a_busy_connection_is_cut_at_the_connection_time(served: Served) -> None:
    """Keeping a connection open with request after request holds it no longer."""
    bounds = served.listener.bounds
    reader, writer = await served.connect()
    started = time.monotonic()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
        while time.monotonic() - started < 3 * bounds.connection_seconds:
            writer.write(served.good[:-1])  # all but the end, then the end
            await writer.drain()
            await asyncio.sleep(bounds.request_seconds / 3)
            writer.write(served.good[-1:])
            await writer.drain()
            if served.name == "control":
                assert (await asyncio.wait_for(reader.readline(), 1)).startswith(served.answer)
            else:
                await asyncio.wait_for(reader.readexactly(1), 1)  # one request a connection
                raise ConnectionError("metrics answers once")
            if reader.at_eof():
                raise ConnectionError("closed")
    writer.close()
    if served.name == "control":
        assert bounds.connection_seconds <= time.monotonic() - started
    assert time.monotonic() - started < bounds.connection_seconds + 1.5


def test_the_bounds_refuse_a_bound_that_is_no_bound() -> None:
    with pytest.raises(ValueError, match="positive"):
        Bounds(connections=0, request_bytes=1, request_seconds=1, connection_seconds=1)
    with pytest.raises(ValueError, match="positive"):
        Bounds(connections=1, request_bytes=1, request_seconds=0, connection_seconds=1)


# ------------------------------------------------------------------ out of descriptors

#: A listener with no cap to speak of, in a process of 40 descriptors: accept fails.
STARVED = """
import asyncio, resource, sys, logging
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from pigateway.listeners import Bounds, Listener

async def main():
    async def echo(conn):
        await conn.reply(await conn.request(b"\\n"))
    listener = Listener("starved", echo, Bounds(1000, 100, 30.0, 60.0))
    await listener.serve_tcp("127.0.0.1", int(sys.argv[1]))
    print("READY", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    print("ACCEPT FAILURES", listener.accept_failed.count, flush=True)
    await listener.aclose()

asyncio.run(main())
"""


async def test_accept_failures_are_said_once_a_minute_and_serving_resumes() -> None:
    """More idle connections than the process has descriptors: ``accept`` fails over and
    over; one warning says so, never a traceback, and a client is served once they leave."""
    port, lasting = free_port(), 4.0
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STARVED, str(port), str(lasting), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={"PYTHONPATH": str(SERVICE.parent)})
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"READY\n"
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(80)]
        await asyncio.sleep(1.5)  # a few accept rounds, each failing
        for _, writer in held:
            writer.close()
        await asyncio.sleep(1.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"still here\n")
        assert await asyncio.wait_for(reader.readline(), 3) == b"still here\n"
        writer.close()
        out = (await asyncio.wait_for(child.communicate(), lasting + 10))[0].decode()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    failures = int(out.split("ACCEPT FAILURES")[1])
    assert failures >= 2, out
    lines = out.splitlines()
    assert "Traceback" not in out
    assert [line for line in lines if line.startswith(("WARNING", "ERROR"))] == [
        "WARNING starved: cannot accept a connection: [Errno 24] Too many open files"], out


# ------------------------------------------------------------------ every listener is one

LISTENING = ("start_server", "start_unix_server", "create_server", "create_unix_server",
             "sock_accept", "listen", "accept", "serve_forever")


def test_only_the_listeners_module_listens() -> None:
    """Any other module that listens (``start_server``, ``sock.listen()``, ...) bypasses the
    bounds; it serves through :class:`pigateway.listeners.Listener` instead."""
    found, serving = [], set()
    for path in sorted(SERVICE.rglob("*.py")):
        if path == SERVICE / "listeners" / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Attribute) and node.func.attr in LISTENING:
                found.append(f"{path.relative_to(SERVICE)}:{node.lineno} {node.func.attr}")
            if isinstance(node.func, ast.Name) and node.func.id == "Listener":
                serving.add(path.relative_to(SERVICE).as_posix())
    assert found == []
    # a new listener: its BOUNDS join the descriptor budget (tests/test_unit_file.py) and
    # the ``served`` fixture above, so every test here runs against it too
    assert serving == {"listeners/control.py", "listeners/metrics.py"}
    assert {"serve_tcp", "serve_unix"} <= set(vars(listeners.Listener))
