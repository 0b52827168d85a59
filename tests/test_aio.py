"""The two asyncio idioms of pigateway.aio: the first of some awaitables, the error to report."""

from __future__ import annotations

import asyncio

import pytest

from pigateway.aio import cancel_and_wait, first_error, first_of
from pigateway.errors import StoreError


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
