"""The uplink's supervisor: one MQTT connection to the broker, kept up forever.

This module is the loop only: reconnect with backoff, one session per connection, and
giving rows back when a link ends. Its rooms: :mod:`pigateway.uplink.drain` (batches onto the
connection, each device in order, what a refusal or a failed publish costs),
:mod:`pigateway.uplink.inflight` (the in-flight ledger: unacknowledged batches and their devices),
:mod:`pigateway.mqtt` (the connection, the only importer of aiomqtt and paho),
:mod:`pigateway.wire` (topics and documents), :mod:`pigateway.mqtt.credentials` (password, TLS),
:mod:`~pigateway.uplink.intake` (inbound commands, acked in order),
:mod:`~pigateway.uplink.announcer` (the retained state), :mod:`~pigateway.uplink.store_calls`
(the drain's store calls, patient with a busy store). The shape follows aiomqtt's own
advice: one outer reconnect loop that catches only the link's error, with the backoff
policy (tenacity) passed in so that tests run it without waiting.

Per connection (a fresh client each time, so paho never replays anything on its own):

- last will ``"offline"`` (a JSON string), retained, on ``{prefix}/{gw}/state``; the
  retained state document while up; ``"offline"`` again on a clean stop;
- with an ``on_command`` hook: a QoS 1 subscription to ``{prefix}/{gw}/commands`` on a
  persistent session, each message acknowledged only after ``on_command`` took it;
- the drain (:class:`~pigateway.uplink.drain.Drain`): at most ``uplink.max_inflight`` batches
  unacknowledged, a device in at most one of them; a batch's rows are deleted only after
  its PUBACK; a refusal for now, a lost link or a publish timeout ends the connection and
  every row not acknowledged goes back to the head of the queue, an attempt charged only
  to what can have caused it; one message that fails otherwise fails alone;
- the store: every store call of the drain waits out a busy, locked or full store and
  keeps its rows in memory until the store took them; only a corrupt store ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tenacity

from pigateway import wire
from pigateway.aio import first_error, first_of, wait_backoff
from pigateway.config import Config, UplinkConfig
from pigateway.counters import COUNTERS
from pigateway.errors import (
    LinkFault,
    LoginRefused,
    RetainNotSupported,
    UplinkError,
)
from pigateway.mqtt import Connection, Settings, Will, connect, packet_limit
from pigateway.mqtt.credentials import broker_password, tls_context
from pigateway.state import FaultSource, GatewayState, Link
from pigateway.store import Store
from pigateway.uplink.announcer import Announcer
from pigateway.uplink.drain import BATCH_MEMBERS, BrokerBusy, Drain, LinkLost, Session
from pigateway.uplink.intake import INBOUND_WINDOW, Intake, OnCommand
from pigateway.uplink.pacing import Pacer
from pigateway.uplink.store_calls import StoreCalls

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.uplink")

__all__ = ["BATCH_MEMBERS", "BrokerBusy", "LinkLost", "OnCommand", "Uplink", "reconnect_policy"]


# --------------------------------------------------------------------------- backoff


def reconnect_policy(config: UplinkConfig) -> tenacity.AsyncRetrying:
    """The default policy: :class:`wait_backoff` from ``[uplink]``, forever; a fault an
    operator must fix (refused login, TLS set-up) waits the cap every time."""
    return tenacity.AsyncRetrying(wait=wait_backoff(config.backoff_initial, config.backoff_max,
                                                    faults=(LinkFault, LoginRefused)))


class Uplink:
    """Keeps the broker connection and drains the store into it. Run with :meth:`run`."""

    def __init__(self, config: Config, store: Store, state: GatewayState, *,
                 policy: tenacity.AsyncRetrying | None = None,
                 on_command: OnCommand | None = None,
                 on_manage: OnCommand | None = None) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.on_command = on_command
        self.on_manage = on_manage if on_command is not None else None
        up = config.uplink
        self._policy = (policy or reconnect_policy(up)).copy(
            retry=tenacity.retry_if_exception(_worth_retrying), stop=tenacity.stop_never,
            reraise=True, before_sleep=self._before_sleep)
        self._policy_sleep: Callable[[float], Awaitable[None]] = self._policy.sleep  # type: ignore[assignment]
        self._policy = self._policy.copy(sleep=self._sleep)
        self._retry_now = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._stop = asyncio.Event()
        self._online_since: float | None = None
        #: whether this episode offline was said at warning (reset once online again)
        self._said_offline = False
        #: the broker granted this connection's manage subscription and took its state
        #: document (a config-set's proof that the operator still reaches the gateway)
        self.manage_granted = False
        self.store_calls = StoreCalls(state, up)
        self.pacer = Pacer(up.max_messages_per_second, up.max_bytes_per_second)
        self.drain = Drain(config, store, state, store_calls=self.store_calls, pacer=self.pacer,
                           stop=self._stop, resumed=self._resumed)
        self.batcher = self.drain.batcher
        self.ledger = self.drain.ledger
        self.packet_limit = self.drain.packet_limit
        self.announcer = Announcer(config, state, self.pacer)
        self.intake = Intake(wire.topic(config, "commands"), on_command, state,
                             manage=wire.topic(config, "manage"), on_manage=self.on_manage)
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
                await self.ledger.settled.wait()

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
                                            for batch in self.ledger.outstanding.values()])
            try:  # last_error shows the end of the link once its rows are back
                await self.drain.give_back(str(error) if error is not None
                                           else "the link ended before the broker acknowledged",
                                           failed=error is not None)
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
        elif not self._said_offline:  # never online since the start or the last drop
            mqtt = self.config.mqtt
            log.warning("uplink: cannot reach the broker %s:%d: %s; commands wait on disk, "
                        "retrying (`pigateway status` shows when)", mqtt.host, mqtt.port, error)
        self._said_offline = True

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
            receive_maximum=INBOUND_WINDOW,
            # what inbound takes of a command (a bigger one is answered 'rejected'), with margin
            max_packet_size=packet_limit(self.config.inbound.max_payload_bytes))

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

    def _lost(self) -> None:
        self.manage_granted = False
        self.state.set_link(Link.OFFLINE)

    async def _serve(self, client: Connection) -> None:
        self.manage_granted = False
        limits = self._adopt(client)
        log.info("uplink: online at %s:%d (session present: %s)", self.config.mqtt.host,
                 self.config.mqtt.port, client.session_present)
        self._online_since = time.monotonic()
        self._said_offline = False
        self.state.set_link(Link.ONLINE)
        self.state.clear_fault(FaultSource.LINK)
        COUNTERS.link_up()
        # views learn of a drop at once; handing rows back may wait on a busy disk
        client.when_lost(self._lost)
        try:
            async with asyncio.TaskGroup() as tasks:
                session = Session(client, asyncio.Semaphore(limits["max_inflight"]), tasks,
                                  window=limits["max_inflight"])
                if self.on_command is not None:
                    await client.subscribe(wire.topic(self.config, "commands"), qos=1)
                granted = False
                if self.on_manage is not None:
                    topic = wire.topic(self.config, "manage")
                    granted = await client.subscribe(topic, qos=1)
                    if not granted:
                        log.warning("uplink: the broker refused the subscription to %s: "
                                    "no manage command reaches this gateway (its ACL)", topic)
                # the operator's way in and out: manage heard, our topics taken
                self.manage_granted = await self.announcer.announce(client) and granted
                watch = tasks.create_task(self.intake.run(client), name="uplink-watch")
                announce = tasks.create_task(self.announcer.keep_announcing(client),
                                             name="uplink-state")
                await self.drain.run(session)
                await self.announcer.say_offline(client)
                watch.cancel()
                announce.cancel()
        except BaseExceptionGroup as group:
            raise first_error(group) from group


def _worth_retrying(exc: BaseException) -> bool:
    """Tenacity retries link errors; :class:`LinkLost` leaves the loop to reset the backoff."""
    return isinstance(exc, UplinkError) and not isinstance(exc, LinkLost)


class _Stopped(Exception):
    """Raised inside the retry loop when :meth:`Uplink.stop` was called."""



