"""The asyncio idioms the service uses in many places, and its one backoff, defined once.

- :func:`first_of`: wait for the first of some awaitables, then cancel and await the
  others, so no task outlives the wait (a sleep cut short by a flush, a PUBACK raced
  against a lost link, a batch window raced against new work).
- :func:`cancel_and_wait`: end a task of ours and wait until it has ended.
- :func:`first_error`: the error to report out of a ``TaskGroup``'s exception group.
- :func:`reconnecting`: a link's reconnect loop (ingest's local broker, the Home Assistant
  link): connect, serve, wait the backoff or the stop, again.
- :class:`wait_backoff`: the one backoff, exponential from ``initial``, capped at ``maximum``,
  jittered: the uplink's reconnects, the drain waiting out a busy store, inbound commands
  the store cannot take yet, and the device workers' retries (as tenacity's ``wait``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pigateway.errors import PigatewayError

if TYPE_CHECKING:
    import tenacity


async def first_of(*awaitables: Awaitable[Any], timeout: float | None = None) -> int | None:
    """Wait until one of ``awaitables`` is done (or ``timeout`` passed); return its index.

    When several are done, the lowest index wins; ``None`` means the timeout. Every other
    one is cancelled and awaited before this returns (:func:`cancel_and_wait`). Results and
    errors of the winners are marked seen: callers that care keep their own handle (wrap a
    future that is not ours in ``asyncio.shield``).
    """
    futures = [asyncio.ensure_future(each) for each in awaitables]
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(*futures)
    for future in done:
        if not future.cancelled():
            future.exception()  # seen: the caller asked which, not what
    return next((index for index, future in enumerate(futures) if future in done), None)


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended.

    ``asyncio.wait``, not ``await task`` under ``suppress(CancelledError)``: that could
    swallow a cancel meant for the caller (Python 3.11).
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a TaskGroup: the first pigateway error, else the first one.

    A TaskGroup wraps even a single failure in a group, nested when groups nest.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    typed = [leaf for leaf in leaves if isinstance(leaf, PigatewayError)]
    return (typed or leaves)[0]


async def reconnecting(once: Callable[[], Awaitable[bool]], *, stop: asyncio.Event,
                       backoff: wait_backoff, reset: float,
                       up_since: Callable[[], float | None],
                       catch: tuple[type[BaseException], ...] = (),
                       waiting: Callable[[BaseException | None, float], None] | None = None,
                       ) -> None:
    """Run ``once`` (one connection, served until it ends) again and again until ``stop`` is
    set or ``once`` returns True (done for good), waiting the backoff between two.

    The attempt count starts again after a link that stayed up: ``up_since()`` (the
    ``time.monotonic()`` at which ``once``'s link got its CONNACK, None before) at least
    ``reset`` seconds before it ended. The time a connect takes does not count, so a broker
    that drops every link sooner, however slow it is to answer, keeps the backoff growing.
    An error of the backoff's ``faults`` (a refused login, a TLS set-up) waits its maximum.
    An error of ``catch`` is retried, any other ends the loop; ``waiting`` is told the error
    (None: the link just ended) and the wait, unless ``stop`` is set.
    """
    attempt = 0
    while not stop.is_set():
        started = time.monotonic()
        error: BaseException | None = None
        try:
            if await once():
                return
        except catch as exc:
            error = exc
        if stop.is_set():
            return
        since = up_since()
        stayed = since is not None and since >= started and time.monotonic() - since >= reset
        attempt = 1 if stayed else attempt + 1
        wait = backoff.maximum if isinstance(error, backoff.faults) else backoff.delay(attempt)
        if waiting is not None:
            waiting(error, wait)
        await first_of(asyncio.sleep(wait), stop.wait())


class wait_backoff:
    """Attempt n waits ``min(maximum, initial * 2**(n-1))`` less up to ``jitter`` of it, and
    never less than ``floor``.

    The jitter keeps a fleet that failed together from retrying together. An exception of
    one of the ``faults`` types (a refused login, a TLS set-up: they do not heal by
    themselves) waits ``maximum`` every time. ``floor``: a device that said "busy" is never
    asked again sooner than ``inbound.backoff_initial``.

    A plain callable (tenacity's ``wait`` takes one as it takes its own), so importing this
    module does not import tenacity: ``pigateway status`` imports it, through
    :mod:`pigateway.systemd`.
    """

    def __init__(self, initial: float, maximum: float, jitter: float = 0.2,
                 faults: tuple[type[BaseException], ...] = (), floor: float = 0.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.faults = faults
        self.floor = floor

    def delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th failure (1 is the first)."""
        base = min(self.maximum, self.initial * 2.0 ** min(attempt - 1, 60))
        return max(self.floor, float(base * (1 - self.jitter * random.random())))

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        if self.faults and outcome is not None and isinstance(outcome.exception(), self.faults):
            return self.maximum
        return self.delay(retry_state.attempt_number)
