"""The control socket: JSON lines on a unix socket for ``pigateway status|pause|resume|flush``.

One request per line, ``{"cmd": "status"}``; one reply per line, ``{"ok": true, "state":
{...}}`` or ``{"ok": false, "error": "..."}``. A bad request (not JSON, unknown verb, a line
over :data:`MAX_LINE`, nested deeper than :data:`MAX_DEPTH`, a number that is not finite or
too long, a lone surrogate) gets an error reply and one bounded warning in the journal; a
client that goes away mid-line is dropped.
Nothing a client sends can stop the server or the service.

The server reaches the service only through :class:`Controls`, so it knows nothing of the
uplink or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from pigateway import inputs
from pigateway.counters import COUNTERS
from pigateway.errors import ControlError, InvalidCommand, PigatewayError, ServiceNotRunning
from pigateway.state import GatewayState

log = logging.getLogger(__name__)

MAX_LINE: Final = 4096
"""Bytes per request line at most; a longer one is refused and its connection closed."""
MAX_DEPTH: Final = 4
"""JSON nesting of a request at most (``{"cmd": "status"}`` is 1)."""
MAX_CLIENTS: Final = 16
"""Connections served at once; more get an error reply and are closed."""
IDLE_TIMEOUT: Final = 30.0
"""Seconds a connection may sit without a complete request."""
SOCKET_MODE: Final = 0o660


class Controls(Protocol):
    """What the control socket may do to the service."""

    state: GatewayState

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def flush(self) -> None: ...


# verb -> what it does (None: only report the state)
VERBS: Final[dict[str, Callable[[Controls], None] | None]] = {
    "status": None,
    "pause": lambda c: c.pause(),
    "resume": lambda c: c.resume(),
    "flush": lambda c: c.flush(),
    "metrics": None,  # the state, and this process's counters (pigateway metrics)
}


class ControlServer:
    """Serves :class:`Controls` on the unix socket ``path`` (mode 0660); async context manager."""

    def __init__(self, path: Path, controls: Controls, *, max_line: int = MAX_LINE,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.path = Path(path)
        self.controls = controls
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._inode: int | None = None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one). Raises :class:`ControlError`."""
        await _clear_stale(self.path)
        try:
            # systemd's RuntimeDirectory= makes the folder; run by hand we may have to.
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=self.max_line)
            os.chmod(self.path, SOCKET_MODE)
            self._inode = self.path.stat().st_ino
        except OSError as exc:
            await self.aclose()
            raise ControlError(f"cannot serve the control socket {self.path}: {exc}") from exc
        log.info("control socket listening on %s", self.path)

    async def aclose(self) -> None:
        """Stop serving, drop the clients and remove our socket file (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # Closing a client's transport ends its handler with EOF; cancelling the handler
        # instead makes Python 3.11's stream callback log a spurious CancelledError.
        for writer in list(self._clients.values()):
            writer.transport.abort()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)
        if server is not None:
            await server.wait_closed()
        self._unlink_ours()

    def _unlink_ours(self) -> None:
        """Remove the socket file, unless another process has bound a new one there."""
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    # ---------------------------------------------------------------- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            if len(self._clients) > MAX_CLIENTS:
                await self._turn_away(reader, writer)
            else:
                await self._converse(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            log.debug("control client went away")
        finally:
            del self._clients[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _turn_away(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the request (closing on unread data would reset the reply away), refuse it."""
        with contextlib.suppress(asyncio.LimitOverrunError):
            async with asyncio.timeout(1.0):
                await reader.readuntil(b"\n")
        await _reply(writer, _error("too many clients; try again"))

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return  # EOF, possibly mid-line: nobody is left to answer
            except asyncio.LimitOverrunError:
                log.warning("control: refused a request line longer than %d bytes",
                            self.max_line)
                await _reply(writer, _error(f"request line longer than {self.max_line} bytes"))
                return
            await _reply(writer, self.handle(line))

    def handle(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (never raises). A bad request is the client's
        mistake: one bounded warning and an error reply, never a traceback."""
        try:
            verb = _parse(line)
        except ControlError as exc:
            log.warning("control: refused request %s: %s", inputs.shown(line, 80), exc)
            return _error(str(exc))
        try:
            action = VERBS[verb]
            if action is not None:
                log.info("control: %s", verb)
                action(self.controls)
            reply: dict[str, Any] = {"ok": True, "state": self.controls.state.as_dict()}
            if verb == "metrics":
                reply["counters"] = COUNTERS.as_dict()
            return reply
        except ControlError as exc:
            return _error(str(exc))
        except PigatewayError as exc:
            return _error(f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("control request %s failed", inputs.shown(line, 80))
            return _error("internal error; see the journal")


def _parse(line: bytes) -> str:
    """The verb of a request line; :class:`ControlError` says what is wrong with it (the
    JSON rules are :func:`pigateway.inputs.loads`: depth, finite numbers, UTF-8)."""
    try:
        request = inputs.loads(line, max_depth=MAX_DEPTH)
    except InvalidCommand as exc:
        raise ControlError(f"not a JSON request: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('a request is a JSON object like {"cmd": "status"}')
    verb: str = request["cmd"]
    if verb not in VERBS:
        raise ControlError(f"unknown command {inputs.shown(verb, 40)}; "
                           f"use one of {', '.join(VERBS)}")
    return verb


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply, default=str).encode() + b"\n")
    await writer.drain()


async def _clear_stale(path: Path) -> None:
    """Remove a socket file left by a dead service; refuse to steal a live one."""
    if not _socket_file(path):
        return
    if await _answers(path):
        raise ControlError(f"another pigateway already serves {path}")
    path.unlink(missing_ok=True)  # noqa: ASYNC240 (a local unlink does not block)


def _socket_file(path: Path) -> bool:
    """Whether ``path`` is a socket; a file of another kind there is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; not touching it")
    return True


async def _answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(1.0):
            await asyncio.get_running_loop().sock_connect(sock, str(path))
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return True


# --------------------------------------------------------------------------- the client


async def request(
    socket_path: Path, cmd: str, timeout: float = 3.0
) -> dict[str, Any]:
    """Send ``cmd`` to the running service and return its reply (``{"ok": True, "state": ...}``).

    Raises :class:`ServiceNotRunning` when nothing listens on ``socket_path`` and
    :class:`ControlError` for a refused request, no permission, a timeout or a bad reply.
    """
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(Path(socket_path), cmd)
    except TimeoutError as exc:
        raise ControlError(f"pigateway did not answer on {socket_path} within {timeout}s") from exc


async def _exchange(path: Path, cmd: str) -> dict[str, Any]:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ServiceNotRunning(f"pigateway is not running (nothing answers on {path})") from exc
    except PermissionError as exc:
        raise ControlError(
            f"no permission to use {path}: run as root or join the pigateway group") from exc
    except OSError as exc:
        raise ControlError(f"cannot connect to {path}: {exc}") from exc
    try:
        writer.write(json.dumps({"cmd": cmd}).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    except (OSError, ValueError) as exc:
        raise ControlError(f"the control connection failed: {exc}") from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _check_reply(line)


def _check_reply(line: bytes) -> dict[str, Any]:
    if not line:
        raise ControlError("pigateway closed the control connection without a reply")
    try:
        reply = inputs.loads(line)
    except InvalidCommand as exc:
        raise ControlError(f"pigateway sent a reply that is not JSON: {exc}") from exc
    if not isinstance(reply, dict):
        raise ControlError("pigateway sent a reply that is not a JSON object")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request refused")))
    return reply
