"""The uplink: one MQTT connection to the broker, kept up forever, draining the store into it.

This module is the loop only: reconnect with backoff, the drain window, and giving rows
back when a link ends. Its rooms: :mod:`pigateway.mqtt` (the connection, the only importer
of aiomqtt and paho), :mod:`pigateway.wire` (topics and documents),
:mod:`pigateway.credentials` (password, TLS), :mod:`pigateway.intake` (inbound commands,
acked in order), :mod:`pigateway.announcer` (the retained state), :mod:`pigateway.store_calls`
(the drain's store calls, patient with a busy store). The shape follows aiomqtt's own
advice: one outer reconnect loop that catches only the link's error, with the backoff
policy (tenacity) passed in so that tests run it without waiting.

Per connection (a fresh client each time, so paho never replays anything on its own):

- last will ``"offline"`` (a JSON string), retained, on ``{prefix}/{gw}/state``; the
  retained state document while up; ``"offline"`` again on a clean stop;
- with an ``on_command`` hook: a QoS 1 subscription to ``{prefix}/{gw}/commands`` on a
  persistent session, each message acknowledged only after ``on_command`` took it;
- the drain: batches from :class:`~pigateway.batching.Batcher`, at most
  ``uplink.max_inflight`` unacknowledged at a time; a batch's rows are deleted only after
  its PUBACK; an MQTT 5 PUBACK failure code either dead-letters them
  (``rejected-by-broker``: not authorised, bad topic, too large, bad payload) or, for a
  refusal *for now* (quota, rate, busy: :data:`pigateway.mqtt.PUBACK_REFUSALS`), ends the
  connection like a lost link; a failed or timed-out publish ends the connection and every
  row not acknowledged goes back to the head of the queue (``nack``);
- the store: every store call of the drain waits out a busy, locked or full store and
  keeps its rows in memory until the store took them; only a corrupt store ends it.

Batches are never built bigger than the broker takes: MQTT 5 says so in CONNACK (a single
command over it is dead-lettered ``too-large``). Under MQTT 3.1.1 the broker cannot say: it
drops the connection instead, so the next link packs batches half the size
(:class:`PacketLimit`), and a command alone too big ends in ``max-attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import tenacity

from pigateway import wire
from pigateway.aio import first_error, first_of
from pigateway.announcer import Announcer
from pigateway.backoff import wait_backoff
from pigateway.batching import Batch, Batcher, Rules, split
from pigateway.config import Config, UplinkConfig
from pigateway.counters import COUNTERS
from pigateway.credentials import broker_password, tls_context
from pigateway.errors import (
    LinkFault,
    LoginRefused,
    RetainNotSupported,
    UplinkError,
)
from pigateway.intake import INBOUND_WINDOW, Intake, OnCommand
from pigateway.mqtt import (
    Connection,
    Settings,
    Will,
    connect,
    publish_room,
    refusal,
)
from pigateway.pacing import Pacer
from pigateway.state import FaultSource, GatewayState, Link
from pigateway.store import Command, Store
from pigateway.store_calls import StoreCalls
from pigateway.text import plural

log = logging.getLogger(__name__)

REJECTED: Final = "rejected-by-broker"
#: The smallest batch size limit halving goes down to.
MIN_BATCH_BYTES: Final = 512


# --------------------------------------------------------------------------- backoff


def reconnect_policy(config: UplinkConfig) -> tenacity.AsyncRetrying:
    """The default policy: :class:`wait_backoff` from ``[uplink]``, forever; a fault an
    operator must fix (refused login, TLS set-up) waits the cap every time."""
    return tenacity.AsyncRetrying(wait=wait_backoff(config.backoff_initial, config.backoff_max,
                                                    faults=(LinkFault, LoginRefused)))


class LinkLost(UplinkError):
    """A connection that had been up for ``uplink.backoff_reset`` seconds went down.

    The backoff starts over; ``wait`` seconds first (a broker that said "slow down").
    """

    def __init__(self, message: str, *, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


class BrokerBusy(UplinkError):
    """The broker refused a batch for now (quota, rate, busy): the link ends and backs off."""


# --------------------------------------------------------------------------- the uplink

class PacketLimit:
    """Batches no bigger than the broker takes, set on the batcher per connection."""

    def __init__(self, config: Config, batcher: Batcher[Command]) -> None:
        self.config = config
        self.batcher = batcher
        self.halved: int | None = None  # a batch size limit learnt under MQTT 3.1.1

    def adopt(self, client: Connection) -> None:
        """MQTT 5 says the limit in CONNACK; a limit learnt under 3.1.1 packs smaller."""
        hard = self.config.uplink.max_batch_bytes
        if client.max_packet_size:
            room = min(publish_room(client.max_packet_size, wire.topic(self.config, leaf))
                       for leaf in ("actions", "results"))
            hard = max(1, min(hard, room))
        self.batcher.limit(packing=self.halved or sys.maxsize, hard=hard)

    def learn(self, error: UplinkError | None, in_flight: list[int]) -> None:
        """Under MQTT 3.1.1 a broker drops the link on a packet over its limit, silently.

        So when a 3.1.1 link dies with batches in flight (``in_flight``: their sizes), the
        next link sends batches half the size of the largest of them: the commands that fit
        get through, and only one that alone is too big is left to ``store.max_attempts``.
        A stable link forgets it.
        """
        if error is None or isinstance(error, LinkLost) or self.config.mqtt.protocol == "5":
            self.halved = None
            return
        if in_flight:
            half = max(in_flight) // 2
            self.halved = max(MIN_BATCH_BYTES, min(half, self.halved or half))
            log.info("uplink: the link died with batches in flight; next batches at most %d "
                     "bytes (a broker packet limit under MQTT 3.1.1?)", self.halved)


@dataclass
class _Session:
    """What one connection holds: its client, its in-flight slots and its tasks."""

    client: Connection
    slots: asyncio.Semaphore
    tasks: asyncio.TaskGroup


class Uplink:
    """Keeps the broker connection and drains the store into it. Run with :meth:`run`."""

    def __init__(self, config: Config, store: Store, state: GatewayState, *,
                 policy: tenacity.AsyncRetrying | None = None,
                 on_command: OnCommand | None = None) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.on_command = on_command
        up = config.uplink
        self.rules = Rules(config.gateway_id, up.max_actions, up.max_batch_bytes)
        self.batcher: Batcher[Command] = Batcher(store, self.rules, batch_delay=up.batch_delay)
        self.outstanding: dict[str, Batch[Command]] = {}
        #: batches the broker acknowledged whose rows are not deleted yet (a busy store)
        self.delivered: dict[str, Batch[Command]] = {}
        self._policy = (policy or reconnect_policy(up)).copy(
            retry=tenacity.retry_if_exception(_worth_retrying), stop=tenacity.stop_never,
            reraise=True, before_sleep=self._before_sleep)
        self._policy_sleep: Callable[[float], Awaitable[None]] = self._policy.sleep  # type: ignore[assignment]
        self._policy = self._policy.copy(sleep=self._sleep)
        self._retry_now = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()  # set while nothing is in flight
        self._online_since: float | None = None
        self._settled.set()
        self.packet_limit = PacketLimit(config, self.batcher)
        self.store_calls = StoreCalls(state, up)
        self.pacer = Pacer(up.max_messages_per_second, up.max_bytes_per_second)
        self.announcer = Announcer(config, state, self.pacer)
        self.intake = Intake(wire.topic(config, "commands"), on_command)
        #: False once a broker said Retain Available = 0 (a retained will would be refused)
        self._will_retained = True

    @property
    def store_fault_after(self) -> float:
        """Seconds a busy store may refuse the drain before that shows as a fault."""
        return self.store_calls.fault_after

    @store_fault_after.setter
    def store_fault_after(self, seconds: float) -> None:
        self.store_calls.fault_after = seconds

    def state_document(self) -> dict[str, Any]:
        """The retained state document now (:meth:`Announcer.document`)."""
        return self.announcer.document()

    # ---- controls (the app's pause/resume/flush land here)

    def pause(self) -> None:
        """Stop draining (queueing and the link go on); batches in flight finish."""
        self._resumed.clear()
        self.batcher.interrupt()

    def resume(self) -> None:
        self.batcher.proceed()
        self._resumed.set()

    def flush(self) -> None:
        """Send what is pending now, and retry the connection now if it is waiting.

        While paused only the connection is retried: a flush is not kept for later.
        """
        if self._resumed.is_set():
            self.batcher.flush()
        self._retry_now.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming, wait up to ``grace`` for PUBACKs in flight, then end the link.

        Whatever is still unacknowledged is nacked by :meth:`run` as it returns.
        """
        self._stop.set()
        self.batcher.interrupt()
        self._retry_now.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._settled.wait()

    # ---- the reconnect loop

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff forever (until :meth:`stop`)."""
        while not self._stop.is_set():
            try:
                async for attempt in self._policy:
                    with attempt:
                        await self._connect_once()
                return
            except LinkLost as lost:
                if lost.wait:  # the backoff starts over, after the first wait
                    self.state.set_retry_at(time.time() + lost.wait)
                    try:
                        await self._sleep(lost.wait)
                    except _Stopped:
                        return
                continue  # the link had been up a while: the backoff starts over
            except _Stopped:
                return

    async def _connect_once(self) -> None:
        """One connection from CONNECT to its end; every unacknowledged row is nacked after."""
        if self._stop.is_set():
            raise _Stopped
        self.state.set_link(Link.CONNECTING)
        error: UplinkError | None = None
        try:
            await self._connect_and_serve()
        except UplinkError as exc:
            if isinstance(exc, RetainNotSupported):
                self._will_retained = False  # the next CONNECT carries an unretained will
            error = self._typed(exc)
            raise error from exc
        finally:
            self.packet_limit.learn(error, [len(batch.payload)
                                            for batch in self.outstanding.values()])
            try:  # last_error shows the end of the link once its rows are back
                await self._give_back(str(error) if error is not None
                                      else "the link ended before the broker acknowledged")
            finally:
                self._offline(error)

    async def _connect_and_serve(self) -> None:
        self._online_since = None
        async with connect(self._settings(), bound=self.config.uplink.publish_timeout + 5) \
                as client:
            try:
                await self._serve(client)
            except UplinkError as exc:
                if client.slow_down is None or isinstance(exc, BrokerBusy):
                    raise
                raise BrokerBusy(f"the broker disconnected us to slow down: "
                                 f"{client.slow_down}") from exc

    def _typed(self, error: UplinkError) -> UplinkError:
        """The error to retry on; :class:`LinkLost` when the link had been up a while."""
        since = self._online_since
        quiet = since is not None and time.monotonic() - since >= self.config.uplink.backoff_reset
        if isinstance(error, BrokerBusy):
            # the broker asked us to slow down: the backoff grows while it keeps asking, and
            # starts over (after one first wait, never at once) only after a quiet while
            return LinkLost(str(error), wait=self.config.uplink.backoff_initial) if quiet \
                else error
        if quiet:
            return LinkLost(f"link lost: {error}")
        return error

    def _offline(self, error: UplinkError | None) -> None:
        self.state.set_link(Link.OFFLINE)
        self.state.set_progress(in_flight=0, draining=False)
        if error is None:
            return
        self.state.note_error(str(error))
        if isinstance(error, (LinkFault, LoginRefused)):
            self.state.set_fault(FaultSource.LINK, str(error))
            log.error("%s", error)
            return
        self.state.clear_fault(FaultSource.LINK)
        if self._online_since is not None:
            log.warning("uplink: %s", error)

    async def _sleep(self, seconds: float) -> None:
        """The policy's sleep, cut short by :meth:`flush` or :meth:`stop`."""
        self._retry_now.clear()
        await first_of(self._policy_sleep(seconds), self._retry_now.wait())
        if self._stop.is_set():
            raise _Stopped

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        error = retry_state.outcome.exception() if retry_state.outcome else None
        self.state.set_retry_at(time.time() + wait)
        log.info("uplink: %s; retrying in %.1fs (attempt %d)", error, wait,
                 retry_state.attempt_number)

    def _settings(self) -> Settings:
        mqtt = self.config.mqtt
        return Settings(
            mqtt.host, mqtt.port, client_id=self.config.gateway_id, username=mqtt.username,
            password=broker_password(mqtt) if mqtt.username else None,
            protocol="5" if mqtt.protocol == "5" else "3.1.1",
            will=Will(wire.topic(self.config, "state"), wire.OFFLINE,
                      retain=self._will_retained),
            persistent=self.on_command is not None, session_expiry=mqtt.session_expiry,
            keepalive=mqtt.keepalive, timeout=self.config.uplink.publish_timeout,
            tls=tls_context(mqtt.tls), max_inflight=self.config.uplink.max_inflight + 8,
            # commands unacknowledged at once: what intake takes (MQTT 5 brokers honour it)
            receive_maximum=INBOUND_WINDOW)

    # ---- one connection

    def limits_in_force(self, client: Connection) -> dict[str, Any]:
        """What this link may send: the broker's CONNACK limits met with ``[uplink]``.

        Shown in the state document and ``pigateway status`` (``limits``), so that a slow
        drain can be told from a broker that allows two messages in flight.
        """
        broker = client.limits
        return {"max_inflight": min(self.config.uplink.max_inflight, broker.receive_maximum),
                "receive_maximum": broker.receive_maximum, "maximum_qos": broker.maximum_qos,
                "retain_available": broker.retain, "max_packet_size": client.max_packet_size,
                "max_batch_bytes": self.batcher.rules.max_batch_bytes,
                "max_messages_per_second": self.config.uplink.max_messages_per_second or None,
                "max_bytes_per_second": self.config.uplink.max_bytes_per_second or None}

    def _adopt(self, client: Connection) -> dict[str, Any]:
        """Take the broker's CONNACK limits for this link; warn where they cost something."""
        self.packet_limit.adopt(client)
        limits = self.limits_in_force(client)
        if limits["max_inflight"] < self.config.uplink.max_inflight:
            log.info("uplink: the broker's Receive Maximum is %d: at most %d batches in flight "
                     "(uplink.max_inflight = %d)", client.limits.receive_maximum,
                     limits["max_inflight"], self.config.uplink.max_inflight)
        if not client.limits.retain:
            log.warning("uplink: the broker does not take retained messages (Retain "
                        "Available = 0): the state document goes unretained, so a receiver "
                        "that subscribes later sees it only at the next state_interval")
            self._will_retained = False
        if client.limits.maximum_qos < 1:
            log.warning("uplink: the broker allows QoS 0 only: commands go at most once, a "
                        "lost message is not sent again")
        self.state.set_limits(limits)
        return limits

    async def _serve(self, client: Connection) -> None:
        limits = self._adopt(client)
        log.info("uplink: online at %s:%d (session present: %s)", self.config.mqtt.host,
                 self.config.mqtt.port, client.session_present)
        self._online_since = time.monotonic()
        self.state.set_link(Link.ONLINE)
        self.state.clear_fault(FaultSource.LINK)
        COUNTERS.link_up()
        # views learn of a drop at once; handing rows back may wait on a busy disk
        client.when_lost(lambda: self.state.set_link(Link.OFFLINE))
        try:
            async with asyncio.TaskGroup() as tasks:
                session = _Session(client, asyncio.Semaphore(limits["max_inflight"]), tasks)
                if self.on_command is not None:
                    await client.subscribe(wire.topic(self.config, "commands"), qos=1)
                await self.announcer.announce(client)
                watch = tasks.create_task(self.intake.run(client), name="uplink-watch")
                announce = tasks.create_task(self.announcer.keep_announcing(client),
                                             name="uplink-state")
                await self._drain(session)
                await self.announcer.say_offline(client)
                watch.cancel()
                announce.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from group

    async def _drain(self, session: _Session) -> None:
        """Hand batches to publisher tasks, at most ``max_inflight`` unacknowledged."""
        while not self._stop.is_set():
            if not self._resumed.is_set():
                await first_of(self._resumed.wait(), self._stop.wait())
                continue
            await session.slots.acquire()
            try:
                batch = await self.store_calls.call("claim the next batch", self.batcher.next_batch)
            except BaseException:
                session.slots.release()
                raise
            if batch is None:
                session.slots.release()
                continue
            self.outstanding[batch.id] = batch
            self._settled.clear()
            self._show_progress()
            session.tasks.create_task(self._ship(session, batch), name=f"ship-{batch.id}")
        self.state.set_progress(draining=False)

    async def _ship(self, session: _Session, batch: Batch[Command]) -> None:
        """Publish one batch; delete its rows after the PUBACK (or bury them if refused)."""
        try:
            await self._send(session.client, batch)
        except UplinkError as exc:
            raise UplinkError(f"publish of batch {batch.id} failed: {exc}") from exc
        finally:
            session.slots.release()
            self._show_progress()
            if not self.outstanding and not self.delivered:
                self._settled.set()

    async def _send(self, client: Connection, batch: Batch[Command]) -> None:
        """One publish of an outstanding batch (paced) and what its PUBACK says to do."""
        await self.pacer.publish_slot(len(batch.payload))
        forward = batch.forward  # a forwarded message keeps its own topic and properties
        code = await client.deliver(
            wire.topic(self.config, batch.kind) if forward is None else forward.topic,
            batch.payload, timeout=self.config.uplink.publish_timeout,
            extras=None if forward is None else forward.extras)
        if code is None:
            await self._record_delivery(batch)
        else:
            await self._refused(client, batch, code)

    async def _record_delivery(self, batch: Batch[Command]) -> None:
        """Delete the rows of an acknowledged batch, however long the store takes.

        From the PUBACK on the batch is ``delivered``, not ``outstanding``: if the link
        ends while the store is busy, :meth:`_give_back` deletes these rows, never sends
        them again.
        """
        self.delivered[batch.id] = self.outstanding.pop(batch.id)
        await self.store_calls.call("delete delivered commands",
                                    lambda: self.store.ack(batch.ids, batch.id))
        del self.delivered[batch.id]
        COUNTERS.batch_acked(len(batch.ids), len(batch.payload))
        self._log_delivered(batch)

    async def _refused(self, client: Connection, batch: Batch[Command], code: int) -> None:
        """A PUBACK failure code: end the link to send it again later, split the batch to
        find the one command refused for good, or bury that one command."""
        name, verdict = refusal(code)
        COUNTERS.batch_refused(code)
        what = f"PUBACK reason code {code} (0x{code:02X}: {name})"
        if verdict == "retry":
            raise BrokerBusy(f"the broker refused batch {batch.id} for now: {what}; its "
                             "commands go back to the head of the queue")
        if len(batch.commands) > 1:
            await self._split(client, batch, what)
            return
        log.warning("uplink: the broker refused command %s of %s for good: %s", batch.ids[0],
                    batch.commands[0].device, what)
        await self.store_calls.call("dead-letter a refused batch",
                                    lambda: self.store.dead_letter(batch.ids, REJECTED, what))
        del self.outstanding[batch.id]

    async def _split(self, client: Connection, batch: Batch[Command], what: str) -> None:
        """Send a batch refused for good again as halves, one after the other, in order.

        The halves replace the batch in :attr:`outstanding` at once, so a link that ends
        meanwhile gives all their rows back. Halving ends at single commands: only the
        command the broker refuses alone is dead-lettered (at most 2*log2(n) publishes).
        """
        try:
            parts = split(batch, self.batcher.rules, now=time.time())
        except ValueError as exc:  # the link ends and every row goes back: nothing is lost
            raise UplinkError(str(exc)) from exc
        log.info("uplink: the broker refused batch %s of %d commands for good (%s); sending "
                 "it again in %d parts to find the refused command", batch.id,
                 len(batch.commands), what, len(parts))
        del self.outstanding[batch.id]
        self.outstanding.update({part.id: part for part in parts})
        for part in parts:
            await self._send(client, part)

    def _log_delivered(self, batch: Batch[Command]) -> None:
        """One line per acknowledged batch, carrying every command id for the journal.

        ``journalctl -u pigateway COMMAND_ID=...`` finds the batch a command went out in.
        """
        if batch.kind == "forward" and not log.isEnabledFor(logging.DEBUG):
            return  # a device's own message: thousands a second, one line each is too many
        devices = sorted({command.device for command in batch.commands})
        log.log(logging.DEBUG if batch.kind == "forward" else logging.INFO,
                "uplink: batch %s acknowledged by the broker: %s for %s", batch.id,
                plural(len(batch.commands), *BATCH_MEMBERS[batch.kind]), ", ".join(devices[:10])
                + (f" and {len(devices) - 10} more" if len(devices) > 10 else ""),
                extra={"batch_id": batch.id, "command_id": batch.ids, "device": devices,
                       "queue_depth": self.state.depth})

    async def _ack_batch(self, batch: Batch[Command]) -> None:
        await self.store_calls.call("delete delivered commands",
                                    lambda: self.store.ack(batch.ids, batch.id))

    def _show_progress(self) -> None:
        """``in_flight`` and ``draining`` (rows on their way: in flight or claimed) for views."""
        self.state.set_progress(in_flight=len(self.outstanding),
                                draining=bool(self.outstanding or self.delivered
                                              or self.batcher.pending))

    async def _give_back(self, why: str) -> None:
        """Put back every row this link claimed but the broker did not acknowledge.

        Rows that were published count an attempt (``nack``); rows only claimed do not;
        rows the broker acknowledged but the store has not deleted yet are deleted. Each
        write waits out a busy store, and the memory forgets the rows only once the store
        took them: a cancel or an error in between leaves them where the next try finds them.
        """
        sent = [i for batch in self.outstanding.values() for i in batch.ids]
        unsent = [command.id for command in self.batcher.pending]
        for done in list(self.delivered.values()):
            await self._ack_batch(done)
            del self.delivered[done.id]
        if unsent:
            await self.store_calls.call("put claimed commands back",
                                        lambda: self.store.release(unsent))
        if sent:
            await self.store_calls.call("put sent commands back",
                                        lambda: self.store.nack(sent, why))
        self.delivered.clear()
        self.batcher.give_back()
        self.outstanding.clear()
        self._settled.set()
        if sent or unsent:
            log.info("uplink: %s back at the head of the queue (%s)",
                     plural(len(sent) + len(unsent), "command"), why)


#: What a batch of each kind carries, for people: one word per kind, so that "action" keeps
#: its one meaning (a device and its commands, in the wire format) and the journal counts
#: commands, results or messages, never "1 actions".
BATCH_MEMBERS: dict[str, tuple[str, str]] = {
    "actions": ("command", "commands"),
    "results": ("result", "results"),
    "forward": ("forwarded message", "forwarded messages"),
}


def _worth_retrying(exc: BaseException) -> bool:
    """Tenacity retries link errors; :class:`LinkLost` leaves the loop to reset the backoff."""
    return isinstance(exc, UplinkError) and not isinstance(exc, LinkLost)


class _Stopped(Exception):
    """Raised inside the retry loop when :meth:`Uplink.stop` was called."""



