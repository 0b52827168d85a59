"""The ``clock`` table: the one row that keeps the gateway clock (:mod:`pigateway.store.clock`)
across boots."""

from __future__ import annotations

import sqlite3

from pigateway.store.clock import GatewayClock, Reading, beat, current

_COLUMNS = "boot_id, base, reading, wall, synced, gap_from"


def load(conn: sqlite3.Connection) -> Reading | None:
    """The stored row, or ``None`` (a queue file that never had one)."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM clock WHERE id = 1").fetchone()
    if row is None:
        return None
    return Reading(str(row[0]), float(row[1]), float(row[2]), float(row[3]), bool(row[4]),
                   None if row[5] is None else float(row[5]))


def save(conn: sqlite3.Connection, reading: Reading) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO clock (id, {_COLUMNS}) VALUES (1, ?, ?, ?, ?, ?, ?)",
        (reading.boot_id, reading.offset, reading.reading, reading.wall, int(reading.synced),
         reading.gap_from))


def follow(conn: sqlite3.Connection, gateway_clock: GatewayClock) -> None:
    """Inside a transaction, before anything in it reads the clock: ``gateway_clock``
    takes the reading the file holds. The drainer's heartbeat moves it (it counts a
    downtime once NTP answers); a producer or a second :class:`~pigateway.store.Store`
    open since before would otherwise put on the offset it read at its open, and its
    TTLs and producer keys would be that downtime old on arrival. One row, one page that
    every commit reads anyway."""
    gateway_clock.adopt(load(conn))


def establish(conn: sqlite3.Connection) -> Reading:
    """Inside a write transaction: this boot's reading, written if it is new."""
    stored = load(conn)
    reading = current(stored)
    if reading != stored:
        save(conn, reading)
    return reading


#: The times of events kept on the gateway clock (every age the file keeps, migration 7).
STAMPS = (("dead_letters", "dead_on"), ("delivered", "kept_on"), ("producer_keys", "at"),
          ("watched", "at"), ("inbox", "done_on"))
#: The tables whose rows carry a deadline (``expires_at``) counted from their ``ttl``.
DEADLINES = ("outbox", "inbox")


def heartbeat(conn: sqlite3.Connection) -> Reading:
    """Inside a write transaction: write a new reading of this boot (the drainer's beat).

    When it counts the downtime (the clock jumps forward), the events of this boot before
    it jump too: they happened after the downtime, and would be aged by it (a key claimed
    before NTP answered lost its window, a dead letter was pruned as older than its ttl, a
    command queued offline after the boot expired minutes after its put). Once a boot, at
    the jump: the deadlines' update reads the whole outbox, and writes the rows of this
    boot only."""
    last = current(load(conn))
    reading = beat(last)
    if reading.offset > last.offset:
        jump = reading.offset - last.offset
        for table, column in STAMPS:  # this boot's stamps are all past its start, offset
            conn.execute(f"UPDATE {table} SET {column} = {column} + ? WHERE {column} > ?",
                         (jump, last.offset))
        for table in DEADLINES:  # a deadline set in this boot (put or requeued after it)
            conn.execute(f"UPDATE {table} SET expires_at = expires_at + ? WHERE "
                         "expires_at - ttl > ?", (jump, last.offset))
    save(conn, reading)
    return reading
