"""A hostile MQTT peer: a scripted broker, and a raw client, that send what real brokers let
through and paho refuses, on 127.0.0.1 only.

:class:`HostileBroker` plays the broker for one client at a time (the service's uplink or
ingest connection): CONNACK with the limits a test chooses (Receive Maximum, Maximum Packet
Size, session present), SUBACK, PINGRESP, a PUBACK code per message (``decide``), and the
limits enforced as a strict broker does (a PUBLISH past Maximum Packet Size, or past
Receive Maximum unacknowledged, is answered with a DISCONNECT 0x95 / 0x93). A test sends
the client any bytes (:meth:`HostileBroker.send`), runs a QoS 1 or 2 delivery and cuts it
at any step (:meth:`HostileBroker.deliver`), and reads what the client sent
(``packets``, ``published``, ``max_unacked``, ``largest``).

:class:`RawClient` is a publisher that writes packets byte by byte, to put through a real
mosquitto what paho would never write (mosquitto 2.0 passes U+FEFF in a property).

Every loop here is bounded, every wait has a timeout; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Self

from harness import mqttwire as w

#: ``decide(publish)``: the PUBACK (QoS 1) or PUBREC (QoS 2) reason code for one of the
#: client's PUBLISHes, or None to leave it unacknowledged.
Decide = Callable[[w.Publish], int | None]
#: Where :meth:`HostileBroker.deliver` stops a delivery: after sending the PUBLISH, after the
#: client's PUBREC, or after our PUBREL (QoS 2); the connection is then closed.
Cut = Literal["publish", "pubrec", "pubrel"] | None
#: Packets read per connection at most (far beyond any test).
MAX_PACKETS = 1_000_000


def _accept_all(publish: w.Publish) -> int | None:
    return 0


@dataclass
class Session:
    """One client connection to the hostile broker."""

    number: int
    writer: asyncio.StreamWriter
    v5: bool = True
    client_id: bytes = b""
    clean: bool = True
    #: the client's QoS 1/2 PUBLISH packet ids not yet acknowledged by us
    unacked: set[int] = field(default_factory=set)
    closed: bool = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError(f"connection {self.number} is closed")
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        """Drop the connection at once (no DISCONNECT): a cut."""
        self.closed = True
        with contextlib.suppress(OSError):
            sock = self.writer.get_extra_info("socket")
            if sock is not None:  # RST, not a FIN that waits for buffered bytes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()


class HostileBroker:
    """A scripted MQTT broker on 127.0.0.1 (see the module's docstring). Use ``async with``."""

    def __init__(self, *, receive_maximum: int | None = None,
                 maximum_packet_size: int | None = None, session_present: bool = False,
                 decide: Decide = _accept_all, connack_code: int = 0,
                 connack_props: bytes = b"", strict: bool = True,
                 connack_delay: float = 0.0, hold: float | None = None) -> None:
        self.receive_maximum = receive_maximum
        self.maximum_packet_size = maximum_packet_size
        self.session_present = session_present
        self.decide = decide
        self.connack_code = connack_code
        self.connack_props = connack_props
        #: enforce Maximum Packet Size and Receive Maximum with a DISCONNECT, as the spec says
        self.strict = strict
        #: seconds each CONNACK is held back (a slow broker)
        self.connack_delay = connack_delay
        #: seconds each connection is kept after its CONNACK, then cut (None: until it ends)
        self.hold = hold
        self.port = 0
        self.sessions: list[Session] = []
        #: every packet from any client: (connection number, packet)
        self.packets: list[tuple[int, w.Packet]] = []
        #: the clients' PUBLISHes: (connection number, publish)
        self.published: list[tuple[int, w.Publish]] = []
        #: the most QoS 1/2 publishes of one connection unacknowledged at once
        self.max_unacked = 0
        #: the biggest packet a client sent, in bytes
        self.largest = 0
        #: what the broker did about a limit: ("disconnect", code) per enforcement
        self.enforced: list[int] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._next_mid = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0,
                                                  family=socket.AF_INET)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for session in self.sessions:
            session.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    # ---- what a test does

    @property
    def session(self) -> Session:
        """The latest connection."""
        if not self.sessions:
            raise AssertionError("no client has connected")
        return self.sessions[-1]

    def new_mid(self) -> int:
        self._next_mid = self._next_mid % 65535 + 1
        return self._next_mid

    async def send(self, data: bytes) -> None:
        """Bytes to the latest connection, as they are."""
        await self.session.send(data)

    async def wait_for(self, check: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Until ``check()`` holds (True) or ``timeout`` passed (False); woken per packet."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.2)):
                    await self._changed.wait()
        return True

    async def connected(self, count: int = 1, timeout: float = 10.0) -> Session:
        """The ``count``-th connection, once it has had its CONNACK."""
        if not await self.wait_for(lambda: len(self.sessions) >= count, timeout):
            raise AssertionError(f"{len(self.sessions)} connection(s), waited for {count}")
        return self.sessions[count - 1]

    async def subscribed(self, timeout: float = 10.0) -> bool:
        return await self.wait_for(
            lambda: any(p.kind == w.SUBSCRIBE for _, p in self.packets), timeout)

    def from_client(self, kind: int, mid: int | None = None,
                    number: int | None = None) -> list[w.Packet]:
        """The client's packets of ``kind`` (and packet id ``mid``, connection ``number``)."""
        return [p for n, p in self.packets if p.kind == kind
                and (number is None or n == number) and (mid is None or p.mid == mid)]

    async def deliver(self, data: bytes, mid: int | None, qos: int, *, cut: Cut = None,
                      timeout: float = 10.0) -> w.Packet | None:
        """Send a PUBLISH (``data``, built with packet id ``mid``) and run its flow: QoS 1
        until the PUBACK, QoS 2 through PUBREC, PUBREL, PUBCOMP. ``cut`` closes the
        connection at that step instead. Returns the client's last acknowledgement (None:
        none came within ``timeout``, or the flow was cut before it)."""
        session = self.session
        number = session.number
        await session.send(data)
        if cut == "publish" or qos == 0 or mid is None:
            if cut is not None:
                session.close()
            return None
        first = w.PUBACK if qos == 1 else w.PUBREC
        if not await self.wait_for(lambda: bool(self.from_client(first, mid, number)), timeout):
            return None
        answer = self.from_client(first, mid, number)[-1]
        if qos == 1 or answer.ack_code() >= 0x80:
            return answer
        return await self._release(session, mid, answer, cut, timeout)

    async def _release(self, session: Session, mid: int, pubrec: w.Packet, cut: Cut,
                       timeout: float) -> w.Packet | None:
        """QoS 2 after the client's PUBREC: PUBREL, then its PUBCOMP (or the cut)."""
        if cut == "pubrec":
            session.close()
            return pubrec
        await session.send(w.ack(w.PUBREL, mid, v5=session.v5))
        if cut == "pubrel":
            session.close()
            return pubrec
        number = session.number
        if not await self.wait_for(lambda: bool(self.from_client(w.PUBCOMP, mid, number)),
                                   timeout):
            return None
        return self.from_client(w.PUBCOMP, mid, number)[-1]

    async def disconnect(self, code: int, *, reason: w.Text | None = None) -> None:
        """A DISCONNECT with ``code`` (and a Reason String) to the latest client, then close."""
        session = self.session
        props = b"" if reason is None else w.reason_string(reason)
        with contextlib.suppress(ConnectionError, OSError):
            await session.send(w.disconnect(code, v5=session.v5, props=props))
        session.close()

    # ---- one connection

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        session = Session(len(self.sessions) + 1, writer)
        try:
            first = await w.read_packet(reader)
            if first is None or first.kind != w.CONNECT:
                return
            level, session.client_id, session.clean = w.parse_connect(first)
            session.v5 = level == 5
            self._record(session, first)
            props = self.connack_props
            if self.receive_maximum is not None:
                props += w.receive_maximum(self.receive_maximum)
            if self.maximum_packet_size is not None:
                props += w.maximum_packet_size(self.maximum_packet_size)
            if self.connack_delay:
                await asyncio.sleep(self.connack_delay)
            await session.send(w.connack(self.connack_code, v5=session.v5, props=props,
                                         session_present=self.session_present))
            if self.connack_code >= 0x80:
                return
            self.sessions.append(session)
            self._changed.set()
            if self.hold is None:
                await self._serve(session, reader)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.hold):
                        await self._serve(session, reader)
                session.close()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            session.closed = True
            writer.close()
            self._changed.set()

    def _record(self, session: Session, found: w.Packet) -> None:
        self.packets.append((session.number, found))
        self.largest = max(self.largest, found.size)
        self._changed.set()

    async def _serve(self, session: Session, reader: asyncio.StreamReader) -> None:
        for _ in range(MAX_PACKETS):
            found = await w.read_packet(reader)
            if found is None or session.closed:
                return
            self._record(session, found)
            if not await self._answer(session, found):
                return

    async def _answer(self, session: Session, found: w.Packet) -> bool:
        """Answer one of the client's packets as a broker would; False ends the connection."""
        v5 = session.v5
        if found.kind == w.PUBLISH:
            return await self._take_publish(session, found)
        if found.kind == w.PUBREL:
            session.unacked.discard(found.mid)
            await session.send(w.ack(w.PUBCOMP, found.mid, v5=v5))
        elif found.kind == w.SUBSCRIBE:
            mid, filters = w.parse_subscribe(found, v5=v5)
            await session.send(w.suback(mid, [options & 3 for _, options in filters], v5=v5))
        elif found.kind == w.UNSUBSCRIBE:
            mid, filters = w.parse_subscribe(found, v5=v5)
            await session.send(w.unsuback(mid, len(filters), v5=v5))
        elif found.kind == w.PINGREQ:
            await session.send(w.pingresp())
        elif found.kind == w.DISCONNECT:
            return False
        return True

    async def _take_publish(self, session: Session, found: w.Packet) -> bool:
        publish = w.parse_publish(found, v5=session.v5)
        self.published.append((session.number, publish))
        limit = self.maximum_packet_size
        if self.strict and limit is not None and found.size > limit:
            await self._enforce(session, 0x95)
            return False
        if publish.mid is None:
            return True
        if publish.mid not in session.unacked:
            session.unacked.add(publish.mid)
        self.max_unacked = max(self.max_unacked, len(session.unacked))
        most = self.receive_maximum
        if self.strict and most is not None and len(session.unacked) > most:
            await self._enforce(session, 0x93)
            return False
        code = self.decide(publish)
        if code is None:
            return True
        if publish.qos == 1 or code >= 0x80:
            session.unacked.discard(publish.mid)
        kind = w.PUBACK if publish.qos == 1 else w.PUBREC
        await session.send(w.ack(kind, publish.mid, code, v5=session.v5))
        return True

    async def acknowledge(self, mid: int, code: int = 0) -> None:
        """Acknowledge a PUBLISH ``decide`` left waiting (PUBACK/PUBREC by its QoS)."""
        session = self.session
        qos = next((p.qos for n, p in self.published
                    if n == session.number and p.mid == mid), 1)
        if qos == 1 or code >= 0x80:
            session.unacked.discard(mid)
        await session.send(w.ack(w.PUBACK if qos == 1 else w.PUBREC, mid, code, v5=session.v5))

    async def _enforce(self, session: Session, code: int) -> None:
        self.enforced.append(code)
        with contextlib.suppress(ConnectionError, OSError):
            await session.send(w.disconnect(code, v5=session.v5))
        session.close()


