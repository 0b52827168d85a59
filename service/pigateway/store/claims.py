"""Where the drainer's next claim starts: a cursor per priority tier, so that a claim reads
the rows after the last one it claimed instead of stepping again over every row in flight.

Under a backlog the rows a drainer has claimed and not yet acked (the batcher's rows held
ahead, the batches awaiting their PUBACK: a few thousand) sit at the head of the queue. A
claim that asks for "the first unclaimed rows in (priority, seq) order" from the head reads
past every one of them, each time. The cursor remembers, per tier, the last row claimed:
every row of that tier up to it is claimed, so the next claim starts after it (a rowid range
on the table for normal rows, a range of the ``outbox_urgent`` index for the others).

It is a hint in the drainer's memory, never trusted blindly. Before it is used, the row it
names must still be in flight, the same row (seq and id): a seq is reused once the rows
above it are gone (``outbox.seq`` has no AUTOINCREMENT), and a row put into a reused seq
would otherwise sit below the cursor, unseen. While that row is in flight no row can be put
below it (a new seq is one more than the largest), and no row below it became unclaimed
(every verb that puts a claimed row back, ``release`` and ``nack``, forgets the cursors). A
cursor that fails the check, or none (a new drainer: every row in flight was put back at
its open), means the claim reads from the head of its tier, as without one. A claim that
is rolled back leaves a cursor whose row is not in flight: it fails the check.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from typing import Any, Final

from pigateway.store.connection import fetch_all

#: Only rows not claimed: a row in ``inflight`` is the drainer's until acked or put back.
UNCLAIMED: Final = "seq NOT IN (SELECT seq FROM inflight)"
#: The cursor's row, if it is still in flight, the same row: its priority.
_STILL_CLAIMED: Final = ("SELECT priority FROM outbox WHERE seq = ?1 AND id = ?2 AND "
                         "seq IN (SELECT seq FROM inflight WHERE seq = ?1)")


class Cursors:
    """One cursor per tier of ``tiers`` (WHERE terms, in claim order): the seq and id of the
    last row claimed from it, or ``None``."""

    def __init__(self, columns: str, tiers: Sequence[str]) -> None:
        order = "ORDER BY priority, seq LIMIT ?"
        self._from_head = [f"SELECT {columns} FROM outbox WHERE {tier} AND {UNCLAIMED} {order}"
                           for tier in tiers]
        # after the cursor: its priority from its seq on (a seek in the table or the index),
        # then a tier's higher priorities, if it has any
        self._after = [f"SELECT {columns} FROM outbox WHERE {tier} AND priority = ? AND "
                       f"seq > ? AND {UNCLAIMED} {order}" for tier in tiers]
        self._above = [None if "priority = " in tier else
                       f"SELECT {columns} FROM outbox WHERE {tier} AND priority > ? AND "
                       f"{UNCLAIMED} {order}" for tier in tiers]
        self._last: list[tuple[int, str] | None] = [None] * len(tiers)

    def unclaimed(self, conn: sqlite3.Connection, limit: int) -> list[list[tuple[Any, ...]]]:
        """Up to ``limit`` unclaimed rows in claim order, tier after tier (one list each;
        a row's first two columns are its seq and id)."""
        found: list[list[tuple[Any, ...]]] = []
        left = limit
        for tier in range(len(self._last)):
            rows = self._read(conn, tier, left) if left > 0 else []
            found.append(rows)
            left -= len(rows)
        return found

    def claimed(self, tiers: list[list[tuple[Any, ...]]], *, but: Collection[int]) -> None:
        """The rows :meth:`unclaimed` read (``tiers``) are now claimed, ``but`` those seqs
        (buried instead: gone)."""
        for tier, rows in enumerate(tiers):
            last = next((row for row in reversed(rows) if row[0] not in but), None)
            if last is not None:
                self._last[tier] = (last[0], last[1])

    def forget(self) -> None:
        """Claimed rows were put back (or may have been): the next claims read from the head."""
        self._last = [None] * len(self._last)

    def _read(self, conn: sqlite3.Connection, tier: int, limit: int) -> list[tuple[Any, ...]]:
        last = self._last[tier]
        still = None if last is None else conn.execute(_STILL_CLAIMED, last).fetchone()
        if last is None or still is None:
            self._last[tier] = None
            return fetch_all(conn, self._from_head[tier], (limit,))
        priority = still[0]
        rows = fetch_all(conn, self._after[tier], (priority, last[0], limit))
        above = self._above[tier]
        if above is not None and len(rows) < limit:
            rows += fetch_all(conn, above, (priority, limit - len(rows)))
        return rows
