"""The in-flight ledger's rules, without a broker: a device in at most one unacknowledged
batch, a split holding its devices to the end, and what a dropped link is charged to."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from pigateway.errors import UplinkError
from pigateway.uplink.batching import Batch
from pigateway.uplink.inflight import InFlight


@dataclass(frozen=True)
class Row:
    id: str
    device: str
    name: str = "set"
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "action"
    queued_at: float = 0.0
    expires_at: float | None = None
    size: int = 0


def batch(batch_id: str, *devices: str, size: int = 10) -> Batch[Row]:
    rows = tuple(Row(f"{batch_id}-{n}", device) for n, device in enumerate(devices))
    return Batch(batch_id, "actions", rows, b"x" * size)


async def test_a_device_is_busy_from_its_batch_to_the_puback() -> None:
    ledger: InFlight[Row] = InFlight()
    first = batch("b1", "lamp", "fan")
    ledger.add(first)
    assert ledger.busy() == {"lamp", "fan"} and not ledger.settled.is_set()
    with pytest.raises(UplinkError, match="lamp"):
        ledger.add(batch("b2", "lamp"))
    assert "b2" not in ledger.outstanding and ledger.busy() == {"lamp", "fan"}
    ledger.arm()
    waiter = asyncio.ensure_future(ledger.wait_freed())
    ledger.acknowledged(first)
    await asyncio.wait_for(waiter, 1)
    assert ledger.busy() == frozenset() and not ledger.settled.is_set()  # rows not deleted
    ledger.deleted(first)
    assert ledger.settled.is_set()


def test_a_split_holds_its_devices_until_the_last_half() -> None:
    ledger: InFlight[Row] = InFlight()
    whole = batch("b1", "lamp", "lamp", "fan")
    ledger.add(whole)
    halves = [batch("h1", "lamp"), batch("h2", "lamp", "fan")]
    ledger.replace(whole, halves)
    ledger.published(halves[0])
    ledger.acknowledged(halves[0])
    ledger.deleted(halves[0])
    ledger.drop(halves[1])  # dead-lettered
    assert ledger.busy() == {"lamp", "fan"}
    ledger.settle(whole)
    assert ledger.busy() == frozenset() and ledger.settled.is_set()


def test_a_dropped_link_is_charged_to_the_blamed_batch_or_the_biggest_published() -> None:
    ledger: InFlight[Row] = InFlight()
    small, big, unsent = batch("s", "a", size=10), batch("b", "b", size=500), batch("u", "c",
                                                                                     size=9999)
    for each in (small, big, unsent):
        ledger.add(each)
    assert ledger.culprits() == set()  # nothing published: nothing can have caused it
    ledger.published(small)
    ledger.published(big)
    assert ledger.culprits() == {"b"}  # never the one not yet written, however big
    ledger.blame(small)
    assert ledger.culprits() == {"s"}
    ledger.clear()
    assert ledger.outstanding == {} and ledger.busy() == frozenset() and ledger.culprits() == set()
