"""The one state object: updates wake readers, and a busy reader misses no change."""

from __future__ import annotations

import asyncio

import pytest

from pigateway.state import FaultSource, GatewayState, Link


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
