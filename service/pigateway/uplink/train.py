"""A train: several forwarded messages of one local topic in flight at once, in order.

Why: a forwarded message is the device's own message, a PUBLISH of its own, never wrapped
in a batch; under the drain's rule that a device (here a local topic) is in at most one
unacknowledged batch (:mod:`pigateway.uplink.inflight`), each topic forwarded one message per
round trip to the broker, and a burst over a few topics left most of ``uplink.max_inflight``
idle. The rule stays: a train is *one* batch in the ledger, its topic held by it until it
is done, so the topic's next messages wait for every message of it, as a split batch's
devices wait for its last half. Its messages are its parts (:func:`~.batching.train_parts`),
published one after the other in the topic's order, each handed to the connection only
once the one before is in the connection's outgoing order, without waiting for the PUBACK
in between; each holds an in-flight slot until its PUBACK.

What each message can come to, and why the topic's order still holds:

- PUBACK: delivered, its row deleted.
- refused for good (PUBACK 0x87, 0x90, 0x95, 0x99), or over the broker's packet size
  (never written): that message alone is dead-lettered and the others go on, as a
  device's later commands do after a refusal for good (docs/uplink.md).
- the MQTT library refuses it (nothing written): no later message of the train is
  written; it goes back first with an attempt counted, the later ones behind it in order.
- the link drops: every message not acknowledged goes back to the head of the queue, in
  order. One connection keeps its order (TCP; the broker handles a client's PUBLISHes in
  the order they came), so a message that reached the broker did so after every one
  before it.
- refused for now (0x97 quota exceeded, 0x96, 0x89, 0x80, ...): no later message of the
  train is written, and the link ends (the broker asked us to slow down) once the ones
  already written are answered. Sent again, the refused message would arrive *after* any
  later message of its topic the broker took meanwhile. So: if the broker took none, it
  goes back to the head of the queue with an attempt counted, as every refusal for now;
  if the broker took a later one, it is dead-lettered ``rejected-by-broker`` (its detail
  says why; ``pigateway queue requeue`` sends it again), never delivered out of order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pigateway.aio import first_error
from pigateway.mqtt import Connection, refusal
from pigateway.store import Command
from pigateway.uplink.batching import REJECTED, Batch, Batcher
from pigateway.uplink.inflight import InFlight

log = logging.getLogger("pigateway.uplink")


class Shipper(Protocol):
    """What a train needs of the drain (:class:`~pigateway.uplink.drain.Drain`)."""

    ledger: InFlight[Command]
    batcher: Batcher[Command]

    async def send(self, client: Connection, batch: Batch[Command], *,
                   acknowledged: Callable[[], None] | None = None,
                   written: Callable[[], None] | None = None,
                   for_now: Callable[[int], None] | None = None,
                   back: list[Command] | None = None) -> bool: ...

    async def bury(self, batch: Batch[Command], reason: str, detail: str) -> None: ...


@dataclass
class _Answers:
    """What the broker said to a train's messages so far, by their place in it."""

    delivered: set[int] = field(default_factory=set)
    #: refused for now: place -> reason code
    refused: dict[int, int] = field(default_factory=dict)
    #: a message failed alone (the MQTT library refused it): write no later one
    stopped: bool = False
    #: its rows, to go back first (none when it ran out of attempts)
    back: list[Command] = field(default_factory=list)
    #: messages never written, because of it or of a refusal for now: place -> message
    unwritten: dict[int, Batch[Command]] = field(default_factory=dict)

    def halted(self) -> bool:
        """Whether no later message may be written (one refused for now, or failed)."""
        return self.stopped or bool(self.refused)


async def ship_train(shipper: Shipper, client: Connection, slots: asyncio.Semaphore,
                     train: Batch[Command], parts: list[Batch[Command]], *,
                     first: Callable[[], None]) -> str | None:
    """Publish a ``train``'s ``parts`` in order, pipelined, and settle each; ``first`` gives
    back the slot the first part holds (taken by the drain). Returns why the link must end
    (a refusal for now), or None. A link error raises, every part still in the ledger.

    Each message is published by a task of its own, which waits for the one before it to
    be written only when that one had to wait (for its slot, the pacer, the broker's
    Receive Maximum): otherwise they run one after the other in one turn of the event loop
    and leave in one write. The topic is freed at the last PUBACK when every message was
    delivered (as a batch's device is freed at its PUBACK), not after the deletes' commits:
    held through them, a topic sent one train per commit (an fsync, 5-20 ms on an SD card)
    instead of one per round trip."""
    answers = _Answers()
    try:
        async with asyncio.TaskGroup() as tasks:
            publisher = _Publisher(shipper, client, slots, tasks, answers,
                                   lambda: _free_when_all_delivered(shipper, train, answers))
            before: asyncio.Future[None] | None = None
            for n, part in enumerate(parts):
                before = publisher.start(part, n, before, first if n == 0 else None)
    except BaseExceptionGroup as group:
        raise first_error(group) from group
    finally:
        _put_back(shipper, answers)
    return await _refused_for_now(shipper, parts, answers)


