"""The control socket: JSON lines on a unix socket for ``pigateway status|pause|resume|flush``.

One request per line, ``{"cmd": "status"}``; one reply per line, ``{"ok": true, "state":
{...}}`` or ``{"ok": false, "error": "..."}``. A bad request (not JSON, unknown verb, a line
over :data:`MAX_LINE`, nested deeper than :data:`MAX_DEPTH`, a number that is not finite or
too long, a lone surrogate) gets an error reply and a bounded warning in the journal (at most
one a minute); a client that goes away mid-line is dropped. The socket is bounded as every
listener is (:mod:`pigateway.listeners`): :data:`MAX_CLIENTS` connections, a line in
:data:`IDLE_TIMEOUT`, a connection in :data:`CONNECTION_TIMEOUT`.
Nothing a client sends can stop the server or the service.

The server reaches the service only through :class:`Controls`, so it knows nothing of the
uplink or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from pigateway import inputs
from pigateway.counters import COUNTERS
from pigateway.errors import (
    ConfigError,
    ControlError,
    InvalidCommand,
    PigatewayError,
    ServiceNotRunning,
)
from pigateway.listeners import Bounds, Connection, Listener, Throttled
from pigateway.state import GatewayState

#: Named for the journal as operators know it, whichever package holds this module.
log = logging.getLogger("pigateway.control")

MAX_LINE: Final = 4096
"""Bytes per request line at most; a longer one is refused and its connection closed."""
MAX_DEPTH: Final = 4
"""JSON nesting of a request at most (``{"cmd": "status"}`` is 1)."""
MAX_CLIENTS: Final = 16
"""Connections served at once; more get an error reply, unread, and are closed."""
IDLE_TIMEOUT: Final = 10.0
"""Seconds a connection may take to send its next whole request (the CLI sends at once)."""
CONNECTION_TIMEOUT: Final = 60.0
"""Seconds a connection may stay open, however busy."""
SOCKET_MODE: Final = 0o660
BUSY: Final = {"ok": False, "error": "too many clients; try again"}
#: The control socket's bounds.
BOUNDS: Final = Bounds(connections=MAX_CLIENTS, request_bytes=MAX_LINE,
                       request_seconds=IDLE_TIMEOUT, connection_seconds=CONNECTION_TIMEOUT,
                       busy=json.dumps(BUSY).encode() + b"\n")


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

    def __init__(self, path: Path, controls: Controls, *, bounds: Bounds = BOUNDS) -> None:
        self.path = Path(path)
        self.controls = controls
        self.bounds = bounds
        self.listener = Listener("control", self._converse, bounds)
        self._refusals = Throttled(log, "control: refused request %s: %s")
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
            await self.listener.serve_unix(self.path, SOCKET_MODE)
            self._inode = self.path.stat().st_ino
        except OSError as exc:
            await self.aclose()
            raise ControlError(f"cannot serve the control socket {self.path}: {exc}") from exc
        log.info("control socket listening on %s", self.path)

    async def aclose(self) -> None:
        """Stop serving, drop the clients and remove our socket file (idempotent)."""
        await self.listener.aclose()
        self._unlink_ours()

    def _unlink_ours(self) -> None:
        """Remove the socket file, unless another process has bound a new one there."""
        with contextlib.suppress(OSError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        self._inode = None

    # ---------------------------------------------------------------- one connection

    async def _converse(self, conn: Connection) -> None:
        """Requests and replies until the client closes; an idle or slow client is cut by
        the listener (:meth:`Connection.request`)."""
        while True:
            try:
                line = await conn.request(b"\n")
            except asyncio.IncompleteReadError:
                return  # EOF, possibly mid-line: nobody is left to answer
            except asyncio.LimitOverrunError:
                limit = self.bounds.request_bytes
                self._refusals.note("line", f"longer than {limit} bytes")
                await conn.reply(_line(_error(f"request line longer than {limit} bytes")))
                return
            await conn.reply(_line(self.handle(line)))

    def handle(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (never raises). A bad request is the client's
        mistake: one bounded warning and an error reply, never a traceback."""
        try:
            verb = _parse(line)
        except ControlError as exc:
            self._refusals.note(inputs.shown(line, 80), exc)
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
            return _error(str(exc))  # its words say what happened; a class name says nothing
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


def _line(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


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
        raise ConfigError("control.socket", f"{str(path)!r} exists and is not a socket (a "
                          "file or a folder is there); the service will not replace it: "
                          "name another path, or move that one away")
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
