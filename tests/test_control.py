"""The control socket on a real unix socket: each verb, bad requests, the client's errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pigateway.errors import ConfigError, ControlError, ServiceNotRunning, StoreFull
from pigateway.listeners import control
from pigateway.listeners.control import ControlServer, request
from pigateway.state import GatewayState


class Switchboard:
    """The smallest real :class:`control.Controls`: it changes the state as the service would."""

    def __init__(self) -> None:
        self.state = GatewayState()
        self.flushes = 0
        self.fail_with: Exception | None = None

    def pause(self) -> None:
        self._maybe_fail()
        self.state.update(paused=True)

    def resume(self) -> None:
        self._maybe_fail()
        self.state.update(paused=False)

    def flush(self) -> None:
        self._maybe_fail()
        self.flushes += 1

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture
def board() -> Switchboard:
    return Switchboard()


@pytest.fixture
async def server(folder: Path, board: Switchboard) -> AsyncIterator[ControlServer]:
    async with ControlServer(folder / "control.sock", board,
                             bounds=dataclasses.replace(control.BOUNDS, request_seconds=5)) as srv:
        yield srv


async def _talk(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Send raw lines on one connection; return every reply until the server closes or idles."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b"".join(lines))
    await writer.drain()
    replies = []
    try:
        for _ in lines:
            line = await asyncio.wait_for(reader.readline(), 3)
            if not line:
                break
            replies.append(json.loads(line))
    finally:
        writer.close()
        await writer.wait_closed()
    return replies


async def test_status(server: ControlServer) -> None:
    reply = await request(server.path, "status")
    assert reply["ok"] is True
    assert reply["state"]["link"] == "offline"
    assert reply["state"]["paused"] is False


async def test_pause_resume_flush(server: ControlServer, board: Switchboard) -> None:
    assert (await request(server.path, "pause"))["state"]["paused"] is True
    assert board.state.paused
    assert (await request(server.path, "resume"))["state"]["paused"] is False
    assert not board.state.paused
    await request(server.path, "flush")
    assert board.flushes == 1


async def test_several_requests_on_one_connection(server: ControlServer,
                                                  board: Switchboard) -> None:
    replies = await _talk(server.path, b'{"cmd": "pause"}\n', b'{"cmd": "status"}\n',
                          b'{"cmd": "resume"}\n')
    assert [r["state"]["paused"] for r in replies] == [True, True, False]


async def test_the_socket_is_group_rw_only(server: ControlServer) -> None:
    mode = server.path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"not json\n", "not a JSON request"),
        (b"\xff\xfe\n", "not a JSON request"),
        (b'["status"]\n', "a request is a JSON object"),
        (b'{"verb": "status"}\n', "a request is a JSON object"),
        (b'{"cmd": 5}\n', "a request is a JSON object"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_goes_on(
    server: ControlServer, board: Switchboard, line: bytes, error: str
) -> None:
    bad, good = await _talk(server.path, line, b'{"cmd": "pause"}\n')
    assert bad["ok"] is False
    assert error in bad["error"]
    assert good["ok"] is True
    assert board.state.paused


BAD_LINES = [
    pytest.param(b"[" * 4000 + b"\n", "nested 4000 deep", id="4000-brackets"),
    pytest.param(b'{"cmd": ' + b"[" * 2000 + b"\n", "nested", id="deep-value"),
    pytest.param(b'{"cmd": "status", "x": 1e400}\n', "not finite", id="1e400"),
    pytest.param(b'{"cmd": "status", "x": -Infinity}\n', "not JSON", id="-Infinity"),
    pytest.param(b'{"cmd": "status", "x": NaN}\n', "not JSON", id="NaN"),
    pytest.param(b'{"cmd": "\\ud800"}\n', "surrogate", id="surrogate-verb"),
    pytest.param(b'{"cmd": "status", "\\udfff": 1}\n', "surrogate", id="surrogate-key"),
    pytest.param(b'{"cmd": "status", "n": ' + b"9" * 4000 + b"}\n", "digits", id="huge-int"),
    pytest.param(b'{"cmd": "st\x00atus"}\n', "not a JSON request", id="raw-NUL"),
]


@pytest.mark.parametrize(("line", "error"), BAD_LINES)
async def test_what_json_loads_cannot_hold_is_a_warning_and_an_error_reply(
        server: ControlServer, board: Switchboard, caplog: pytest.LogCaptureFixture,
        line: bytes, error: str) -> None:
    """Deep nesting, non-finite numbers, huge integers, lone surrogates: each one a bounded
    warning and an error reply, never an ERROR traceback; the connection goes on."""
    with caplog.at_level(logging.DEBUG, logger="pigateway.control"):
        bad, good = await _talk(server.path, line, b'{"cmd": "pause"}\n')
    assert bad["ok"] is False and error in bad["error"], bad
    assert len(bad["error"]) < 300
    assert good["ok"] is True and board.state.paused
    records = [r for r in caplog.records if r.name == "pigateway.control"]
    assert [r for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and len(warnings[0]) < 400 and "\n" not in warnings[0]


async def test_a_bigger_line_limit_still_refuses_huge_numbers_and_depth(
        folder: Path, board: Switchboard, caplog: pytest.LogCaptureFixture) -> None:
    """With a line limit above Python's int-printing limit (4,300 digits) and recursion limit."""
    bounds = dataclasses.replace(control.BOUNDS, request_bytes=1 << 20)
    async with ControlServer(folder / "big.sock", board, bounds=bounds) as srv:
        with caplog.at_level(logging.DEBUG, logger="pigateway.control"):
            replies = await _talk(srv.path, b'{"cmd": "status", "n": ' + b"9" * 5000 + b"}\n",
                                  b"[" * 200_000 + b"\n", b'{"cmd": "status"}\n')
    assert [r["ok"] for r in replies] == [False, False, True]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_huge_line_is_refused_and_the_server_goes_on(server: ControlServer) -> None:
    (reply,) = await _talk(server.path, b'{"cmd": "' + b"x" * 100_000 + b'"}\n')
    assert reply == {"ok": False, "error": "request line longer than 4096 bytes"}
    assert (await request(server.path, "status"))["ok"]


