"""This process's counters (:data:`COUNTERS`), bumped on the hot paths, rendered by
:mod:`pigateway.listeners.metrics`.

Apart from :mod:`pigateway.listeners.metrics` because the store's writer bumps them: this module
imports nothing, so the store never loads the metrics module, its config checks or its HTTP
server. Plain classes, not dataclasses (their set-up costs ~4 ms here, ~10x on a Pi
Zero). ``pigateway send`` does not load it at all (its Producer has no writer task).
"""

from __future__ import annotations

from typing import Any, Final

#: Upper bounds (seconds) of the commit time histogram: an fsync on an SD card is 2-50 ms.
COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0)


class Histogram:
    """A Prometheus histogram kept as plain numbers (observing must cost nothing)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = COMMIT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound),
                     len(self.bounds))
        self.counts[index] += 1
        self.total += value

    def as_dict(self) -> dict[str, Any]:
        """Cumulative buckets by upper bound (``"+Inf"`` last), ``sum`` and ``count``."""
        running, buckets = 0, {}
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            buckets[bound] = running
        return {"buckets": buckets, "sum": self.total, "count": running}


class Counters:
    """What this process saw happen; zero at its start (the store holds the rest)."""

    __slots__ = ("batches", "bytes_published", "commit_seconds", "connects", "delivered",
                 "forwarded", "inbound", "refusals")

    def __init__(self) -> None:
        self.delivered = 0
        self.forwarded = 0
        self.batches = 0
        self.bytes_published = 0
        self.connects = 0
        self.refusals: dict[str, int] = {}
        self.inbound: dict[str, int] = {}
        self.commit_seconds = Histogram()

    def batch_acked(self, commands: int, size: int, *, forwarded: bool = False) -> None:
        """A batch of ``commands`` and ``size`` payload bytes got its PUBACK (``forwarded``:
        it was a local device's message forwarded by ingest)."""
        self.delivered += commands
        self.forwarded += commands if forwarded else 0
        self.batches += 1
        self.bytes_published += size

    def batch_refused(self, code: int) -> None:
        """The broker answered a batch with a failure reason code (its rows are dead)."""
        self.refusals[str(code)] = self.refusals.get(str(code), 0) + 1

    def link_up(self) -> None:
        """The uplink came online (every time after the first is a reconnect)."""
        self.connects += 1

    def inbound_done(self, status: str) -> None:
        """An inbound command got its one result (``ok``, ``error``, ``rejected``, ...)."""
        self.inbound[status] = self.inbound.get(status, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the retained state document and the control socket carry this."""
        return {"delivered": self.delivered, "forwarded": self.forwarded,
                "batches": self.batches,
                "bytes_published": self.bytes_published,
                "reconnects": max(0, self.connects - 1), "refusals": dict(self.refusals),
                "inbound": dict(self.inbound), "commit_seconds": self.commit_seconds.as_dict()}


#: The counters of this process. One per process, like the process itself: a restart resets.
COUNTERS: Final = Counters()

__all__ = ["COMMIT_BUCKETS", "COUNTERS", "Counters", "Histogram"]
