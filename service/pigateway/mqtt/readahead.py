"""Inbound messages read ahead of their consumer, in memory, bounded.

:class:`ReadAhead` sits between paho's socket reads and the consumer; when it is full the
socket is not read (TCP's window holds the rest at the broker). Not to be confused with the
store's inbox (:mod:`pigateway.store.inbox`), the durable table of inbound commands.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pigateway.mqtt.forwarded import Extras
from pigateway.mqtt.packets import Undecodable

#: Payload bytes held at most before reading pauses, whatever the count: 512 messages of
#: 200 KB (each under ingest's packet limit) would be 100 MB on a Pi Zero's 512.
READ_AHEAD_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class Message:
    """An inbound message, for :meth:`Connection.ack`."""

    topic: str
    #: an :class:`~pigateway.mqtt.packets.Undecodable` when the MQTT library could not decode it
    payload: bytes
    mid: int
    qos: int
    extras: Extras = Extras()

    @property
    def undecodable(self) -> Undecodable | None:
        """The packet paho could not decode (its raw bytes and why), or None."""
        return self.payload if isinstance(self.payload, Undecodable) else None



class ReadAhead:
    """Inbound messages between paho's socket reads and their consumer, bounded.

    aiomqtt keeps them in an unbounded queue and reads the socket whatever its length; a
    broker that sends past our Receive Maximum (mosquitto 2.0 with ``max_inflight_messages
    0`` does once acknowledgements flow) fills it as fast as the consumer is slower: 14,000
    messages and 130 MiB in a burst, measured. Here reading the socket pauses at ``limit``
    messages, or :data:`READ_AHEAD_BYTES` of payloads (TCP's window holds the rest at the
    broker), and resumes at half of both.
    """

    def __init__(self, limit: int | None, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.limit = None if limit is None else max(2, limit)
        self.paused = False
        self._items: deque[Message] = deque()
        self._bytes = 0  # of the payloads held
        self._pause = pause
        self._resume = resume
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: Message) -> None:
        self._items.append(message)
        self._bytes += len(message.payload)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not self.paused and self.limit is not None and (
                len(self._items) >= self.limit or self._bytes >= READ_AHEAD_BYTES):
            self.paused = True
            self._pause()

    def take(self) -> Message | None:
        """The oldest message, ``None`` when there is none."""
        if not self._items:
            return None
        message = self._items.popleft()
        self._bytes -= len(message.payload)
        if self.paused and self.limit is not None and len(self._items) <= self.limit // 2 \
                and self._bytes <= READ_AHEAD_BYTES // 2:
            self.paused = False
            self._resume()
        return message

    async def wait(self, ended: asyncio.Future[Any]) -> bool:
        """Until a message is there (True) or ``ended`` (the link) is done (False)."""
        if self._items:
            return True
        if self._waiter is None or self._waiter.done():  # shared by whoever waits now
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait((self._waiter, ended), return_when=asyncio.FIRST_COMPLETED)
        return bool(self._items)

