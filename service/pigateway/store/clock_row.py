"""The ``clock`` table: the one row that keeps the gateway clock (:mod:`pigateway.clock`)
across boots."""

from __future__ import annotations

import sqlite3

from pigateway.clock import Reading, beat, current

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


def establish(conn: sqlite3.Connection) -> Reading:
    """Inside a write transaction: this boot's reading, written if it is new."""
    stored = load(conn)
    reading = current(stored)
    if reading != stored:
        save(conn, reading)
    return reading


def heartbeat(conn: sqlite3.Connection) -> Reading:
    """Inside a write transaction: write a new reading of this boot (the drainer's beat)."""
    reading = beat(current(load(conn)))
    save(conn, reading)
    return reading