async def test_a_client_that_leaves_mid_line_is_dropped(server: ControlServer,
                                                        board: Switchboard) -> None:
    for _ in range(20):
        _reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(b'{"cmd": "pau')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    assert not board.state.paused, "a half request must not act"
    assert (await request(server.path, "status"))["ok"]


async def test_a_silent_client_is_closed_after_the_idle_timeout(folder: Path,
                                                                board: Switchboard) -> None:
    bounds = dataclasses.replace(control.BOUNDS, request_seconds=0.2)
    async with ControlServer(folder / "c.sock", board, bounds=bounds) as srv:
        reader, writer = await asyncio.open_unix_connection(str(srv.path))
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()


async def test_too_many_clients_are_turned_away(server: ControlServer) -> None:
    held = [await asyncio.open_unix_connection(str(server.path))
            for _ in range(control.MAX_CLIENTS)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    # closed as it is accepted, unread: the busy reply, then the end
    assert json.loads(await asyncio.wait_for(reader.read(), 3)) == control.BUSY
    writer.close()
    with pytest.raises(ControlError):
        await request(server.path, "status")
    for _reader, writer in held:
        writer.close()
    await asyncio.sleep(0.05)
    assert (await request(server.path, "status"))["ok"]


async def test_errors_of_the_service_are_replies_not_crashes(
    server: ControlServer, board: Switchboard
) -> None:
    board.fail_with = StoreFull("disk nearly full")
    with pytest.raises(ControlError, match=r"^disk nearly full$"):
        await request(server.path, "pause")
    board.fail_with = RuntimeError("bug")
    with pytest.raises(ControlError, match="internal error"):
        await request(server.path, "flush")
    board.fail_with = None
    assert (await request(server.path, "status"))["ok"]


async def test_an_unknown_verb_raises_control_error_at_the_client(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="unknown command 'explode'") as info:
        await request(server.path, "explode")
    assert not isinstance(info.value, ServiceNotRunning)


async def test_not_running_when_the_socket_is_missing(folder: Path) -> None:
    with pytest.raises(ServiceNotRunning, match="not running"):
        await request(folder / "control.sock", "status")


async def test_not_running_when_nobody_listens_on_a_stale_socket(folder: Path) -> None:
    stale = folder / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()  # the file stays, nobody listens: as after a crash
    with pytest.raises(ServiceNotRunning):
        await request(stale, "status")


async def test_a_service_that_never_answers_times_out(folder: Path) -> None:
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(folder / "mute.sock"))
    mute.listen()
    try:
        with pytest.raises(ControlError, match="did not answer"):
            await request(folder / "mute.sock", "status", timeout=0.3)
    finally:
        mute.close()


async def test_a_stale_socket_is_replaced(folder: Path, board: Switchboard) -> None:
    path = folder / "control.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    async with ControlServer(path, board):
        assert (await request(path, "status"))["ok"]
    assert not path.exists(), "the socket file is removed on close"


async def test_a_live_socket_is_not_stolen(server: ControlServer, board: Switchboard) -> None:
    with pytest.raises(ControlError, match="already serves"):
        async with ControlServer(server.path, board):
            pass
    assert (await request(server.path, "status"))["ok"], "the first server still serves"


async def test_a_file_that_is_not_a_socket_is_left_alone(folder: Path,
                                                         board: Switchboard) -> None:
    path = folder / "control.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match=r"control\.socket: .* not a socket"):  # exit 78
        await ControlServer(path, board).start()
    assert path.read_text() == "precious"


async def test_close_is_idempotent_and_drops_clients(folder: Path, board: Switchboard) -> None:
    srv = ControlServer(folder / "control.sock", board)
    await srv.start()
    reader, writer = await asyncio.open_unix_connection(str(srv.path))
    await asyncio.sleep(0.05)
    await srv.aclose()
    await srv.aclose()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    with pytest.raises(ServiceNotRunning):
        await request(srv.path, "status")
