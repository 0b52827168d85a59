"""Inbound commands off the uplink's connection: taken in a window, acknowledged in order.

The uplink subscribes (QoS 1, persistent session) and hands its connection to
:meth:`Intake.run`. Up to :data:`INBOUND_WINDOW` commands are taken at once, so their inbox
writes share one commit; each is acknowledged (manual ack) only after ``on_command``
returned, and in the order received (MQTT wants PUBACKs in order), so a crash before that
gets it delivered again. A store that refuses (busy, under ``store.min_free_bytes``) is one
episode however many messages wait and however often each is tried: one warning when it
begins, saying what the uplink does meanwhile, one info line when it ends (the state's
refusal episodes, as ingest's). A message on any other topic (an old subscription the persistent
session kept, e.g. after a ``topic_prefix`` change) is acknowledged and logged, never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from pigateway.aio import wait_backoff
from pigateway.errors import PigatewayError, StoreCorrupt, StoreError, UplinkError
from pigateway.mqtt import Connection, Message
from pigateway.mqtt.topics import topic_matches
from pigateway.state import GatewayState, Refusal, Refuser
from pigateway.text import bounded, plural

#: the uplink's own lines in the journal (``SYSLOG_IDENTIFIER`` and logger stay the same)
log = logging.getLogger("pigateway.uplink")

OnCommand = Callable[[bytes], Awaitable[None]]
#: An inbound message and the task taking it, in the order received (acked in that order).
Taken = tuple["asyncio.Task[PigatewayError | None]", Message]

#: Inbound commands taken at once (acknowledged in order as each is persisted).
INBOUND_WINDOW: Final = 64
#: Backoff while the store cannot take an inbound command (it stays unacknowledged).
TAKE_BACKOFF: Final = wait_backoff(0.5, 30.0, jitter=0.0)
#: Topics of stray messages logged (and unsubscribed) per connection at most.
MAX_STRAY_TOPICS: Final = 100
#: Tries of an inbound command whose ``on_command`` fails with a bug before it is dropped.
TAKE_TRIES: Final = 3


class Intake:
    """Takes the commands arriving on ``commands`` (a topic) with ``on_command``."""

    def __init__(self, commands: str, on_command: OnCommand | None, state: GatewayState, *,
                 manage: str | None = None, on_manage: OnCommand | None = None) -> None:
        self.commands = commands
        self.on_command = on_command
        self.state = state
        #: this refusal episode: the messages waiting in it now, when it began, the tries
        #: the store refused (``refused_since`` is None between episodes)
        self._waiting = 0
        self._refused_since: float | None = None
        self._refused_tries = 0
        #: the gateway's own commands (:mod:`pigateway.manage`), taken the same way
        self.manage = manage
        self.on_manage = on_manage

    async def run(self, client: Connection) -> None:
        """Until the link drops (then :class:`UplinkError`): this is also how the uplink
        notices a dropped link, so it runs without ``on_command`` too (reading nothing)."""
        strays: set[str] = set()
        async with asyncio.TaskGroup() as group:
            taken: asyncio.Queue[Taken] = asyncio.Queue(INBOUND_WINDOW)
            group.create_task(self._ack_in_order(client, taken), name="uplink-acks")
            async for message in client.messages():
                if self.on_command is None:
                    continue
                if topic_matches(self.commands, message.topic):
                    take = group.create_task(self._take(self.on_command, message.payload))
                elif (self.on_manage is not None and self.manage is not None
                      and message.topic == self.manage):
                    take = group.create_task(self._take(self.on_manage, message.payload))
                else:
                    take = group.create_task(self._ignore(client, message.topic, strays))
                await taken.put((take, message))

    async def _take(self, on_command: OnCommand, payload: bytes) -> PigatewayError | None:
        """Run ``on_command`` until it takes the message; only a fault of the whole store is
        handed to the acker (which ends the link, so the broker sends the message again).

        A store error (busy, locked, under ``store.min_free_bytes``) is waited out here with
        capped backoff: the message stays unacknowledged and the link and the drain go on. Any
        other exception is a bug of ``on_command``, this message's failure: tried
        :data:`TAKE_TRIES` times, then logged and acknowledged (dropped), so one message can
        never end the service.
        """
        tries = failures = 0
        waiting = False
        try:
            while True:
                tries += 1
                delay = TAKE_BACKOFF.delay(tries)
                try:
                    await on_command(payload)
                except StoreCorrupt as exc:
                    return exc
                except StoreError as exc:
                    if not waiting:
                        waiting = True
                        self._waiting += 1
                    self._refused(exc)
                except Exception as exc:
                    failures += 1
                    if failures >= TAKE_TRIES:
                        log.error("uplink: an inbound command failed %d times and is dropped: "
                                  "%s: %s", failures, type(exc).__name__, bounded(exc),
                                  exc_info=exc)
                        return None
                else:
                    if waiting:
                        waiting = False
                        self._waiting -= 1
                    self._taken()
                    return None
                await asyncio.sleep(delay)
        finally:  # cancelled with the link: it waits no more (the episode goes on)
            if waiting:
                self._waiting -= 1

    def _refused(self, error: StoreError) -> None:
        """Said once per episode, by the state (at warning), with what the uplink does
        meanwhile; each retry only counted."""
        note = ""
        if self._refused_since is None:
            self._refused_since, self._refused_tries = time.monotonic(), 0
            note = ("the cloud's commands stay unacknowledged at the broker, which keeps "
                    "them; each is tried again with backoff up to "
                    f"{TAKE_BACKOFF.maximum:.0f}s, the link and the drain go on")
        self._refused_tries += 1
        self.state.set_refusing(Refuser.INBOUND, Refusal.of(error), str(error), note=note)

    def _taken(self) -> None:
        """A command was taken: the episode ends once no other waits (said at info)."""
        if self._refused_since is None or self._waiting:
            return
        self.state.clear_refusing(Refuser.INBOUND, summary=(
            f"refused {plural(self._refused_tries, 'time')} over "
            f"{time.monotonic() - self._refused_since:.1f}s; the broker kept the commands "
            "meanwhile"))
        self._refused_since = None

    async def _ignore(self, client: Connection, where: str, strays: set[str]) -> None:
        """A message on a topic that is not our commands topic: acknowledged, never run.

        The first one per topic is logged and the topic unsubscribed, which ends an old
        exact subscription the persistent session kept (a wildcard one stays: its messages
        are acknowledged and dropped, one log line per connection and topic).
        """
        if where in strays or len(strays) >= MAX_STRAY_TOPICS:
            return
        strays.add(where)
        log.warning("uplink: ignored a message on %s (commands come on %s only; an old "
                    "subscription of the persistent session?); unsubscribing from it",
                    bounded(where, 200), self.commands)
        with contextlib.suppress(UplinkError):  # a broken link ends the watch anyway
            await client.unsubscribe(where, timeout=5.0)

    @staticmethod
    async def _ack_in_order(client: Connection, taken: asyncio.Queue[Taken]) -> None:
        while True:
            take, message = await taken.get()
            failure = await take
            if failure is not None:
                raise UplinkError(f"an inbound command could not be taken ({failure}); it "
                                  "stays unacknowledged and the broker sends it again") \
                    from failure
            client.ack(message)
