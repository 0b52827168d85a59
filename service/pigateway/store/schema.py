"""The queue file's schema: :data:`MIGRATIONS`, applied in order, tracked by
``PRAGMA user_version``; and this boot's reading of the gateway clock, taken at open."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from pigateway.errors import NewerSchema
from pigateway.store import clock, clock_row, delivery, lazylog
from pigateway.store.connection import first, run_transaction, translate

log = lazylog.getLogger("pigateway.store")

#: Schema migrations, applied in order and tracked by ``PRAGMA user_version``.
#: Never edit an entry that has shipped; append a new one.
MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,  -- no AUTOINCREMENT: it would rewrite a page every commit
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        size INTEGER NOT NULL,
        queued_at REAL NOT NULL,
        expires_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TABLE inflight (seq INTEGER PRIMARY KEY, claimed_at REAL NOT NULL);
    CREATE TABLE dead_letters (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        size INTEGER NOT NULL,
        queued_at REAL NOT NULL,
        expires_at REAL,
        attempts INTEGER NOT NULL,
        last_error TEXT,
        reason TEXT NOT NULL,
        detail TEXT,
        dead_at REAL NOT NULL
    );
    CREATE INDEX dead_letters_reason ON dead_letters (reason);
    CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        commands INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    );
    INSERT INTO totals VALUES (1, 0, 0);
    CREATE TRIGGER outbox_counted AFTER INSERT ON outbox BEGIN
        UPDATE totals SET commands = commands + 1, bytes = bytes + NEW.size WHERE id = 1;
    END;
    CREATE TRIGGER outbox_uncounted AFTER DELETE ON outbox BEGIN
        UPDATE totals SET commands = commands - 1, bytes = bytes - OLD.size WHERE id = 1;
    END;
    """,
    # 2: the inbox of commands from the broker (owned by pigateway.inbound)
    """
    CREATE TABLE inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        params TEXT NOT NULL,
        received_at REAL NOT NULL,
        expires_at REAL,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        last_error TEXT,
        status TEXT,
        result TEXT,
        finished_at REAL
    );
    CREATE INDEX inbox_state ON inbox (state, seq);
    CREATE INDEX inbox_finished ON inbox (finished_at) WHERE state = 'done';
    """,
    # 3: the gateway clock every expires_at is on (owned by pigateway.store.clock); the ttl each
    # command came with (expires_at no longer shares a clock with queued_at/received_at, so
    # the ttl cannot be derived from them), and when an inbound one was done on that clock
    # (the dedupe window; finished_at is wall time)
    """
    CREATE TABLE clock (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        boot_id TEXT NOT NULL,
        base REAL NOT NULL,
        reading REAL NOT NULL,
        wall REAL NOT NULL,
        synced INTEGER NOT NULL,
        gap_from REAL
    );
    ALTER TABLE outbox ADD COLUMN ttl REAL;
    ALTER TABLE dead_letters ADD COLUMN ttl REAL;
    ALTER TABLE inbox ADD COLUMN ttl REAL;
    ALTER TABLE inbox ADD COLUMN done_on REAL;
    """,
    # 4: dead letters are bounded (store.max_dead_letters, max_dead_bytes, dead_letter_ttl):
    # their count and bytes kept by triggers like the outbox's, and an index to find the
    # oldest.
    """
    ALTER TABLE totals ADD COLUMN dead_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE totals ADD COLUMN dead_bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE totals SET dead_count = (SELECT count(*) FROM dead_letters),
                      dead_bytes = (SELECT coalesce(sum(size), 0) FROM dead_letters)
        WHERE id = 1;
    CREATE TRIGGER dead_counted AFTER INSERT ON dead_letters BEGIN
        UPDATE totals SET dead_count = dead_count + 1, dead_bytes = dead_bytes + NEW.size
            WHERE id = 1;
    END;
    CREATE TRIGGER dead_uncounted AFTER DELETE ON dead_letters BEGIN
        UPDATE totals SET dead_count = dead_count - 1, dead_bytes = dead_bytes - OLD.size
            WHERE id = 1;
    END;
    CREATE INDEX dead_letters_age ON dead_letters (dead_at);
    """,
    # 5: priority lanes: 0 high, 1 normal, 2 low, claimed in (priority, seq)
    # order; results are high (they never wait behind a backlog of actions). Dead letters
    # keep theirs for a requeue.
    """
    ALTER TABLE outbox ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE dead_letters ADD COLUMN priority INTEGER NOT NULL DEFAULT 1;
    UPDATE outbox SET priority = 0 WHERE kind = 'result';
    UPDATE dead_letters SET priority = 0 WHERE kind = 'result';
    CREATE INDEX outbox_urgent ON outbox (priority, seq) WHERE priority != 1;
    """,
    # 6: delivery records of watched commands, and producer keys
    # (:mod:`pigateway.store.delivery`, ``send --wait``, ``send --id``, ``queue show``).
    delivery.SCHEMA,
    # 7: ages on the gateway clock, not the wall clock a Pi steps at NTP's first answer
    # (a dead letter of the minute before the step was pruned as "older than
    # dead_letter_ttl" at the next burial): when a dead letter died, when a delivery was
    # recorded. Producer keys and watches keep their column, now on the gateway clock.
    # The wall times of the rows from before are converted to gateway time here, by how far
    # apart the two clocks were at the last reading: the gateway clock may run months behind
    # (a file made before NTP's first answer, uncounted downtime), and an old wall time
    # compared as it is read that much younger (a key refused a new command for months; the
    # count bound pruned the newest dead letters first). No clock row: they stay wall time
    # (dead_on NULL: coalesce).
    """
    ALTER TABLE dead_letters ADD COLUMN dead_on REAL;
    UPDATE dead_letters SET dead_on = dead_at + (SELECT reading - wall FROM clock);
    CREATE INDEX dead_letters_on ON dead_letters (coalesce(dead_on, dead_at));
    ALTER TABLE delivered ADD COLUMN kept_on REAL;
    UPDATE delivered SET kept_on = at + (SELECT reading - wall FROM clock);
    UPDATE producer_keys SET at = at + coalesce((SELECT reading - wall FROM clock), 0);
    UPDATE watched SET at = at + coalesce((SELECT reading - wall FROM clock), 0);
    """,
    # 8: an in-flight mark is its seq alone. claimed_at was written by every claim and
    # never read (a drainer's open puts every row in flight back, whenever it was
    # claimed): 8 bytes a claimed row, 6 WAL pages for a claim of 500 where 3 do. The
    # table holds only what is in flight (bounded by the drainer's window), so rewriting
    # it is one short transaction whatever the backlog.
    """
    ALTER TABLE inflight DROP COLUMN claimed_at;
    """,
    # 9: the queue's count and bytes (totals.commands, totals.bytes) are kept by the verbs
    # that add and remove rows, one update a statement (store/outbox.py _insert, _uncount),
    # in the same transaction as the rows: the row triggers cost 13% of the instructions
    # a put_many row took (callgrind). The counts are right at this point (the triggers
    # kept them until now) and stay so. The dead letters' triggers stay: they are few.
    """
    DROP TRIGGER IF EXISTS outbox_counted;
    DROP TRIGGER IF EXISTS outbox_uncounted;
    """,
]


