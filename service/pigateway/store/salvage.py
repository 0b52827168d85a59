"""Salvage: every row still readable in a damaged queue file, copied into a new one.

The drainer moves a file that fails its integrity check aside (:mod:`pigateway.store.files`),
but one bad page must not strand the commands on every sound one: ``pigateway send`` into
such a file succeeds (its rows go to sound pages) and prints an id, which is a promise.
So before the file goes aside its rows are copied, table by table, into a new file built
with the same schema version (the normal open migrates it the rest of the way): commands,
in-flight marks, dead letters, producer keys, watches, delivery records, the inbox and
the gateway clock's row. The counts (``totals``) are rebuilt: the dead letters' by the
new file's triggers, the queue's from the rows copied (:func:`_recount`; at schema 8 and
before, its triggers did it as well, to the same figures).

A table is read in key order, a chunk at a time, from a read-only connection (the
damaged file, its ``-wal`` included, is left byte for byte as it was). A damaged leaf
makes a read fail: a table with rowids is read on from the first rowid past the damage
(found by probing, bounded), one without is read from its other end back to the damage.
What could not be read is counted: exactly for commands and dead letters (the damaged
file's own ``totals`` row says how many there were, when it can be read), as damaged
stretches for the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

from pigateway.config import StoreConfig
from pigateway.store import lazylog, schema
from pigateway.store.connection import connect
from pigateway.text import plural

log = lazylog.getLogger("pigateway.store")

#: Rows read (and written) at a time.
CHUNK = 500
#: Probes spent at most finding the end of one damaged stretch of rowids.
_PROBES = 200
#: Tables not copied: their rows are derived (``totals`` is rebuilt: :func:`_recount`).
_DERIVED = frozenset({"totals", "sqlite_sequence"})
#: The tables whose rows the damaged file counted, and the ``totals`` column counting them.
_COUNTED = {"outbox": "commands", "dead_letters": "dead_count"}
#: How a report names a table's rows.
_NAMES = {"outbox": "commands", "dead_letters": "dead letters", "producer_keys": "producer keys",
          "watched": "watches", "delivered": "delivery records", "inbox": "inbox rows",
          "inflight": "in-flight marks", "clock": "clock rows"}


@dataclasses.dataclass
class Salvaged:
    """What :func:`salvage` copied and what it could not read."""

    #: rows copied, by table
    copied: dict[str, int] = dataclasses.field(default_factory=dict)
    #: rows known to be lost, by table (the damaged file counted them)
    lost: dict[str, int] = dataclasses.field(default_factory=dict)
    #: stretches of a table that could not be read, by table
    damaged: dict[str, int] = dataclasses.field(default_factory=dict)
    #: why nothing at all could be read (``None``: the file opened)
    unreadable: str | None = None

    def summary(self) -> str:
        """One line for the journal: what was salvaged, what could not be read."""
        done = ", ".join(f"{self.copied.get(t, 0)} {_NAMES.get(t, t)}"
                         for t in ("outbox", "dead_letters", "producer_keys", "delivered",
                                   "watched", "inbox"))
        if self.unreadable is not None:
            return (f"salvaged 0 commands: could not read the file at all "
                    f"({self.unreadable}); how many it held is unknown")
        missing = [f"{count} {_NAMES.get(t, t)}" for t, count in self.lost.items() if count]
        missing += [f"{plural(count, 'damaged stretch', 'damaged stretches')} of "
                    f"{_NAMES.get(t, t)} (their rows: unknown)"
                    for t, count in self.damaged.items() if count and t not in self.lost]
        said = f"salvaged {done} into the fresh queue"
        return f"{said}; could not read {', '.join(missing)}" if missing else \
            f"{said}; every row was readable"

    @property
    def complete(self) -> bool:
        """Whether every row was read (then the journal line is a warning, else an error)."""
        return self.unreadable is None and not any(self.lost.values()) and not any(
            self.damaged.values())


def salvage(bad: Path, into: Path, config: StoreConfig,
            opened: Callable[[], None] = lambda: None) -> Salvaged:
    """Copy every readable row of ``bad`` into a new file ``into`` (made here, closed and
    flushed to disk on return; none made when nothing could be opened). ``opened`` is
    called once the read-only connection has read the file's schema (or failed to)."""
    report = Salvaged()
    try:
        return _salvage(bad, into, config, report, opened)
    finally:
        opened()  # at least once, whatever happened (the caller's is safe to call twice)


