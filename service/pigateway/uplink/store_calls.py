"""The drain's calls into the store, patient with a store that is busy for now.

Every store call of the drain (claim, ack, nack, release, dead letter) goes through
:meth:`StoreCalls.call`: a busy, locked or full store is waited out with the link's backoff,
said once as a warning and in ``last_error``, and shown as the drain's fault once it lasted
:attr:`StoreCalls.fault_after` seconds (an operator should look: a purge or a backup holding
the lock, a full disk); the fault clears when the store answers. Only a store that is gone
(:func:`store_is_gone`) ends the drain, and with it the service (systemd restarts it, which
moves a corrupt file aside); it is shown as a fault first (LEDs, ``STATUS=``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from pigateway.aio import wait_backoff
from pigateway.config import UplinkConfig
from pigateway.errors import StoreCorrupt, StoreError
from pigateway.state import FaultSource, GatewayState

#: the uplink's own lines in the journal
log = logging.getLogger("pigateway.uplink")

T = TypeVar("T")

#: How the drain's fault starts when the store has refused its calls for too long.
STORE_STUCK: Final = "store: the drain cannot"
#: Seconds a store may stay busy, locked or full before that shows as a fault, while still
#: retried.
STORE_FAULT_AFTER: Final = 60.0


def store_is_gone(exc: StoreError) -> bool:
    """Whether a store error means the store is gone (corrupt), not merely busy for now.

    Busy, locked and full stores heal by themselves (another process lets go, space is
    freed): the service waits them out. A corrupt file only heals by a restart, which moves
    it aside; that one ends the service, shown as a fault first.
    """
    return isinstance(exc, StoreCorrupt)


class StoreCalls:
    """Runs the drain's store calls for ``state``, waiting with ``[uplink]``'s backoff."""

    def __init__(self, state: GatewayState, uplink: UplinkConfig) -> None:
        self.state = state
        self.wait = wait_backoff(uplink.backoff_initial, uplink.backoff_max)
        self.fault_after = STORE_FAULT_AFTER

    async def call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` until the store takes it (see the module's docstring)."""
        failures = 0
        since = time.monotonic()
        while True:
            try:
                result = await call()
            except StoreError as exc:
                if store_is_gone(exc):
                    self.state.set_fault(FaultSource.DRAIN, f"store: {exc}")
                    self.state.note_error(str(exc))
                    log.critical("uplink: cannot %s: %s", what, exc)
                    raise
                failures += 1
                self._trouble(what, exc, failures, time.monotonic() - since)
                await asyncio.sleep(self.wait.delay(failures))
                continue
            if failures:
                log.warning("uplink: the store answers again (%s after %d tries)", what,
                            failures + 1)
                self.state.clear_fault(FaultSource.DRAIN)
            return result

    def _trouble(self, what: str, exc: StoreError, failures: int, lasted: float) -> None:
        """Say it once per streak as a warning (and in ``last_error``); then at debug; and
        as the drain's fault once it lasted :attr:`fault_after`."""
        self.state.note_error(f"store: cannot {what}: {exc}")
        level = logging.WARNING if failures == 1 else logging.DEBUG
        log.log(level, "uplink: cannot %s (%s); the drain waits and tries again, nothing "
                "is lost", what, exc)
        if lasted >= self.fault_after and self.state.fault_of(FaultSource.DRAIN) is None:
            self.state.set_fault(FaultSource.DRAIN,
                                 f"{STORE_STUCK} {what} for {lasted:.0f}s: {exc}")
            log.error("uplink: the store has refused to %s for %.0fs (%s): another process "
                      "holding its lock, or a full disk?", what, lasted, exc)
