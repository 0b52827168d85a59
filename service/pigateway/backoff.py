"""The one backoff: exponential from ``initial``, capped at ``maximum``, jittered.

Used by the uplink's reconnects, the drain waiting out a busy store, inbound commands the
store cannot take yet, and the device workers' retries (as tenacity's ``wait``).
"""

from __future__ import annotations

import random

import tenacity


class wait_backoff(tenacity.wait.wait_base):
    """Attempt n waits ``min(maximum, initial * 2**(n-1))`` less up to ``jitter`` of it, and
    never less than ``floor``.

    The jitter keeps a fleet that failed together from retrying together. An exception of
    one of the ``faults`` types (a refused login, a TLS set-up: they do not heal by
    themselves) waits ``maximum`` every time. ``floor``: a device that said "busy" is never
    asked again sooner than ``inbound.backoff_initial``.
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