def _salvage(bad: Path, into: Path, config: StoreConfig, report: Salvaged,
             opened: Callable[[], None]) -> Salvaged:
    try:
        source = sqlite3.connect(f"file:{urllib.parse.quote(str(bad))}?mode=ro", uri=True,
                                 isolation_level=None)
    except sqlite3.Error as exc:
        report.unreadable = str(exc)[:200]
        return report
    with contextlib.closing(source):
        try:
            version = int(source.execute("PRAGMA user_version").fetchone()[0])
            tables = _tables(source)
        except sqlite3.Error as exc:  # the header or the schema itself is damaged
            report.unreadable = str(exc)[:200]
            return report
        finally:
            opened()
        target = connect(config.replace(path=into))
        with contextlib.closing(target):
            schema.migrate(target, into, upto=min(version, len(schema.MIGRATIONS)))
            for table in [t for t in _tables(target) if t in tables]:
                _copy(source, target, table, report)
            _recount(target)
            _count_lost(source, report)
            target.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    _flush(into)
    return report


def _recount(target: sqlite3.Connection) -> None:
    """The copy's queue counts, from its rows (the verbs keep them from here on: schema
    migration 9). One read of the table, in the copy the drainer alone has open."""
    if target.execute("SELECT 1 FROM sqlite_master WHERE name = 'totals'").fetchone() is None:
        return  # a copy of a file with no schema yet
    target.execute("BEGIN IMMEDIATE")
    try:
        target.execute("UPDATE totals SET commands = (SELECT count(*) FROM outbox), "
                       "bytes = (SELECT coalesce(sum(size), 0) FROM outbox) WHERE id = 1")
        target.execute("COMMIT")
    except BaseException:
        if target.in_transaction:
            target.execute("ROLLBACK")
        raise


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [str(name) for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name") if name not in _DERIVED]


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, int]]:
    """(name, type, position in the primary key) of each column."""
    return [(str(row[1]), str(row[2]).upper(), int(row[5]))
            for row in conn.execute(f'PRAGMA table_info("{table}")')]


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, table: str,
          report: Salvaged) -> None:
    """Copy the readable rows of ``table``: the columns both files have, in key order."""
    theirs = {name for name, _, _ in _columns(source, table)}
    mine = _columns(target, table)
    columns = [name for name, _, _ in mine if name in theirs]
    keys = [name for name, _, pk in mine if pk]
    with_rowid = _has_rowid(source, table)
    alias = len(keys) == 1 and dict((n, t) for n, t, _ in mine)[keys[0]] == "INTEGER"
    names = ", ".join(f'"{c}"' for c in columns)
    if with_rowid and not alias:
        names = f"rowid, {names}"
    insert = (f'INSERT OR IGNORE INTO "{table}" ({names}) '
              f"VALUES ({', '.join('?' * (names.count(',') + 1))})")
    read = _by_rowid(source, table, names, report) if with_rowid else \
        _by_key(source, table, names, f'"{keys[0]}"', report)  # ours have one
    copied = 0
    for rows in read:
        target.execute("BEGIN IMMEDIATE")
        try:
            copied += sum(target.execute(insert, row).rowcount for row in rows)
            target.execute("COMMIT")
        except BaseException:
            if target.in_transaction:  # SQLite rolled back itself on a full disk: its
                target.execute("ROLLBACK")  # "no transaction is active" would hide why
            raise
    report.copied[table] = copied


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        conn.execute(f'SELECT rowid FROM "{table}" LIMIT 0')
    except sqlite3.OperationalError:  # WITHOUT ROWID
        return False
    return True


