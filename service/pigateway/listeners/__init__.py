"""Every socket the service listens on, bounded one way: connections, request size, time.

A listener that accepts whatever comes hands its descriptors to whoever connects: a few
hundred idle connections to a loopback port once took every descriptor of the service, so
its control socket stopped answering and asyncio logged a traceback per failed ``accept``
(thousands a second). So no part of the service calls ``asyncio.start_server`` or
``start_unix_server`` itself (tests/test_listeners.py holds that); each serves through a
:class:`Listener`, which owns the accept loop:

- at most :attr:`Bounds.connections` connections open at once; one more is closed as it is
  accepted, before anything is read from it (a best-effort :attr:`Bounds.busy` written
  first), so a flood costs one descriptor for a moment, not one each;
- a request is at most :attr:`Bounds.request_bytes` (the stream reader's limit) and must
  arrive whole within :attr:`Bounds.request_seconds` (:meth:`Connection.request`), so a
  slow-loris client holds its slot only that long;
- a connection lives at most :attr:`Bounds.connection_seconds`, replies included;
- a failing ``accept`` (out of descriptors, ...) is retried after a pause, and both it and
  the refusals at the cap are logged once per :data:`LOG_INTERVAL` with a count, never a
  line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

#: Seconds between two warnings of one kind from one listener.
LOG_INTERVAL: Final = 60.0
#: Seconds the accept loop rests after ``accept`` failed (no descriptor left, ...).
ACCEPT_PAUSE: Final = 0.5
#: Seconds a closing connection may take to flush its last bytes before it is cut.
CLOSE_TIMEOUT: Final = 1.0
#: Connections waiting in the kernel to be accepted (each of them holds no descriptor).
BACKLOG: Final = 64


@dataclass(frozen=True)
class Bounds:
    """What one listener allows."""

    #: connections open at once; the next is closed when accepted, before any read
    connections: int
    #: bytes of one request at most (a line, an HTTP head)
    request_bytes: int
    #: seconds from waiting for a request to having all of it
    request_seconds: float
    #: seconds a connection may stay open, whatever it does
    connection_seconds: float
    #: written (best effort) to a connection closed at the cap, before it is closed
    busy: bytes = b""

    def __post_init__(self) -> None:
        if min(self.connections, self.request_bytes) < 1 or min(
                self.request_seconds, self.connection_seconds) <= 0:
            raise ValueError(f"every bound is positive: {self}")


class Connection:
    """One accepted connection, as its handler sees it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 bounds: Bounds) -> None:
        self.reader = reader
        self.writer = writer
        self.bounds = bounds

    async def request(self, separator: bytes) -> bytes:
        """The next request, up to and with ``separator``. Raises ``TimeoutError`` (not whole
        within ``request_seconds``), ``asyncio.LimitOverrunError`` (over ``request_bytes``)
        or ``asyncio.IncompleteReadError`` (the client closed before the end)."""
        async with asyncio.timeout(self.bounds.request_seconds):
            return await self.reader.readuntil(separator)

    async def reply(self, data: bytes) -> None:
        """Send ``data`` (bounded by the connection's own deadline)."""
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[Connection], Awaitable[None]]


class Throttled:
    """A log line said at most once per ``interval``, with how often it happened since."""

    def __init__(self, logger: logging.Logger, message: str, *,
                 level: int = logging.WARNING, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.message = message
        self.level = level
        self.interval = interval
        self.count = 0  # all of them, said or not
        self._unsaid = 0
        self._said_at: float | None = None

    def note(self, *args: object, exc: BaseException | None = None) -> None:
        """One more; said now (``exc``'s traceback with it) unless said within the interval."""
        self.count += 1
        self._unsaid += 1
        now = time.monotonic()
        if self._said_at is not None and now - self._said_at < self.interval:
            return
        if self._unsaid == 1:
            self.logger.log(self.level, self.message, *args, exc_info=exc)
        else:
            self.logger.log(self.level, self.message + " (%d times since the last such line)",
                            *args, self._unsaid, exc_info=exc)
        self._said_at, self._unsaid = now, 0


class Listener:
    """Serves ``handler`` on one or more listening sockets, within ``bounds``."""

    def __init__(self, name: str, handler: Handler, bounds: Bounds) -> None:
        self.name = name
        self.handler = handler
        self.bounds = bounds
        self.sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter | None] = {}
        self.refused = Throttled(log, f"{name}: refused a connection: {bounds.connections} are "
                                 "open, the most allowed")
        self.accept_failed = Throttled(log, f"{name}: cannot accept a connection: %s")
        self.failed = Throttled(log, f"{name}: a connection failed: %r", level=logging.ERROR)

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._clients)

    async def serve_tcp(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (each address it resolves to). Raises ``OSError``."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            self._serve(socket.create_server(address, family=family, backlog=BACKLOG))

    async def serve_unix(self, path: Path, mode: int) -> None:
        """Listen on the unix socket ``path`` (which must not exist) with ``mode``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, mode)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sockets.append(sock)
        self._accepting.append(asyncio.create_task(self._accept(sock),
                                                   name=f"{self.name}-accept"))

    async def aclose(self) -> None:
        """Stop accepting, cut every connection, wait for their handlers (idempotent)."""
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting.clear()
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        for task, writer in list(self._clients.items()):
            if writer is None:
                task.cancel()  # not connected yet: nothing to say goodbye on
            else:
                writer.transport.abort()  # its handler ends with a ConnectionError
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)

    # ---------------------------------------------------------------- the accept loop

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, ...
                self.accept_failed.note(exc)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            if len(self._clients) >= self.bounds.connections:
                self._refuse(conn)
                continue
            task = asyncio.create_task(self._run(conn), name=f"{self.name}-client")
            self._clients[task] = None
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._clients.pop(task, None)

    def _refuse(self, conn: socket.socket) -> None:
        """Close ``conn`` now, unread: its descriptor is back at once."""
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            if self.bounds.busy:
                conn.send(self.bounds.busy)
        conn.close()
        self.refused.note()

    async def _run(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            reader, writer = await _streams(conn, self.bounds.request_bytes)
        except OSError:
            conn.close()
            return
        self._clients[task] = writer
        try:
            async with asyncio.timeout(self.bounds.connection_seconds):
                await self.handler(Connection(reader, writer, self.bounds))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("%s: a client went away or was cut: %r", self.name, exc)
        except Exception as exc:  # a handler's bug ends its connection, not the listener
            self.failed.note(exc, exc=exc)
        finally:
            await _close(writer)


async def _streams(conn: socket.socket,
                   limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Reader and writer over an accepted socket; the reader holds at most ``limit``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after flushing what is written; cut it if the client does not take it."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass
