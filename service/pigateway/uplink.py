"""The uplink: one MQTT connection to the broker, kept up forever, draining the store into it.

The connection itself is :mod:`pigateway.mqtt` (the only importer of aiomqtt and paho), the
documents and topics are :mod:`pigateway.wire`. The shape follows aiomqtt's own advice: one
outer reconnect loop that catches only the MQTT error, with the backoff policy (tenacity)
passed in so that tests run it without waiting.

Per connection (a fresh client each time, so paho never replays anything on its own):

- last will ``"offline"`` (a JSON string), retained, on ``{prefix}/{gw}/state``; a retained
  JSON state document there on connect and every ``uplink.state_interval``; ``"offline"``
  again, published by us, on a clean stop (a clean DISCONNECT does not fire the will);
- with an ``on_command`` hook: a QoS 1 subscription to ``{prefix}/{gw}/commands`` on a
  persistent session; each message is acknowledged (paho's manual ack) only after
  ``await on_command(payload)`` returned, so a crash before that gets it delivered again;
- the drain: batches from :class:`~pigateway.batching.Batcher`, at most
  ``uplink.max_inflight`` unacknowledged at a time; a batch's rows are deleted only after
  its PUBACK; an MQTT 5 PUBACK failure code either dead-letters them
  (``rejected-by-broker``: not authorised, bad topic, too large, bad payload) or, for a
  refusal *for now* (quota, rate, busy: :data:`PUBACK_REFUSALS`), ends the connection like
  a lost link; a failed or timed-out publish ends the connection and every row
  not acknowledged goes back to the head of the queue (``nack``);
- the store: every store call of the drain (claim, ack, nack, release, dead letter) waits
  out a busy, locked or full store with the link's backoff (:meth:`Uplink._with_store`)
  and keeps its rows in memory until the store took them; only a corrupt store ends it.

:mod:`pigateway.mqtt` keeps two facts aiomqtt 2.5 drops: the reason code of each PUBACK,
and the broker's Maximum Packet Size from CONNACK (a batch is never built bigger, so
a broker with a small ``max_packet_size`` gets smaller batches, and a single command over it
is dead-lettered ``too-large``). Under MQTT 3.1.1 the broker cannot say either: it drops the
connection instead, and such a batch ends in ``max-attempts`` after ``store.max_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import tenacity

from pigateway import __version__, wire
from pigateway.aio import first_error, first_of
from pigateway.backoff import wait_backoff
from pigateway.batching import Batch, Batcher, Rules
from pigateway.config import Config, UplinkConfig
from pigateway.credentials import broker_password, tls_context
from pigateway.errors import (
    LinkFault,
    LoginRefused,
    PigatewayError,
    StoreCorrupt,
    StoreError,
    UplinkError,
)
from pigateway.metrics import COUNTERS
from pigateway.mqtt import (
    Connection,
    Message,
    Settings,
    Will,
    connect,
    describe,
    publish_room,
    refusal,
)
from pigateway.state import FaultSource, GatewayState, Link
from pigateway.store import Command, Store
from pigateway.text import bounded

log = logging.getLogger(__name__)

REJECTED: Final = "rejected-by-broker"
#: Inbound commands taken at once (acknowledged in order as each is persisted).
INBOUND_WINDOW: Final = 64
#: Backoff while the store cannot take an inbound command (it stays unacknowledged).
TAKE_BACKOFF: Final = wait_backoff(0.5, 30.0, jitter=0.0)
#: Topics of stray messages logged (and unsubscribed) per connection at most.
MAX_STRAY_TOPICS: Final = 100
#: Tries of an inbound command whose ``on_command`` fails with a bug before it is dropped.
TAKE_TRIES: Final = 3
#: How a fault starts when the store has refused the drain's calls for too long.
STORE_STUCK: Final = "store: the drain cannot"
#: Seconds a store may stay busy, locked or full before that shows as a fault (an operator
#: should look: a purge or a backup holding the lock, a full disk), while still retried.
STORE_FAULT_AFTER: Final = 60.0
#: The smallest batch size limit halving goes down to.
MIN_BATCH_BYTES: Final = 512


def store_is_gone(exc: StoreError) -> bool:
    """Whether a store error means the store is gone (corrupt), not merely busy for now.

    Busy, locked and full stores heal by themselves (another process lets go, space is
    freed): the service waits them out. A corrupt file only heals by a restart, which moves
    it aside; that one ends the service, shown as a fault first.
    """
    return isinstance(exc, StoreCorrupt)


T = TypeVar("T")


# --------------------------------------------------------------------------- backoff


def reconnect_policy(config: UplinkConfig) -> tenacity.AsyncRetrying:
    """The default policy: :class:`wait_backoff` from ``[uplink]``, forever; a fault an
    operator must fix (refused login, TLS set-up) waits the cap every time."""
    return tenacity.AsyncRetrying(wait=wait_backoff(config.backoff_initial, config.backoff_max,
                                                    faults=(LinkFault, LoginRefused)))


class LinkLost(UplinkError):
    """A connection that had been up for ``uplink.backoff_reset`` seconds went down."""


class BrokerBusy(UplinkError):
    """The broker refused a batch for now (quota, rate, busy): the link ends and backs off."""


# --------------------------------------------------------------------------- the uplink

OnCommand = Callable[[bytes], Awaitable[None]]
#: An inbound message and the task taking it, in the order received (acked in that order).
Taken = tuple["asyncio.Task[PigatewayError | None]", Message]


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
        self._halved: int | None = None  # a batch size limit learnt under MQTT 3.1.1
        self.store_fault_after = STORE_FAULT_AFTER
        self._settled.set()

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
            except LinkLost:
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
            error = self._typed(exc)
            raise error from exc
        finally:
            self._learn_from(error)
            try:  # last_error shows the end of the link once its rows are back
                await self._give_back(str(error) if error is not None
                                      else "the link ended before the broker acknowledged")
            finally:
                self._offline(error)

    async def _connect_and_serve(self) -> None:
        self._online_since = None
        async with connect(self._settings(), bound=self.config.uplink.publish_timeout + 5) \
                as client:
            await self._serve(client)

    def _typed(self, error: UplinkError) -> UplinkError:
        """The error to retry on; :class:`LinkLost` when the link had been up a while."""
        if isinstance(error, BrokerBusy):
            return error  # the broker asked us to slow down: back off, never start over
        since = self._online_since
        if since is not None and time.monotonic() - since >= self.config.uplink.backoff_reset:
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
            will=Will(wire.topic(self.config, "state"), wire.OFFLINE),
            persistent=self.on_command is not None, session_expiry=mqtt.session_expiry,
            keepalive=mqtt.keepalive, timeout=self.config.uplink.publish_timeout,
            tls=tls_context(mqtt.tls), max_inflight=self.config.uplink.max_inflight + 8)

    # ---- one connection

    async def _serve(self, client: Connection) -> None:
        self._adopt_packet_limit(client)
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
                session = _Session(client, asyncio.Semaphore(self.config.uplink.max_inflight),
                                   tasks)
                if self.on_command is not None:
                    await client.subscribe(wire.topic(self.config, "commands"), qos=1)
                await self._announce(client)
                watch = tasks.create_task(self._watch(client), name="uplink-watch")
                announce = tasks.create_task(self._keep_announcing(client), name="uplink-state")
                await self._drain(session)
                await self._finish(client)
                watch.cancel()
                announce.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from group

    def _adopt_packet_limit(self, client: Connection) -> None:
        """Batches no bigger than the broker takes (MQTT 5 says; 3.1.1 is learnt by halving)."""
        hard = self.config.uplink.max_batch_bytes
        if client.max_packet_size:
            room = min(publish_room(client.max_packet_size, wire.topic(self.config, leaf))
                       for leaf in ("actions", "results"))
            hard = max(1, min(hard, room))
        self.batcher.limit(packing=self._halved or sys.maxsize, hard=hard)

    def _learn_from(self, error: UplinkError | None) -> None:
        """Under MQTT 3.1.1 a broker drops the link on a packet over its limit, silently.

        So when a 3.1.1 link dies with batches in flight, the next link sends batches half
        the size of the largest of them: the commands that fit get through, and only one
        that alone is too big is left to ``store.max_attempts``. A stable link forgets it.
        """
        if error is None or isinstance(error, LinkLost) or self.config.mqtt.protocol == "5":
            self._halved = None
            return
        sizes = [len(batch.payload) for batch in self.outstanding.values()]
        if sizes:
            half = max(sizes) // 2
            self._halved = max(MIN_BATCH_BYTES, min(half, self._halved or half))
            log.info("uplink: the link died with batches in flight; next batches at most %d "
                     "bytes (a broker packet limit under MQTT 3.1.1?)", self._halved)

    async def _drain(self, session: _Session) -> None:
        """Hand batches to publisher tasks, at most ``max_inflight`` unacknowledged."""
        while not self._stop.is_set():
            if not self._resumed.is_set():
                await first_of(self._resumed.wait(), self._stop.wait())
                continue
            await session.slots.acquire()
            try:
                batch = await self._with_store("claim the next batch", self.batcher.next_batch)
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
            code = await session.client.deliver(
                wire.topic(self.config, batch.kind), batch.payload,
                timeout=self.config.uplink.publish_timeout)
            if code is None:
                await self._record_delivery(batch)
            else:
                await self._refused(batch, code)
        except UplinkError as exc:
            raise UplinkError(f"publish of batch {batch.id} failed: {exc}") from exc
        finally:
            session.slots.release()
            self._show_progress()
            if not self.outstanding and not self.delivered:
                self._settled.set()

    async def _record_delivery(self, batch: Batch[Command]) -> None:
        """Delete the rows of an acknowledged batch, however long the store takes.

        From the PUBACK on the batch is ``delivered``, not ``outstanding``: if the link
        ends while the store is busy, :meth:`_give_back` deletes these rows, never sends
        them again.
        """
        self.delivered[batch.id] = self.outstanding.pop(batch.id)
        await self._with_store("delete delivered commands", lambda: self.store.ack(batch.ids))
        del self.delivered[batch.id]
        COUNTERS.batch_acked(len(batch.ids), len(batch.payload))
        self._log_delivered(batch)

    async def _refused(self, batch: Batch[Command], code: int) -> None:
        """A PUBACK failure code: bury the batch, or end the link to send it again later."""
        name, verdict = refusal(code)
        COUNTERS.batch_refused(code)
        what = f"PUBACK reason code {code} (0x{code:02X}: {name})"
        if verdict == "retry":
            raise BrokerBusy(f"the broker refused batch {batch.id} for now: {what}; its "
                             "commands go back to the head of the queue")
        await self._with_store("dead-letter a refused batch",
                               lambda: self.store.dead_letter(batch.ids, REJECTED, what))
        del self.outstanding[batch.id]

    async def _with_store(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` until the store takes it: a busy, locked or full store is waited
        out with the link's backoff, said once as a warning and in ``last_error``, and as a
        fault once it lasted :attr:`store_fault_after` seconds (cleared when it answers).

        Only a store that is gone (:func:`store_is_gone`) ends the drain, and with it the
        service (systemd restarts it, which moves a corrupt file aside); it is shown as a
        fault first (LEDs, ``STATUS=``).
        """
        failures = 0
        since = time.monotonic()
        while True:
            try:
                result = await call()
            except StoreError as exc:
                if store_is_gone(exc):
                    self.state.set_fault(FaultSource.DRAIN, f"store: {exc}")
                    self.state.note_error(str(exc))
                    log.critical("uplink: cannot %s: %s", what, exc)
                    raise
                failures += 1
                self._store_trouble(what, exc, failures, time.monotonic() - since)
                await asyncio.sleep(self._store_wait(failures))
                continue
            if failures:
                log.warning("uplink: the store answers again (%s after %d tries)", what,
                            failures + 1)
                self.state.clear_fault(FaultSource.DRAIN)
            return result

    def _store_trouble(self, what: str, exc: StoreError, failures: int,
                       lasted: float) -> None:
        """Say it once per streak as a warning (and in ``last_error``); then at debug; and
        as a fault once it lasted :attr:`store_fault_after` (unless another fault shows)."""
        self.state.note_error(f"store: cannot {what}: {exc}")
        level = logging.WARNING if failures == 1 else logging.DEBUG
        log.log(level, "uplink: cannot %s (%s); the drain waits and tries again, nothing "
                "is lost", what, exc)
        if lasted >= self.store_fault_after and self.state.fault_of(FaultSource.DRAIN) is None:
            self.state.set_fault(FaultSource.DRAIN,
                                 f"{STORE_STUCK} {what} for {lasted:.0f}s: {exc}")
            log.error("uplink: the store has refused to %s for %.0fs (%s): another process "
                      "holding its lock, or a full disk?", what, lasted, exc)

    def _store_wait(self, failures: int) -> float:
        """The link's backoff (``backoff_initial`` doubling up to ``backoff_max``), jittered."""
        up = self.config.uplink
        return wait_backoff(up.backoff_initial, up.backoff_max).delay(failures)

    def _log_delivered(self, batch: Batch[Command]) -> None:
        """One line per acknowledged batch, carrying every command id for the journal.

        ``journalctl -u pigateway COMMAND_ID=...`` finds the batch a command went out in.
        """
        devices = sorted({command.device for command in batch.commands})
        log.info("uplink: batch %s acknowledged by the broker: %d %s for %s", batch.id,
                 len(batch.commands), batch.kind, ", ".join(devices[:10])
                 + (f" and {len(devices) - 10} more" if len(devices) > 10 else ""),
                 extra={"batch_id": batch.id, "command_id": batch.ids, "device": devices,
                        "queue_depth": self.state.depth})

    def _show_progress(self) -> None:
        """``in_flight`` and ``draining`` (rows on their way: in flight or claimed) for views."""
        self.state.set_progress(in_flight=len(self.outstanding),
                                draining=bool(self.outstanding or self.delivered
                                              or self.batcher.pending))

    async def _watch(self, client: Connection) -> None:
        """Inbound commands; also how a dropped link is noticed (the iterator raises).

        Up to :data:`INBOUND_WINDOW` commands are taken at once, so their inbox writes share
        one commit; each is acknowledged only after its ``on_command`` returned, and in the
        order received (MQTT wants PUBACKs in order). A message on any other topic (an old
        subscription the persistent session kept, e.g. after a ``topic_prefix`` change) is
        acknowledged and logged, never run.
        """
        commands = wire.topic(self.config, "commands")
        strays: set[str] = set()
        async with asyncio.TaskGroup() as group:
            taken: asyncio.Queue[Taken] = asyncio.Queue(INBOUND_WINDOW)
            group.create_task(self._ack_in_order(client, taken), name="uplink-acks")
            async for message in client.messages():
                if self.on_command is None:
                    continue
                if message.topic == commands:
                    take = group.create_task(self._take(self.on_command, message.payload))
                else:
                    take = group.create_task(self._ignore(client, message.topic, commands,
                                                          strays))
                await taken.put((take, message))

    @staticmethod
    async def _take(on_command: OnCommand, payload: bytes) -> PigatewayError | None:
        """Run ``on_command`` until it takes the message; only a fault of the whole store is
        handed to the acker (which ends the link, so the broker sends the message again).

        A store error (busy, locked, under ``store.min_free_bytes``) is waited out here with
        capped backoff: the message stays unacknowledged and the link and the drain go on. Any
        other exception is a bug of ``on_command``, this message's failure: tried
        :data:`TAKE_TRIES` times, then logged and acknowledged (dropped), so one message can
        never end the service.
        """
        tries = failures = 0
        while True:
            tries += 1
            delay = TAKE_BACKOFF.delay(tries)
            try:
                await on_command(payload)
                return None
            except StoreCorrupt as exc:
                return exc
            except StoreError as exc:
                log.warning("uplink: the store cannot take an inbound command now (%s); it stays "
                            "unacknowledged, trying again in %.1fs", exc, delay)
            except Exception as exc:
                failures += 1
                if failures >= TAKE_TRIES:
                    log.error("uplink: an inbound command failed %d times and is dropped: %s: %s",
                              failures, type(exc).__name__, bounded(exc), exc_info=exc)
                    return None
            await asyncio.sleep(delay)

    @staticmethod
    async def _ignore(client: Connection, where: str, commands: str, strays: set[str]) -> None:
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
                    bounded(where, 200), commands)
        with contextlib.suppress(UplinkError):  # a broken link ends the watch anyway
            await client.unsubscribe(where, timeout=5.0)

    async def _ack_in_order(self, client: Connection, taken: asyncio.Queue[Taken]) -> None:
        while True:
            take, message = await taken.get()
            failure = await take
            if failure is not None:
                raise UplinkError(f"an inbound command could not be taken ({failure}); it "
                                  "stays unacknowledged and the broker sends it again") \
                    from failure
            client.ack(message)

    async def _keep_announcing(self, client: Connection) -> None:
        while True:
            await asyncio.sleep(self.config.uplink.state_interval)
            await self._announce(client)

    async def _announce(self, client: Connection) -> None:
        """The retained state document (what every view shows, from the one state object)."""
        await self._publish(client, wire.topic(self.config, "state"),
                            wire.encode(self.state_document()).encode(), retain=True)

    def state_document(self) -> dict[str, Any]:
        """The retained state now (:func:`pigateway.wire.state_document`); its counters are
        what ``pigateway_*_total`` show (since start)."""
        return wire.state_document(self.config.gateway_id, __version__, self.state.as_dict(),
                                   COUNTERS.as_dict(), time.time())

    async def _publish(self, client: Connection, where: str, payload: bytes, *,
                       retain: bool = False) -> None:
        code = await client.deliver(where, payload, retain=retain,
                                    timeout=self.config.uplink.publish_timeout)
        if code is not None:
            log.warning("uplink: the broker refused a message on %s: %s", where, describe(code))

    async def _finish(self, client: Connection) -> None:
        """A clean stop: say "offline" ourselves (a clean DISCONNECT sends no will)."""
        with contextlib.suppress(UplinkError):
            await self._publish(client, wire.topic(self.config, "state"), wire.OFFLINE,
                                retain=True)

    async def _give_back(self, why: str) -> None:
        """Put back every row this link claimed but the broker did not acknowledge.

        Rows that were published count an attempt (``nack``); rows only claimed do not;
        rows the broker acknowledged but the store has not deleted yet are deleted. Each
        write waits out a busy store, and the memory forgets the rows only once the store
        took them: a cancel or an error in between leaves them where the next try finds them.
        """
        delivered = [i for batch in self.delivered.values() for i in batch.ids]
        sent = [i for batch in self.outstanding.values() for i in batch.ids]
        unsent = [command.id for command in self.batcher.pending]
        if delivered:
            await self._with_store("delete delivered commands",
                                   lambda: self.store.ack(delivered))
        if unsent:
            await self._with_store("put claimed commands back",
                                   lambda: self.store.release(unsent))
        if sent:
            await self._with_store("put sent commands back",
                                   lambda: self.store.nack(sent, why))
        self.delivered.clear()
        self.batcher.give_back()
        self.outstanding.clear()
        self._settled.set()
        if sent or unsent:
            log.info("uplink: %d command(s) back at the head of the queue (%s)",
                     len(sent) + len(unsent), why)


def _worth_retrying(exc: BaseException) -> bool:
    """Tenacity retries link errors; :class:`LinkLost` leaves the loop to reset the backoff."""
    return isinstance(exc, UplinkError) and not isinstance(exc, LinkLost)


class _Stopped(Exception):
    """Raised inside the retry loop when :meth:`Uplink.stop` was called."""



