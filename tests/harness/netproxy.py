"""A TCP proxy on 127.0.0.1 between the service and a real broker, to make a link slow or dead.

``delay`` holds every chunk from the broker for that many seconds (PUBACKs come late, so
batches pile up in flight); ``blackhole()`` stops forwarding in both directions without
closing anything (a dead link that only keepalive or a publish timeout can notice);
``refuse()`` closes new connections at once (a broker that is not back yet); ``reset()``
ends the open ones with an RST (a broker restarted under the link).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from typing import Any, Self


class LoopbackRelay:
    """What every test proxy shares: a server on 127.0.0.1 (``start``) whose ``_serve``
    connects to ``target_port`` and runs its pumps (``_relay``), and a ``close`` that ends
    the server, every connection and every pump."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                  family=socket.AF_INET)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _relay(self, writers: list[asyncio.StreamWriter],
               pumps: list[Coroutine[Any, Any, None]]) -> None:
        """Keep ``writers`` for ``close`` and run ``pumps`` until they end or it is called."""
        self._writers += writers
        for pump in pumps:
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class Proxy(LoopbackRelay):
    """Forwards 127.0.0.1:``port`` to ``target_port``; start with ``await proxy.start()``."""

    def __init__(self, target_port: int, *, delay: float = 0.0) -> None:
        super().__init__(target_port)
        self.delay = delay
        self._open = asyncio.Event()
        self._open.set()
        self.refusing = False

    def blackhole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def refuse(self) -> None:
        self.refusing = True

    def reset(self) -> None:
        """End every open connection with a TCP RST (a broker restarted under the link: the
        service reads ``[Errno 104] Connection reset by peer``); new ones are served."""
        for writer in self._writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    def accept(self) -> None:
        self.refusing = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._relay([writer, up_writer],
                    [self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)])

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                    delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                await self._open.wait()
                if not data:
                    sink.close()
                    return
                sink.write(data)
                await sink.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await source.read(65536)
                await self._open.wait()
                chunks.put_nowait((loop.time() + (self.delay if delayed else 0.0), data))
                if not data:
                    break
            await sender
        except (OSError, asyncio.IncompleteReadError):
            sink.close()
        finally:
            sender.cancel()