class RawClient:
    """An MQTT client that writes packets byte by byte (to a real broker, through a proxy)."""

    def __init__(self, port: int, client_id: str = "raw-client", *, v5: bool = True) -> None:
        self.port = port
        self.client_id = client_id
        self.v5 = v5
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._mid = 0

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        await self.send(w.connect(self.client_id, v5=self.v5))
        answer = await self.read(10.0)
        if answer is None or answer.kind != w.CONNACK or answer.body[1] != 0:
            raise ConnectionError(f"the broker refused the raw client: {answer}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self.send(w.disconnect(v5=self.v5))
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    def new_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    async def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def read(self, timeout: float) -> w.Packet | None:
        assert self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                return await w.read_packet(self._reader)
        except TimeoutError:
            return None

    async def publish(self, topic: w.Text, payload: bytes, *, props: bytes = b"",
                      qos: int = 1, timeout: float = 10.0) -> int | None:
        """Publish; for QoS 1 return the PUBACK's reason code (None: the broker closed or
        said nothing in ``timeout``)."""
        mid = self.new_mid() if qos else None
        await self.send(w.publish(topic, payload, qos=qos, mid=mid, v5=self.v5, props=props))
        if not qos:
            return 0
        for _ in range(100):  # skip what else the broker sends (bounded)
            answer = await self.read(timeout)
            if answer is None:
                return None
            if answer.kind in (w.PUBACK, w.PUBREC) and answer.mid == mid:
                return answer.ack_code()
        return None
