"""The in-flight ledger: which batches of a link the broker has not acknowledged yet.

One ledger per :class:`~pigateway.uplink.Uplink`, the one place that knows, for the drain:

- which batches are **outstanding** (claimed into a batch, maybe published, no PUBACK
  yet) and which are **delivered** (PUBACK came, their rows not deleted yet: a busy store);
- which **devices** are busy: a device is in at most one unacknowledged batch. That is the
  mechanism that keeps each device's commands in the order they were put on the whole path
  (claim, pacing, Receive Maximum, the socket, a refusal, a split, a reconnect) while
  ``uplink.max_inflight`` batches of *different* devices travel at once: a later batch of
  the device is only built once the broker took the earlier one, so nothing a broker does
  to one batch (refuse it for now, for good, drop the link at it) can let a later command
  of the same device arrive first. The batcher asks :meth:`busy` and waits on
  :meth:`wait_freed`;
- which batches were **published** on this link, so that when the link drops only what
  can have caused it is charged an attempt (:meth:`culprits`).

No I/O and no store calls here: the drain (:mod:`pigateway.uplink`) does those and tells
the ledger what happened.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import Generic, TypeVar

from pigateway.errors import UplinkError
from pigateway.uplink.batching import Batch, Queued

C = TypeVar("C", bound=Queued)


class InFlight(Generic[C]):
    """The batches of one drain that the broker has not acknowledged, and their devices."""

    def __init__(self) -> None:
        #: batches this link may have unacknowledged (``uplink.max_inflight`` met with the
        #: broker's Receive Maximum), set per session
        self.slots = 1
        self.outstanding: dict[str, Batch[C]] = {}
        #: acknowledged by the broker, rows not deleted yet (a busy store)
        self.delivered: dict[str, Batch[C]] = {}
        self._holder: dict[str, str] = {}  # device -> the batch id it is in
        self._published: dict[str, int] = {}  # batch id -> publish order on this link
        self._blamed: set[str] = set()
        self._counter = itertools.count()
        self._freed = asyncio.Event()
        #: set while nothing is outstanding or delivered
        self.settled = asyncio.Event()
        self.settled.set()

    # ---- what the batcher asks

    def busy(self) -> frozenset[str]:
        """Devices in an unacknowledged batch: their next commands wait for it."""
        return frozenset(self._holder)

    def free_slots(self) -> int:
        """Batches that may still go out on this link, the one being built included."""
        return max(1, self.slots - len(self.outstanding))

    def arm(self) -> None:
        """Start watching for a freed device (before looking at :meth:`busy`)."""
        self._freed.clear()

    async def wait_freed(self) -> None:
        """Until a device was freed since :meth:`arm`."""
        await self._freed.wait()

    # ---- what the drain tells

    def add(self, batch: Batch[C]) -> None:
        """A batch was built: it and its devices are in flight."""
        devices = _devices(batch)
        for device in devices:
            holder = self._holder.get(device)
            if holder is not None:  # a bug: the caller ends the link and loses nothing
                raise UplinkError(f"device {device} would be in batches {holder} and "
                                  f"{batch.id} at once: its order could not hold")
        self._holder.update(dict.fromkeys(devices, batch.id))
        self.outstanding[batch.id] = batch
        self.settled.clear()

    def replace(self, batch: Batch[C], parts: list[Batch[C]]) -> None:
        """``batch`` goes as ``parts`` (a split, sent one after the other).

        The devices stay held by the batch first built (a part's PUBACK frees nothing),
        until :meth:`settle` of that batch: a device's next batch waits for every part.
        """
        del self.outstanding[batch.id]
        self._published.pop(batch.id, None)
        self._blamed.discard(batch.id)
        self.outstanding.update({part.id: part for part in parts})

    def settle(self, batch: Batch[C]) -> None:
        """The drain is done with a batch it built (and with its parts): its devices are free."""
        self._free(_devices(batch), batch.id)
        self._check_settled()

    def published(self, batch: Batch[C]) -> None:
        """The batch's PUBLISH was handed to the connection (it may reach the broker)."""
        self._published[batch.id] = next(self._counter)

    def blame(self, batch: Batch[C]) -> None:
        """The broker named this batch as the reason the link ends (a refusal for now)."""
        self._blamed.add(batch.id)

    def acknowledged(self, batch: Batch[C]) -> None:
        """PUBACK: the broker has it. Its devices are free; its rows still need deleting."""
        self.delivered[batch.id] = self.outstanding.pop(batch.id)
        self._published.pop(batch.id, None)
        self._free(_devices(batch), batch.id)

    def deleted(self, batch: Batch[C]) -> None:
        """An acknowledged batch's rows are deleted: it is done."""
        self.delivered.pop(batch.id, None)
        self._check_settled()

    def drop(self, batch: Batch[C]) -> None:
        """A batch ends without delivery (its rows dead-lettered or put back by the drain)."""
        self.outstanding.pop(batch.id, None)
        self._published.pop(batch.id, None)
        self._blamed.discard(batch.id)
        self._free(_devices(batch), batch.id)
        self._check_settled()

    # ---- when the link ends

    def culprits(self) -> set[str]:
        """The outstanding batches that can have ended the link: they are charged an attempt.

        One the broker named (a refusal for now) if any. Otherwise the biggest one
        published (the first of them): the one thing a message does that makes a broker
        drop a link is being over a packet limit it did not state (MQTT 3.1.1; MQTT 5 limits
        are checked before anything is written), and that is the biggest in flight. Not
        "the first without a PUBACK": mosquitto closes without sending the PUBACKs of the
        packets it took before the bad one, so that would charge an innocent batch every
        time. Batches never published, and every other one, go back without an attempt.
        """
        if self._blamed:
            return set(self._blamed) & set(self.outstanding)
        sent = sorted((i for i in self._published if i in self.outstanding),
                      key=self._published.__getitem__)
        if not sent:
            return set()
        return {max(sent, key=lambda i: len(self.outstanding[i].payload))}

    def clear(self) -> None:
        """The link ended and every row went back to the store: nothing is in flight."""
        devices = list(self._holder)
        self.outstanding.clear()
        self.delivered.clear()
        self._published.clear()
        self._blamed.clear()
        self._holder.clear()
        if devices:
            self._freed.set()
        self.settled.set()

    def _free(self, devices: Iterable[str], batch_id: str) -> None:
        for device in devices:
            if self._holder.get(device) == batch_id:
                del self._holder[device]
                self._freed.set()

    def _check_settled(self) -> None:
        if not self.outstanding and not self.delivered:
            self.settled.set()


def _devices(batch: Batch[C]) -> set[str]:
    return {command.device for command in batch.commands}
