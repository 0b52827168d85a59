"""Where a command is, and who asked for it: delivery records and producer keys.

Producers learn the outcome of their command (``pigateway send --wait``, ``pigateway queue
show ID``, :func:`where`) from three places in the store: the queue (queued, or in flight),
the dead letters (with the reason), and the delivery records written here in the same
transaction that deletes a delivered batch's rows (:func:`record`): command id, batch id,
when. A record is kept :data:`KEPT_SECONDS` and at most :data:`KEPT_ROWS` records; older
ones are pruned a chunk at a time as new ones come (:func:`prune`), so the table stays
small. The tables are ``WITHOUT ROWID`` keyed by the command id: one b-tree, no index.

Only *watched* commands get a delivery record: those whose producer asked for the outcome
(``send --wait``, ``send --id``, ``Store.put(..., watch=True)``), noted in ``watched`` at
put. Recording every delivery cost 14% more bytes written per command with batches of 50
and 21% with one command per batch (``scripts/bench``: one more b-tree page per ack
transaction), over the 10% the issue allows; a look-up in ``watched`` that finds nothing
writes nothing. ``queue show`` of an unwatched command that left the queue without dying
says ``unknown`` (delivered, or never queued); the journal line of its batch has its id.

A producer key (``pigateway send --id KEY``) maps to the command it made for
:data:`KEY_SECONDS`: sending the same key again in that window is a no-op that returns the
first command's id, whether that command is queued, in flight, delivered or dead.

Pure functions over a :class:`sqlite3.Connection` (the store calls them inside its own
transactions), light on purpose: ``pigateway send`` imports this module.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final, Literal, NamedTuple

#: The schema this module needs (one migration of the store).
SCHEMA: Final = """
    CREATE TABLE delivered (
        id TEXT PRIMARY KEY,
        batch TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE watched (
        id TEXT PRIMARY KEY,
        at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE producer_keys (
        key TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        at REAL NOT NULL
    ) WITHOUT ROWID;
"""
#: Seconds a delivery record is kept (``queue show`` and ``send --wait`` see it that long).
KEPT_SECONDS: Final = 24 * 3600.0
#: Delivery records kept at most.
KEPT_ROWS: Final = 100_000
#: Seconds a producer key is remembered (the idempotency window of ``send --id``).
KEY_SECONDS: Final = 24 * 3600.0
#: Records pruned per transaction at most.
PRUNE_CHUNK: Final = 500

State = Literal["queued", "in-flight", "delivered", "dead", "unknown"]


class Where(NamedTuple):
    """Where a command is now."""

    id: str
    state: State
    #: queued: how many rows go before it
    position: int | None = None
    attempts: int | None = None
    last_error: str | None = None
    #: delivered: the batch the broker acknowledged, and when (wall clock)
    batch: str | None = None
    at: float | None = None
    #: dead: why
    reason: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self._asdict().items() if value is not None}


def record(conn: sqlite3.Connection, ids: Sequence[str], batch: str, now: float,
           gateway_now: float) -> int:
    """Note the watched ones of ``ids`` as delivered in ``batch`` (in the transaction that
    deletes their rows) at wall time ``now`` (shown) and gateway time ``gateway_now`` (its
    age is counted from it); returns how many. Unwatched ids cost a look-up, no write."""
    noted = 0
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        marks = ",".join("?" * len(chunk))
        noted += conn.execute(
            "INSERT OR REPLACE INTO delivered (id, batch, at, kept_on) SELECT id, ?, ?, ? "
            f"FROM watched WHERE id IN ({marks})", (batch, now, gateway_now, *chunk)).rowcount
        if noted:
            conn.execute(f"DELETE FROM watched WHERE id IN ({marks})", chunk)
    return noted


def watch_statements(id_: str, now: float) -> list[tuple[str, Sequence[Any]]]:
    """Statements to run with the put of ``id_``: record its delivery when it comes, and
    forget watches older than :data:`KEPT_SECONDS` (commands that died or expired). ``now``
    is the gateway clock's (every age here is: a wall-clock step ages nothing)."""
    return [("DELETE FROM watched WHERE id IN (SELECT id FROM watched WHERE at < ? "
             "ORDER BY id LIMIT 100)", (now - KEPT_SECONDS,)),
            ("INSERT OR IGNORE INTO watched (id, at) VALUES (?, ?)", (id_, now))]


def prune(conn: sqlite3.Connection, gateway_now: float, added: int) -> int:
    """Delete records past :data:`KEPT_SECONDS` on the gateway clock (a record from before
    migration 7 counts from its wall time), and over :data:`KEPT_ROWS`, oldest ids first,
    at most ``added`` + :data:`PRUNE_CHUNK` of them."""
    limit = added + PRUNE_CHUNK
    old = conn.execute(
        "DELETE FROM delivered WHERE id IN (SELECT id FROM delivered WHERE "
        "coalesce(kept_on, at) < ? ORDER BY id LIMIT ?)",
        (gateway_now - KEPT_SECONDS, limit)).rowcount
    count = conn.execute("SELECT count(*) FROM delivered").fetchone()[0] if added else 0
    over = max(0, min(limit, count - KEPT_ROWS))
    if over:
        conn.execute("DELETE FROM delivered WHERE id IN (SELECT id FROM delivered "
                     "ORDER BY id LIMIT ?)", (over,))
    return int(old) + over


def key_statements(key: str, id_: str, now: float) -> list[tuple[str, Sequence[Any]]]:
    """Statements to run with the put of ``id_``: forget a stale ``key``, then claim it
    (``now`` on the gateway clock, as :func:`watch_statements`).

    A fresh key makes the INSERT fail (primary key), which undoes the put: the caller then
    reads the first command's id with :func:`key_owner`.
    """
    return [("DELETE FROM producer_keys WHERE key = ? AND at < ?", (key, now - KEY_SECONDS)),
            ("DELETE FROM producer_keys WHERE key IN (SELECT key FROM producer_keys "
             "WHERE at < ? LIMIT 100)", (now - KEY_SECONDS,)),
            ("INSERT INTO producer_keys (key, id, at) VALUES (?, ?, ?)", (key, id_, now))]


KEY_OWNER_SQL: Final = "SELECT id FROM producer_keys WHERE key = ? AND at >= ?"
#: What command ``id`` says (device, name, params as stored), while it is queued or dead:
#: a keyed send compares it with what the same key now asks for.
CONTENT_SQL: Final = ("SELECT device, name, params FROM outbox WHERE id = ?1 UNION ALL "
                      "SELECT device, name, params FROM dead_letters WHERE id = ?1")


def where_of(id_: str, rows: Sequence[Sequence[Sequence[Any]]]) -> Where:
    """A :class:`Where` from the rows each of :data:`WHERE_SQL` read, in order (none: the
    query found nothing, or an older schema lacks its table)."""
    queued, in_flight, ahead, delivered, dead = rows
    if queued:
        attempts, last_error = queued[0][:2]
        if in_flight and in_flight[0][0]:
            return Where(id_, "in-flight", attempts=attempts, last_error=last_error)
        return Where(id_, "queued", position=ahead[0][0] if ahead else 0, attempts=attempts,
                     last_error=last_error)
    if delivered:
        return Where(id_, "delivered", batch=delivered[0][0], at=delivered[0][1])
    if dead:
        return Where(id_, "dead", reason=dead[0][0], detail=dead[0][1], attempts=dead[0][2])
    return Where(id_, "unknown")


#: The reads behind :func:`where_of`, in order, each with the id as its one parameter.
WHERE_SQL: Final = (
    "SELECT attempts, last_error, seq FROM outbox WHERE id = ?",
    "SELECT count(*) FROM inflight WHERE seq = (SELECT seq FROM outbox WHERE id = ?)",
    # ahead of it in claim order: a higher priority, or the same and put before it
    "SELECT count(*) FROM outbox AS o, (SELECT priority, seq FROM outbox WHERE id = ?) AS t "
    "WHERE o.priority < t.priority OR (o.priority = t.priority AND o.seq < t.seq)",
    "SELECT batch, at FROM delivered WHERE id = ?",
    "SELECT reason, detail, attempts FROM dead_letters WHERE id = ?",
)