def _by_rowid(conn: sqlite3.Connection, table: str, names: str,
              report: Salvaged) -> Iterator[list[tuple[Any, ...]]]:
    """Chunks of rows in rowid order. A chunk that meets damage is read again row by row
    up to it; from the damage on, reading goes on at the first rowid past it."""
    select = f'SELECT rowid, {names} FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT ?'
    start: int | None = -(1 << 63)
    careful = 0  # rows still to read one at a time (near damage)
    while start is not None:
        size = 1 if careful else CHUNK
        try:
            rows = conn.execute(select, (start, size)).fetchall()
        except sqlite3.DatabaseError:
            if size > 1:
                careful = CHUNK
                continue
            report.damaged[table] = report.damaged.get(table, 0) + 1
            start = _past_damage(conn, table, start)
            continue
        if not rows:
            return
        careful = max(0, careful - len(rows))
        yield [tuple(row[1:]) for row in rows]
        start = int(rows[-1][0]) + 1 if len(rows) == size else None


def _readable_from(conn: sqlite3.Connection, table: str, rowid: int) -> bool:
    try:
        conn.execute(f'SELECT rowid FROM "{table}" WHERE rowid >= ? ORDER BY rowid LIMIT 1',
                     (rowid,)).fetchall()
    except sqlite3.DatabaseError:
        return False
    return True


def _past_damage(conn: sqlite3.Connection, table: str, bad: int) -> int | None:
    """The first rowid after ``bad`` from which ``table`` reads again (``None``: none
    within the probes): doubling steps to a readable point, then halving back to the edge."""
    step, probes = 1, 0
    while not _readable_from(conn, table, bad + step):
        step *= 2
        probes += 1
        if probes > _PROBES // 2 or bad + step > (1 << 63) - 1:
            return None
    low, high = bad + step // 2, bad + step  # low unreadable (or bad), high readable
    while high - low > 1 and probes < _PROBES:
        middle = (low + high) // 2
        if _readable_from(conn, table, middle):
            high = middle
        else:
            low = middle
        probes += 1
    return high


def _by_key(conn: sqlite3.Connection, table: str, names: str, key: str,
            report: Salvaged) -> Generator[list[tuple[Any, ...]], None, None]:
    """Chunks of a table without rowids (one key column) in key order; at damage, the rest
    from its other end, backwards, down to the damage (a stretch between two damaged
    leaves is lost with them)."""
    reached = yield from _walk(conn, table, names, key, forward=True, beyond=None)
    if reached is _END:
        return
    report.damaged[table] = report.damaged.get(table, 0) + 1
    yield from _walk(conn, table, names, key, forward=False, beyond=reached)


_END: Any = object()


def _walk(conn: sqlite3.Connection, table: str, names: str, key: str, *, forward: bool,
          beyond: Any) -> Generator[list[tuple[Any, ...]], None, Any]:
    """Rows in key order (``forward``) or backwards down to ``beyond`` (exclusive); returns
    the last key read when damage stopped it, :data:`_END` when it read to the end. A
    chunk that meets damage is read again row by row up to it."""
    last: Any = None
    careful = False
    while True:
        terms, values = [], []
        if last is not None:
            terms.append(f"{key} {'>' if forward else '<'} ?")
            values.append(last)
        if not forward and beyond is not None:
            terms.append(f"{key} > ?")
            values.append(beyond)
        size = 1 if careful else CHUNK
        where = f" WHERE {' AND '.join(terms)}" if terms else ""
        sql = (f'SELECT {key}, {names} FROM "{table}"{where} '
               f"ORDER BY {key} {'ASC' if forward else 'DESC'} LIMIT {size}")
        try:
            rows = conn.execute(sql, values).fetchall()
        except sqlite3.DatabaseError:
            if careful:
                return last
            careful = True
            continue
        if rows:
            yield [tuple(row[1:]) for row in rows]
            last = rows[-1][0]
        if len(rows) < size:
            return _END


def _count_lost(source: sqlite3.Connection, report: Salvaged) -> None:
    """Commands and dead letters the damaged file counted and the copy did not get (its
    ``totals`` row unreadable: only the damaged stretches can be said)."""
    for table, column in _COUNTED.items():
        try:
            row = source.execute(f"SELECT {column} FROM totals WHERE id = 1").fetchone()
        except sqlite3.Error:
            continue
        if row is not None:
            report.lost[table] = max(0, int(row[0]) - report.copied.get(table, 0))


def _flush(path: Path) -> None:
    """The copy on disk before the damaged file goes aside (a power cut keeps one of them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
