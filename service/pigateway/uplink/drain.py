"""The drain: batches from the store onto one connection, each device in order, and back.

Per connection (:meth:`Drain.run`), batches from :class:`~pigateway.uplink.batching.Batcher`,
at most ``uplink.max_inflight`` unacknowledged, each shipped by a task of its own; a
batch's rows are deleted only after its PUBACK. What keeps each device's commands in the
order they were put, with several batches in flight, is the in-flight ledger
(:class:`~pigateway.uplink.inflight.InFlight`): a device is in at most one unacknowledged batch,
so its next batch is built only once the broker took (or refused for good) the one before,
whatever happens to that one on the way (pacing, a refusal, a split, a reconnect).

What one batch's publish can end in, and what it costs:

- PUBACK: delivered, the rows are deleted;
- an MQTT 5 failure code *for good* (:data:`pigateway.mqtt.PUBACK_REFUSALS`): split down
  to the refused command, which alone is dead-lettered ``rejected-by-broker``;
- a failure code *for now* (quota, rate, busy): the link ends (:class:`BrokerBusy`), this
  batch alone charged an attempt;
- a PUBLISH over the broker's Maximum Packet Size or MQTT's limits, found by the one check
  before anything is written (:func:`pigateway.mqtt.check_publish`): split, or the one
  command dead-lettered ``too-large`` naming the limit; the link goes on;
- any other error of the publish: this batch alone is charged an attempt and goes again
  first (``max-attempts`` ends it); the link goes on;
- the link drops, or no PUBACK in time: every row goes back to the head of the queue, an
  attempt charged only to what can have caused it (:meth:`InFlight.culprits`).

Batches are never built bigger than the broker takes (:class:`PacketLimit`). Under MQTT
3.1.1 the broker cannot say: it drops the connection instead, so the next link packs
batches half the size, and a command alone too big ends in ``max-attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pigateway import wire
from pigateway.aio import first_of
from pigateway.config import Config
from pigateway.counters import COUNTERS
from pigateway.errors import PacketTooLarge, UplinkError
from pigateway.mqtt import Connection, publish_room, refusal
from pigateway.state import GatewayState
from pigateway.store import Command, Store
from pigateway.text import bounded, plural
from pigateway.uplink.batching import (
    REASON_TOO_LARGE,
    REJECTED,
    Batch,
    Batcher,
    Rules,
    split,
    train_parts,
)
from pigateway.uplink.inflight import InFlight
from pigateway.uplink.pacing import Pacer
from pigateway.uplink.store_calls import StoreCalls
from pigateway.uplink.train import ship_train

#: the uplink's own lines in the journal
log = logging.getLogger("pigateway.uplink")

#: What a batch of each kind carries, for people: one word per kind, so that "action" keeps
#: its one meaning (a device and its commands, in the wire format) and the journal counts
#: commands, results or messages, never "1 actions".
BATCH_MEMBERS: dict[str, tuple[str, str]] = {
    "actions": ("command", "commands"),
    "results": ("result", "results"),
    "forward": ("forwarded message", "forwarded messages"),
}
#: The smallest batch size limit halving goes down to.
MIN_BATCH_BYTES: Final = 512


class BrokerBusy(UplinkError):
    """The broker refused a batch for now (quota, rate, busy): the link ends and backs off."""


class LinkLost(UplinkError):
    """A connection that had been up for ``uplink.backoff_reset`` seconds went down.

    The backoff starts over; ``wait`` seconds first (a broker that said "slow down").
    """

    def __init__(self, message: str, *, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


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
class Session:
    """What one connection holds: its client, its in-flight slots and its tasks."""

    client: Connection
    slots: asyncio.Semaphore
    tasks: asyncio.TaskGroup
    #: the slots there are (``uplink.max_inflight`` met with the broker's Receive Maximum)
    window: int = 1


class Drain:
    """Drains the store into one connection at a time (:meth:`run`); :meth:`give_back` after."""

    def __init__(self, config: Config, store: Store, state: GatewayState, *,
                 store_calls: StoreCalls, pacer: Pacer, stop: asyncio.Event,
                 resumed: asyncio.Event) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.store_calls = store_calls
        self.pacer = pacer
        self._stop = stop
        self._resumed = resumed
        up = config.uplink
        self.ledger: InFlight[Command] = InFlight()
        self.batcher: Batcher[Command] = Batcher(
            store, Rules(config.gateway_id, up.max_actions, up.max_batch_bytes),
            batch_delay=up.batch_delay, gate=self.ledger)
        self.packet_limit = PacketLimit(config, self.batcher)

    async def run(self, session: Session) -> None:
        """Hand batches to publisher tasks, at most ``max_inflight`` unacknowledged."""
        self.ledger.slots = session.window
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
            try:
                self.ledger.add(batch)
            except UplinkError:
                self.batcher.put_back(batch.commands)  # still claimed: given back at the end
                session.slots.release()
                raise
            parts = train_parts(batch) if batch.train else None
            if parts:  # its messages are in flight one by one, its topic held by the train
                self.ledger.replace(batch, parts)
            self.show_progress()
            session.tasks.create_task(self._ship(session, batch, parts), name=f"ship-{batch.id}")
        self.state.set_progress(draining=False)

    async def _ship(self, session: Session, batch: Batch[Command],
                    parts: list[Batch[Command]] | None = None) -> None:
        """Publish one batch; delete its rows after the PUBACK (or bury them if refused).
        A train (``parts``: its messages) goes as :func:`~pigateway.uplink.train.ship_train`
        says, each message holding a slot of its own until its PUBACK.

        Its slot is given back at the PUBACK, not after the delete: a slot is a batch the
        broker has not acknowledged (``uplink.max_inflight``), and holding it through the
        delete's commit (an fsync: 5-20 ms on an SD card) held each forwarded message's
        slot three times as long as its round trip, which bounded the forward rate at
        ``max_inflight`` per commit. The batches delivered and not yet deleted are bounded
        by the rows claimed ahead (the claims commit with the same writer as the deletes).
        """
        slot = [True]

        def give_slot() -> None:
            if slot[0]:
                slot[0] = False
                session.slots.release()

        try:
            if parts:
                busy = await ship_train(self, session.client, session.slots, batch, parts,
                                        first=give_slot)
                if busy is not None:
                    raise BrokerBusy(busy)
            else:
                await self.send(session.client, batch, acknowledged=give_slot)
        except UplinkError as exc:
            raise UplinkError(f"publish of batch {batch.id} failed: {exc}") from exc
        else:
            self.ledger.settle(batch)
        finally:
            give_slot()
            self.show_progress()

    async def send(self, client: Connection, batch: Batch[Command], *,
                   acknowledged: Callable[[], None] | None = None,
                   written: Callable[[], None] | None = None,
                   for_now: Callable[[int], None] | None = None,
                   back: list[Command] | None = None) -> bool:
        """One publish of an outstanding batch (paced) and what comes of it.

        False when it failed alone and its rows went back to the batcher, first (or into
        ``back``, for the caller to put back with others at once, in order).
        ``acknowledged`` is called at its PUBACK, before its rows are deleted; ``written``
        once its PUBLISH is in the connection's outgoing order. ``for_now``: a refusal for
        now is handed to it (the reason code) instead of ending the link here (a train's
        parts: :mod:`pigateway.uplink.train` decides once the train is answered).
        """
        await self.pacer.publish_slot(len(batch.payload))
        forward = batch.forward  # a forwarded message keeps its own topic and properties
        self.ledger.published(batch)
        try:
            code = await client.deliver(
                wire.topic(self.config, batch.kind) if forward is None else forward.topic,
                batch.payload, timeout=self.config.uplink.publish_timeout,
                extras=None if forward is None else forward.extras, written=written)
        except UplinkError:
            raise  # the link's: every batch goes back when it ends
        except PacketTooLarge as exc:
            await self._too_large(client, batch, exc)
            return True
        except Exception as exc:  # one packet, one failure: never the link's
            await self._fail_alone(batch, exc, back)
            return False
        if code is None:
            if acknowledged is not None:
                acknowledged()
            await self._record_delivery(batch)
        elif for_now is not None and refusal(code)[1] == "retry":
            COUNTERS.batch_refused(code)
            for_now(code)
        else:
            await self._refused(client, batch, code)
        return True

    async def _record_delivery(self, batch: Batch[Command]) -> None:
        """Delete the rows of an acknowledged batch, however long the store takes.

        From the PUBACK on the batch is ``delivered``, not ``outstanding``: if the link
        ends while the store is busy, :meth:`give_back` deletes these rows, never sends
        them again.
        """
        self.ledger.acknowledged(batch)
        self.state.note_acked(len(batch.ids))
        await self._ack_batch(batch)
        self.ledger.deleted(batch)
        COUNTERS.batch_acked(len(batch.ids), len(batch.payload),
                             forwarded=batch.kind == "forward")
        self._log_delivered(batch)

    async def _refused(self, client: Connection, batch: Batch[Command], code: int) -> None:
        """A PUBACK failure code: end the link to send it again later, split the batch to
        find the one command refused for good, or bury that one command."""
        name, verdict = refusal(code)
        COUNTERS.batch_refused(code)
        what = f"PUBACK reason code {code} (0x{code:02X}: {name})"
        if verdict == "retry":
            self.ledger.blame(batch)
            raise BrokerBusy(f"the broker refused batch {batch.id} for now: {what}; its "
                             "commands go back to the head of the queue")
        if len(batch.commands) > 1:
            await self._split(client, batch, f"the broker refused it for good ({what})")
            return
        log.warning("uplink: the broker refused command %s of %s for good: %s", batch.ids[0],
                    batch.commands[0].device, what)
        await self.bury(batch, REJECTED, what)

    async def _too_large(self, client: Connection, batch: Batch[Command],
                         exc: PacketTooLarge) -> None:
        """A PUBLISH that the broker (or MQTT) cannot take: never written, it fails alone."""
        what = str(exc)  # names the limit
        if len(batch.commands) > 1:
            await self._split(client, batch, f"it is too large: {what}")
            return
        log.warning("uplink: command %s of %s does not fit in one MQTT packet: %s",
                    batch.ids[0], bounded(batch.commands[0].device, 200), what)
        await self.bury(batch, REASON_TOO_LARGE, what)

    async def bury(self, batch: Batch[Command], reason: str, detail: str) -> None:
        """Dead-letter a batch's rows (``reason``, ``detail``); the ledger forgets it."""
        await self.store_calls.call(f"dead-letter a batch ({reason})",
                                    lambda: self.store.dead_letter(batch.ids, reason, detail))
        self.ledger.drop(batch)

    async def _fail_alone(self, batch: Batch[Command], exc: Exception,
                          back: list[Command] | None = None) -> None:
        """Any other error of one publish: an attempt for this batch only, which goes again
        first (its devices' later rows wait in the batcher); ``max-attempts`` ends it."""
        why = f"publish of batch {batch.id} failed: {type(exc).__name__}: {bounded(exc, 300)}"
        log.warning("uplink: %s; it goes again, an attempt counted (the link goes on)", why)
        buried = await self.store_calls.call("count a failed publish",
                                             lambda: self.store.charge(batch.ids, why))
        again = [c for c in batch.commands if c.id not in buried]
        if back is None:
            self.batcher.put_back(again)
        else:
            back.extend(again)
        self.ledger.drop(batch)

    async def _split(self, client: Connection, batch: Batch[Command], why: str) -> None:
        """Send a batch again as halves, one after the other, in order.

        The halves replace the batch in the ledger at once, so a link that ends meanwhile
        gives all their rows back; the batch's devices stay held until the last half is
        done. Halving ends at single commands: only the command the broker refuses alone
        is dead-lettered (at most 2*log2(n) publishes). A half that fails alone goes back
        with every half behind it, in order.
        """
        try:
            parts = split(batch, self.batcher.rules, now=time.time())
        except ValueError as exc:  # the link ends and every row goes back: nothing is lost
            raise UplinkError(str(exc)) from exc
        log.info("uplink: batch %s of %d commands failed: %s; sending it again in %d parts "
                 "to find the command at fault", batch.id, len(batch.commands), why, len(parts))
        self.ledger.replace(batch, parts)
        for n, part in enumerate(parts):
            if not await self.send(client, part):
                for later in parts[n + 1:]:
                    self.batcher.put_back(later.commands)
                    self.ledger.drop(later)
                return

    def _log_delivered(self, batch: Batch[Command]) -> None:
        """One line per acknowledged batch, carrying its command ids for the journal.

        ``journalctl -u pigateway COMMAND_ID=...`` finds the batch a command went out in
        (the first :data:`pigateway.logs.MAX_FIELD_VALUES` of a batch: the entry is bounded).
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
        self.state.note_deleted(len(batch.ids))

    def show_progress(self) -> None:
        """``in_flight`` (batches holding a slot: published, no PUBACK yet) and
        ``draining`` (in flight, acknowledged and not deleted yet, or claimed) for views."""
        ledger = self.ledger
        self.state.set_progress(in_flight=len(ledger.outstanding),
                                draining=bool(ledger.outstanding or ledger.delivered
                                              or self.batcher.held))

    async def give_back(self, why: str, *, failed: bool) -> None:
        """Put back every row this link claimed but the broker did not acknowledge.

        Rows of a batch that can have ended the link (``failed``: it did not end cleanly;
        :meth:`InFlight.culprits`) count an attempt (``nack``); every other row goes back
        without one (``release``); rows the broker acknowledged but the store has not
        deleted yet are deleted. Each write waits out a busy store, and the memory forgets
        the rows only once the store took them: a cancel or an error in between leaves them
        where the next try finds them.
        """
        ledger = self.ledger
        culprits = ledger.culprits() if failed else set()
        charged = [i for b in ledger.outstanding.values() if b.id in culprits for i in b.ids]
        back = [*self.batcher.claimed(),
                *(i for b in ledger.outstanding.values() if b.id not in culprits for i in b.ids)]
        for done in list(ledger.delivered.values()):
            await self._ack_batch(done)
            ledger.deleted(done)
        if back:
            await self.store_calls.call("put claimed commands back",
                                        lambda: self.store.release(back))
        if charged:
            await self.store_calls.call("put sent commands back",
                                        lambda: self.store.nack(charged, why))
        self.batcher.give_back()
        ledger.clear()
        if charged or back:
            log.info("uplink: %s back at the head of the queue (%s; %d charged an attempt)",
                     plural(len(charged) + len(back), "command"), why, len(charged))