@dataclass
class _Publisher:
    """Publishes a train's messages, each in a task of its own, and notes the answers."""

    shipper: Shipper
    client: Connection
    slots: asyncio.Semaphore
    tasks: asyncio.TaskGroup
    answers: _Answers
    #: called at each PUBACK of a delivery
    on_delivered: Callable[[], None]

    def start(self, part: Batch[Command], place: int, before: asyncio.Future[None] | None,
              held: Callable[[], None] | None) -> asyncio.Future[None]:
        """Publish one message once the one ``before`` it is written; the future returned
        is done once this one is written (or ended unwritten). ``held``: gives back the
        slot it already holds (else it takes one)."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.tasks.create_task(self._one(part, place, before, written, held),
                               name=f"ship-{part.id}")
        return written

    async def _one(self, part: Batch[Command], place: int, before: asyncio.Future[None] | None,
                   written: asyncio.Future[None], held: Callable[[], None] | None) -> None:
        answers = self.answers
        slot = [held]

        def give_slot() -> None:
            release, slot[0] = slot[0], None
            if release is not None:
                release()

        def delivered() -> None:
            answers.delivered.add(place)
            give_slot()
            self.on_delivered()

        def in_order() -> None:
            if not written.done():
                written.set_result(None)

        try:
            if before is not None and not before.done():
                await before  # the topic's order on the wire
            if slot[0] is None and not answers.halted():
                await self.slots.acquire()
                slot[0] = self.slots.release
            if answers.halted():  # never written: back behind the one that stopped it
                answers.unwritten[place] = part
                return
            if not await self.shipper.send(
                    self.client, part, acknowledged=delivered, written=in_order,
                    for_now=lambda code: answers.refused.__setitem__(place, code),
                    back=answers.back):
                answers.stopped = True
        finally:
            give_slot()
            in_order()


async def _refused_for_now(shipper: Shipper, parts: list[Batch[Command]],
                           answers: _Answers) -> str | None:
    """Each message refused for now goes back (an attempt, when the link ends), unless the
    broker took a later message of its topic: then sent again it would arrive after that
    one, so it is dead-lettered. Returns why the link ends, or None."""
    why = None
    for place, code in sorted(answers.refused.items()):
        part = parts[place]
        name, _ = refusal(code)
        what = f"PUBACK reason code {code} (0x{code:02X}: {name})"
        if any(later > place for later in answers.delivered):
            log.warning("uplink: the broker refused forwarded message %s for now (%s) and "
                        "took a later message of its topic: dead-lettered, so that its "
                        "topic's order holds", part.ids[0], what)
            await shipper.bury(part, REJECTED, f"refused for now ({what}) after later "
                               "messages of its topic had gone; the broker took a later one, "
                               "so sent again it would arrive after it")
        why = why or (f"the broker refused forwarded message {part.ids[0]} for now: {what}; "
                      "it and everything behind it go back to the head of the queue")
        shipper.ledger.blame(part)  # the link ends for it; buried, it is charged nothing
    return why


def _free_when_all_delivered(shipper: Shipper, train: Batch[Command], answers: _Answers) -> None:
    if len(answers.delivered) == len(train.commands):
        shipper.ledger.settle(train)


def _put_back(shipper: Shipper, answers: _Answers) -> None:
    """The rows of the message that failed alone, then those never written, in their order,
    back to the batcher in one go: handed back one by one, the batcher could take some in
    between and put the later ones ahead of them. Done however the train ends (a link
    error too), so that the link's give-back finds them."""
    unwritten = [answers.unwritten[place] for place in sorted(answers.unwritten)]
    rows = [*answers.back, *(row for part in unwritten for row in part.commands)]
    answers.back = []
    answers.unwritten = {}
    if rows:
        shipper.batcher.put_back(rows)
    for part in unwritten:
        shipper.ledger.drop(part)
