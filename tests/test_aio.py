"""The asyncio idioms of pigateway.aio: the first of some awaitables, the error to report,
the reconnect loop."""

from __future__ import annotations

import asyncio

import pytest

from pigateway.aio import cancel_and_wait, first_error, first_of, reconnecting, wait_backoff
from pigateway.errors import LinkFault, StoreError, UplinkError


async def test_first_of_returns_the_winner_and_ends_the_losers() -> None:
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    loser = asyncio.ensure_future(slow())
    assert await first_of(asyncio.sleep(0.01), loser) == 0
    assert loser.cancelled(), "the loser was cancelled and awaited before first_of returned"


async def test_first_of_times_out_with_none_and_leaves_a_shielded_future_alone() -> None:
    theirs: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await first_of(asyncio.shield(theirs), timeout=0.01) is None
    assert not theirs.cancelled()
    theirs.set_result(None)


async def test_cancel_and_wait_ends_a_task() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait(task)
    assert task.cancelled()


def test_first_error_prefers_a_pigateway_error_in_nested_groups() -> None:
    group = BaseExceptionGroup("outer", [ValueError("bug"),
                                         BaseExceptionGroup("inner", [StoreError("busy")])])
    assert isinstance(first_error(group), StoreError)
    assert isinstance(first_error(BaseExceptionGroup("g", [KeyError("k")])), KeyError)


@pytest.mark.parametrize("seconds", [0.0, 0.01])
async def test_first_of_a_single_awaitable(seconds: float) -> None:
    assert await first_of(asyncio.sleep(seconds)) == 0


async def test_reconnecting_backs_off_until_done_a_fault_waiting_the_maximum() -> None:
    """Each failed or ended link is retried after the backoff (a fault: its maximum), the
    attempts counting up while the links are short; ``once`` returning True ends it."""
    outcomes: list[BaseException | None] = [UplinkError("refused"), None, LinkFault("tls"),
                                            UplinkError("refused")]
    waits: list[tuple[str, float]] = []

    async def once() -> bool:
        if not outcomes:
            return True
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return False

    backoff = wait_backoff(0.001, 0.05, jitter=0.0, faults=(LinkFault,))
    async with asyncio.timeout(5):
        await reconnecting(once, stop=asyncio.Event(), backoff=backoff, reset=60.0,
                           up_since=lambda: None, catch=(UplinkError,),
                           waiting=lambda error, wait: waits.append((repr(error), wait)))
    assert waits == [("UplinkError('refused')", 0.001), ("None", 0.002),
                     ("LinkFault('tls')", 0.05), ("UplinkError('refused')", 0.008)]


async def test_reconnecting_ends_at_the_stop_and_on_an_error_it_does_not_catch() -> None:
    stop = asyncio.Event()
    calls = 0

    async def until_stopped() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            stop.set()
        return False

    backoff = wait_backoff(0.001, 0.01)
    async with asyncio.timeout(5):
        await reconnecting(until_stopped, stop=stop, backoff=backoff, reset=60.0,
                           up_since=lambda: None)
    assert calls == 3

    async def corrupt() -> bool:
        raise StoreError("the store is corrupt")

    with pytest.raises(StoreError):
        await reconnecting(corrupt, stop=asyncio.Event(), backoff=backoff, reset=60.0,
                           up_since=lambda: None, catch=(UplinkError,))