def ready(conn: sqlite3.Connection, path: Path) -> clock.Reading:
    """What every writer of the queue does once, at its open: bring the file to the newest
    schema and take this boot's reading of the gateway clock. Damage met on the way (that a
    producer's cheap check missed) is the store error it means."""
    try:
        migrate(conn, path)
        return clock_reading(conn, path)
    except sqlite3.Error as exc:
        raise translate(exc, path) from exc


def migrate(conn: sqlite3.Connection, path: Path, *, upto: int | None = None) -> None:
    """Bring the schema forward to the newest version (or to ``upto``: a salvage builds its
    copy at the damaged file's version), one transaction per step."""
    version = int(first(conn, "PRAGMA user_version")[0])
    conn.execute("SELECT name FROM sqlite_master").fetchall()  # a damaged schema fails here
    if version > len(MIGRATIONS):
        raise NewerSchema(path, version, len(MIGRATIONS))
    last = len(MIGRATIONS) if upto is None else upto
    if version >= last:
        return
    # A step may rewrite a whole backlog in one statement: its statement journal goes to a
    # temporary file, not into memory (connection.TEMP_STORE), while it runs.
    kept = int(first(conn, "PRAGMA temp_store")[0])
    conn.execute("PRAGMA temp_store = FILE")
    try:
        _steps(conn, path, version, last)
    finally:
        conn.execute(f"PRAGMA temp_store = {kept}")


def _steps(conn: sqlite3.Connection, path: Path, version: int, last: int) -> None:
    for number in range(version, last):
        def step(conn: sqlite3.Connection, number: int = number) -> None:
            if int(first(conn, "PRAGMA user_version")[0]) > number:
                return  # another process migrated meanwhile
            for statement in statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        run_transaction(conn, path, step)


def clock_reading(conn: sqlite3.Connection, path: Path) -> clock.Reading:
    """This boot's reading of the gateway clock; the write lock only at a boot's first open."""
    stored = clock_row.load(conn)
    if stored is not None and stored.boot_id == clock.boot_id():
        return stored
    if stored is not None and not clock.restarted(stored):
        log.info("the boot id reads %s here, the queue's clock was read in boot %s, and "
                 "CLOCK_BOOTTIME ran on since: the same boot seen through another /proc (a "
                 "container), not a reboot; the gateway clock continues as it was",
                 clock.boot_id(), stored.boot_id)
        return stored
    reading = run_transaction(conn, path, clock_row.establish)
    if stored is not None and reading.boot_id != stored.boot_id:
        off = reading.offset - stored.reading
        log.info("a new boot: TTLs continue from the last reading of the last one; %s",
                 "the time the gateway was off counts once the wall clock is synchronised"
                 if reading.gap_from is not None else
                 f"the {off:.0f} s the gateway was off count too" if off > 0 else
                 "the time the gateway was off cannot be known and does not count")
    return reading


def statements(script: str) -> Iterable[str]:
    """Split a migration script into statements (triggers contain ';' inside BEGIN..END)."""
    buffer = ""
    for line in script.strip().splitlines():
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


