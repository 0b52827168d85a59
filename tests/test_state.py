"""The one state object: updates wake readers, and a busy reader misses no change."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pigateway.errors import QueueFull, StoreError, StoreFull
from pigateway.state import FaultSource, GatewayState, Link, Refusal, Refuser


def test_update_reports_whether_anything_changed() -> None:
    state = GatewayState()
    assert state.update(depth=3) is True
    assert state.update(depth=3) is False
    assert state.version == 1


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(AttributeError, match="no field 'colour'"):
        GatewayState().update(colour="red")


def test_link_changes_restart_the_link_clock() -> None:
    state = GatewayState()
    before = state.link_since
    state.update(link=Link.ONLINE)
    assert state.link_since >= before
    assert state.as_dict()["link"] == "online"


async def test_changed_wakes_a_waiting_reader() -> None:
    state = GatewayState()
    waiter = asyncio.create_task(state.changed())
    await asyncio.sleep(0)
    state.update(paused=True)
    assert await asyncio.wait_for(waiter, 1) == 1


async def test_a_reader_that_was_busy_sees_the_change_it_missed() -> None:
    state = GatewayState()
    seen = state.version
    state.update(depth=10)  # happens while the reader is not waiting
    assert await asyncio.wait_for(state.changed(since=seen), 1) == seen + 1


async def test_changed_since_the_current_version_waits_for_the_next() -> None:
    state = GatewayState()
    state.update(depth=1)
    waiter = asyncio.create_task(state.changed(since=state.version))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    state.update(depth=2)
    assert await asyncio.wait_for(waiter, 1) == 2


def test_a_fault_is_cleared_only_by_its_source() -> None:
    state = GatewayState()
    state.set_fault(FaultSource.WATCHDOG, "store writer not answering")
    state.clear_fault(FaultSource.LINK)  # the link coming up
    assert state.fault == "store writer not answering"
    state.set_fault(FaultSource.LINK, "login refused")
    assert state.fault == "store writer not answering", "the oldest fault shows"
    state.clear_fault(FaultSource.WATCHDOG)
    assert state.fault == "login refused"
    assert state.as_dict()["fault"] == "login refused"
    state.clear_fault(FaultSource.LINK)
    assert state.fault is None


def test_update_with_fault_is_a_source_of_its_own() -> None:
    state = GatewayState()
    state.set_fault(FaultSource.DRAIN, "store: the drain cannot claim")
    state.update(fault="disk full")
    state.update(fault=None)
    assert state.fault == "store: the drain cannot claim"
    assert state.update(fault=None) is False


def test_an_outage_is_timed_from_when_the_link_went_down() -> None:
    """Reconnect attempts inside an outage do not restart its clock ("offline 3h 12m")."""
    state = GatewayState()
    state.set_link(Link.ONLINE)
    state.set_link(Link.OFFLINE)
    down = state.link_since
    for link in (Link.CONNECTING, Link.OFFLINE, Link.CONNECTING, Link.OFFLINE):
        state.set_link(link)
        assert state.link_since == down, link
    state.set_link(Link.ONLINE)
    assert state.link_since >= down
    up = state.link_since
    state.set_link(Link.ONLINE)
    assert state.link_since == up


def test_a_refusal_is_shown_by_its_owner_until_it_clears_it() -> None:
    state = GatewayState()
    assert state.refusing is None and state.as_dict()["refusals"] == []
    state.set_refusing(Refuser.INGEST, Refusal.DISK_RESERVE, "only 10 bytes free")
    state.set_refusing(Refuser.QUEUE, Refusal.QUEUE_FULL, "the queue is full")
    assert state.refusing == "ingest: disk-reserve: only 10 bytes free"
    assert state.as_dict()["refusals"] == [
        {"by": "ingest", "reason": "disk-reserve", "detail": "only 10 bytes free"},
        {"by": "queue", "reason": "queue-full", "detail": "the queue is full"}]
    version = state.version
    assert state.clear_refusing(Refuser.INGEST) is True
    assert state.version > version, "readers are woken"
    assert state.refusing == "queue: queue-full: the queue is full"
    state.clear_refusing(Refuser.QUEUE)
    assert state.refusing is None


def test_a_refusal_is_said_at_warning_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    state = GatewayState()
    with caplog.at_level(logging.DEBUG, logger="pigateway.state"):
        for free in (10, 9, 8):  # one episode, its detail moving
            state.set_refusing(Refuser.QUEUE, Refusal.DISK_RESERVE, f"only {free} bytes free")
        state.clear_refusing(Refuser.QUEUE)  # a queue at its limit takes one, then refuses
        state.set_refusing(Refuser.QUEUE, Refusal.DISK_RESERVE, "only 7 bytes free")
        state.set_refusing(Refuser.QUEUE, Refusal.QUEUE_FULL, "the queue is full")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["refusing work: queue: disk-reserve: only 10 bytes free",
                        "refusing work: queue: queue-full: the queue is full"]
    assert any("takes work again" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


@pytest.mark.parametrize(("error", "reason"), [
    (StoreFull("disk"), Refusal.DISK_RESERVE), (QueueFull("full"), Refusal.QUEUE_FULL),
    (StoreError("database is locked"), Refusal.STORE_BUSY)])
def test_the_reason_of_a_stores_refusal(error: StoreError, reason: Refusal) -> None:
    assert Refusal.of(error) is reason
