"""The outbox's verbs as they run inside the writer's transaction: put (with the overflow
policy and the free-space rule), claim, ack, nack, release, dead-letter, the bounds of
the dead letters, requeue and purge. :class:`~pigateway.store.queue.Store` queues them on
its writer; nothing here awaits."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, QueueFull, StoreCorrupt, StoreFull
from pigateway.store import lazylog
from pigateway.store.claims import UNCLAIMED, Cursors
from pigateway.store.clock import GatewayClock
from pigateway.store.connection import chunks, fetch_all, first, marks
from pigateway.store.values import (
    COMMAND_COLUMNS,
    Command,
    NewCommand,
    Unreadable,
    own_ttl,
    requeued_expiry,
    row_to_command,
)
from pigateway.text import format_size, plural

log = lazylog.getLogger("pigateway.store")

#: Rows one transaction of a sweep (expiry, purge, requeue, drop-oldest, dead-letter
#: pruning) handles at most: each chunk is its own commit, so the watchdog's ping,
#: producers and the drain get the writer between chunks, and a kill keeps the chunks done.
SWEEP_CHUNK = 500
#: Command ids named in one log record at most.
LOGGED_IDS = 100
#: When a dead letter died, on the gateway clock (migration 7; before it, its wall time):
#: what its age is counted from. Exactly the expression of the index dead_letters_on.
DIED_ON = "coalesce(dead_on, dead_at)"
#: The dead-letter reason of what came in and was no command (an ingested payload that is
#: no valid row): kept as evidence, never requeued, by id or in bulk.
NEVER_SENT_AGAIN = "invalid"

_INSERT = ("INSERT INTO outbox (id, kind, device, name, params, size, queued_at, expires_at, "
           "ttl, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
#: Where ``_INSERT``'s rows hold their size.
_SIZE = 5
#: Run in a put's transaction after its rows (the inbox's record of a result).
Then = Callable[[sqlite3.Connection], None]


class Put:
    """Prepared rows of one put, the items they came from, what runs with them, and the
    offset of the gateway clock their ``expires_at`` were counted on (the clock the file
    holds may have moved by the commit: :meth:`Outbox.insert_group` moves them with it)."""

    __slots__ = ("items", "offset", "rows", "then")

    def __init__(self, rows: list[tuple[Any, ...]], items: list[NewCommand],
                 then: Then | None, offset: float = 0.0) -> None:
        self.rows, self.items, self.then, self.offset = rows, items, then, offset


#: The priority tiers in claim order (high, normal, low), each a WHERE term. Most rows are
#: normal and are read in put order from the table itself; high and low ones come from the
#: partial index ``outbox_urgent`` (schema migration 5), whose ``priority != 1`` term their
#: queries repeat so that SQLite may use it. A normal put or ack so writes no index page (a
#: full (priority, seq) index cost 38% more bytes written per command). A claim reads on
#: from where the last one ended (:mod:`pigateway.store.claims`), so neither the rows in
#: flight nor a backlog of low rows older than the normal ones is read again at each claim.
TIERS = ("priority != 1 AND priority < 1", "priority = 1", "priority != 1 AND priority > 1")


def tier_queries(columns: str, *, unclaimed: bool, reverse: bool = False) -> list[str]:
    """One ``SELECT columns ... LIMIT ?`` a tier, in claim order (``reverse``: the order in
    which drop-oldest gives rows up: low first), oldest first within a tier."""
    tiers = reversed(TIERS) if reverse else TIERS
    only = f" AND {UNCLAIMED}" if unclaimed else ""
    return [f"SELECT {columns} FROM outbox WHERE {tier}{only} ORDER BY priority, seq LIMIT ?"
            for tier in tiers]


def in_tiers(conn: sqlite3.Connection, queries: Sequence[str],
             limit: int) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows from ``queries`` (from :func:`tier_queries`), tier after tier."""
    rows: list[tuple[Any, ...]] = []
    for query in queries:
        if len(rows) >= limit:
            break
        rows += fetch_all(conn, query, (limit - len(rows),))
    return rows


_DROP_ORDER = tier_queries("seq, size", unclaimed=True, reverse=True)


def check_disk(conn: sqlite3.Connection, config: StoreConfig, headroom: int = 0) -> None:
    """Keep ``min_free_bytes`` free; pages free inside the file count as free.

    The file never shrinks: a drained backlog leaves its pages inside it, where new
    commands go first. Without counting them a queue that once filled the disk would
    refuse every command forever, even when empty.
    """
    if config.min_free_bytes <= 0:
        return
    need = config.min_free_bytes + headroom
    stat = os.statvfs(config.path.parent)
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        free += (first(conn, "PRAGMA freelist_count")[0]
                 * first(conn, "PRAGMA page_size")[0])
    if free < need:
        raise StoreFull(f"only {format_size(free)} free under {config.path.parent}; "
                        "pigateway keeps store.min_free_bytes = "
                        f"{format_size(config.min_free_bytes)} free. Queued commands "
                        "are kept; new ones are refused until space is freed")


class Outbox:
    """The verbs, each run on the writer's connection inside its transaction. What a verb
    has to say once its work commits goes to ``after_commit`` (the writer says it after
    the COMMIT, never for work a rollback undid)."""

    def __init__(self, config: StoreConfig, gateway_clock: GatewayClock,
                 after_commit: list[Callable[[], None]]) -> None:
        self.config = config
        self.clock = gateway_clock
        self.path: Path = config.path
        self.after_commit = after_commit
        #: where the drainer's next claim of each lane starts (:mod:`.claims`)
        self.cursors = Cursors(COMMAND_COLUMNS, TIERS)

    def check_disk(self, conn: sqlite3.Connection, headroom: int = 0) -> None:
        check_disk(conn, self.config, headroom)

    def refusal(self, conn: sqlite3.Connection) -> QueueFull | StoreFull | None:
        """What a put of one small command would be refused with now (None: it would be
        taken), by the same rules as a put: the disk reserve, then a full queue under
        ``reject``. The service shows it: producers are other processes, and their
        refusals would otherwise go unseen by every view."""
        try:
            self.check_disk(conn)
        except StoreFull as exc:
            return exc
        if self.config.overflow != "reject":
            return None
        count, size = first(conn, "SELECT commands, bytes FROM totals WHERE id = 1")
        if count >= self.config.max_commands or size >= self.config.max_bytes:
            return QueueFull(f"the queue is full ({count} commands, {size} bytes; "
                             f"store.max_commands={self.config.max_commands}, "
                             f"store.max_bytes={self.config.max_bytes}); new commands are "
                             "refused until it drains")
        return None

    def insert_group(self, conn: sqlite3.Connection,
                     group: list[Put]) -> list[list[Command] | Exception]:
        """Consecutive puts in one insert; each refused alone by the limits."""
        self.check_disk(conn)
        count, size = first(conn, "SELECT commands, bytes FROM totals WHERE id = 1")
        outcomes: list[list[Command] | Exception] = []
        rows: list[tuple[Any, ...]] = []
        for job in group:
            prepared = self._on_this_clock(job)
            need_count, need_bytes = len(prepared), sum([row[5] for row in prepared])
            if rows and (count + need_count > self.config.max_commands
                         or size + need_bytes > self.config.max_bytes):
                # drop-oldest may have to drop rows of this very group: write them first
                _insert(conn, rows)
                rows = []
            refused, freed_count, freed_bytes = self._make_room(
                conn, count, size, need_count, need_bytes)
            if refused is not None:
                outcomes.append(refused)
                continue
            count = count - freed_count + need_count
            size = size - freed_bytes + need_bytes
            rows.extend(prepared)
            if job.then is not None:
                job.then(conn)
            # Command's fields in order (id, device, name, params, kind, queued_at,
            # expires_at, attempts, last_error, size, seq, params_json): by keyword, a
            # put_many of 1,000 spent twice as long building them
            outcomes.append([Command(r[0], r[2], r[3], item.params, r[1], r[6], r[7], 0, None,
                                     r[5], 0, r[4])
                             for r, item in zip(prepared, job.items, strict=True)])
        _insert(conn, rows)
        return outcomes

    def _on_this_clock(self, job: Put) -> list[tuple[Any, ...]]:
        """``job``'s rows with their deadlines on the clock the transaction read (the
        drainer counted a downtime since they were made: the clock jumped, and a deadline
        left behind would run out that much early)."""
        jump = self.clock.reading.offset - job.offset
        if not jump:
            return job.rows
        return [row if row[7] is None else (*row[:7], row[7] + jump, *row[8:])
                for row in job.rows]

    def _make_room(self, conn: sqlite3.Connection, count: int, size: int,
                   need_count: int, need_bytes: int) -> tuple[Exception | None, int, int]:
        """Apply the overflow policy: (refusal or ``None``, commands freed, bytes freed)."""
        over_count = count + need_count - self.config.max_commands
        over_bytes = size + need_bytes - self.config.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return None, 0, 0
        limits = (f"store.max_commands = {self.config.max_commands:,}, "
                  f"store.max_bytes = {format_size(self.config.max_bytes)}")
        if (self.config.overflow == "reject" or need_count > self.config.max_commands
                or need_bytes > self.config.max_bytes):
            return QueueFull(f"the queue is full ({plural(count, 'command')}, "
                             f"{format_size(size)}; {limits}); "
                             "the command was not queued"), 0, 0
        freed = self._drop_oldest(conn, max(over_count, 0), max(over_bytes, 0), need_count)
        if freed is None:
            return QueueFull(f"the queue is full and every queued command is in flight "
                             f"({limits}); the command was not queued"), 0, 0
        return None, *freed

    def _drop_oldest(self, conn: sqlite3.Connection, count: int, nbytes: int,
                     need_count: int) -> tuple[int, int] | None:
        """Dead-letter the oldest queued commands (never in-flight ones) to free room: the
        lowest priority first (a backlog of actions never pushes out a result or a high
        command while a normal or low one is queued), the oldest first within it.

        A queue already over its limits (they were lowered) is not trimmed all at once:
        a put of ``need_count`` commands drops at most ``need_count`` plus
        :data:`SWEEP_CHUNK`, and is queued; the next puts go on trimming.
        """
        most = need_count + SWEEP_CHUNK
        rows = in_tiers(conn, _DROP_ORDER, most)
        dropped: list[int] = []
        freed = 0
        for seq, size in rows:
            if len(dropped) >= count and freed >= nbytes:
                break
            dropped.append(seq)
            freed += size
        if (len(dropped) < count or freed < nbytes) and len(rows) < most:
            return None  # not enough outside the in-flight rows
        for chunk in chunks(dropped, SWEEP_CHUNK):
            self._bury_seqs(conn, chunk, "overflow",
                            "dropped to make room (store.overflow = drop-oldest)")
        return len(dropped), freed

    # ---- verbs, each inside the writer's transaction

    def claim(self, conn: sqlite3.Connection, limit: int) -> tuple[list[Command], bool]:
        """Claim up to ``limit`` live rows, burying at most :data:`SWEEP_CHUNK` expired
        ones on the way: (claimed, whether the budget ran out with more rows to look at)."""
        claimed: list[Command] = []
        gateway_now = self.clock.now()
        buried = 0
        # dead letters written by others (the inbox's records of unreadable messages) and
        # aged ones are pruned here too, a chunk at a time
        self.prune_dead(conn, 0)
        while len(claimed) < limit and buried < SWEEP_CHUNK:
            room = min(limit - len(claimed), SWEEP_CHUNK - buried)
            tiers = self.cursors.unclaimed(conn, room)
            rows = [row for tier in tiers for row in tier]
            if not rows:
                return claimed, False
            expired = {row[0] for row in rows if row[8] is not None and row[8] <= gateway_now}
            if expired:
                self._bury_seqs(conn, sorted(expired), "expired",
                                "its ttl ran out before it could be sent")
                buried += len(expired)
            commands, unreadable = _read_rows(rows, expired)
            if unreadable:  # one row, one failure: never every claim's after it
                why = next(iter(unreadable.values()))
                self._bury_seqs(conn, sorted(unreadable), NEVER_SENT_AGAIN,
                                f"its stored params cannot be read: {why}")
                buried += len(unreadable)
            conn.executemany("INSERT INTO inflight (seq) VALUES (?)",
                             [(command.seq,) for command in commands])
            self.cursors.claimed(tiers, but=expired | unreadable.keys())
            claimed.extend(commands)
        return claimed, buried >= SWEEP_CHUNK

    def ack(self, conn: sqlite3.Connection, ids: Sequence[str]) -> int:
        """Delete delivered commands; the number deleted.

        Fewer deleted than acknowledged is looked into (a scan of the table itself, only
        then): a row the ``outbox.id`` index no longer finds is still claimed and sent by
        ``seq``, so its ack would delete nothing, silently, and it would go out again at
        every claim. That is :class:`StoreCorrupt` (the service ends; its next start finds
        the file bad and quarantines it, keeping every row); rows simply gone are not."""
        total = 0
        for chunk in chunks(list(ids), SWEEP_CHUNK):
            _unmark(conn, chunk)  # deleted next: nothing goes back, the cursors hold
            in_list = marks(len(chunk))
            deleted = _uncount(conn, conn.execute(
                f"DELETE FROM outbox WHERE id IN ({in_list}) RETURNING size", chunk))
            if deleted < len(set(chunk)):
                _check_indexed(conn, self.path, chunk)
            total += deleted
        return total

    def nack(self, conn: sqlite3.Connection, ids: Sequence[str], error: str) -> None:
        for chunk in chunks(list(ids), SWEEP_CHUNK):
            self.release(conn, chunk)
        self.charge(conn, ids, error)

    def charge(self, conn: sqlite3.Connection, ids: Sequence[str], error: str) -> set[str]:
        """Count an attempt on rows (claimed ones stay claimed); bury those past
        ``max_attempts``. Returns the ids buried."""
        buried: set[str] = set()
        for chunk in chunks(list(ids), SWEEP_CHUNK):
            in_list = marks(len(chunk))
            conn.execute(f"UPDATE outbox SET attempts = attempts + 1, last_error = ? "
                         f"WHERE id IN ({in_list})", (error, *chunk))
            spent = fetch_all(conn, f"SELECT seq, id FROM outbox WHERE id IN ({in_list}) AND "
                              "attempts >= ?", (*chunk, self.config.max_attempts))
            if spent:
                self._bury_seqs(conn, [row[0] for row in spent], "max-attempts",
                                f"gave up after {self.config.max_attempts} attempts; "
                                f"last error: {error}")
                buried.update(row[1] for row in spent)
        return buried

    def _bury(self, conn: sqlite3.Connection, where: str, params: Sequence[Any],
              reason: str, detail: str | None) -> None:
        seqs = [row[0] for row in fetch_all(conn, f"SELECT seq FROM outbox WHERE {where}",
                                            params)]
        self._bury_seqs(conn, seqs, reason, detail)

    def _bury_seqs(self, conn: sqlite3.Connection, seqs: Sequence[int], reason: str,
                   detail: str | None) -> None:
        """Move rows to ``dead_letters`` with a reason, keep dead letters within their
        bounds, and say so once in the log after the commit."""
        if not seqs:
            return
        buried = _move_to_dead(conn, seqs, reason, detail, self.clock.now())
        self.after_commit.append(lambda: _log_buried(buried, reason, detail))
        self.prune_dead(conn, len(buried))

    def prune_dead(self, conn: sqlite3.Connection, added: int) -> int:
        """Delete the oldest dead letters over ``store.max_dead_letters``,
        ``store.max_dead_bytes`` or older than ``store.dead_letter_ttl``: at most what was
        just ``added`` plus :data:`SWEEP_CHUNK` in this transaction, oldest first."""
        config = self.config
        count, nbytes = first(conn, "SELECT dead_count, dead_bytes FROM totals WHERE id = 1")
        over_count = count - config.max_dead_letters
        over_bytes = nbytes - config.max_dead_bytes
        # the age on the gateway clock (a wall-clock step forward ages nothing)
        ttl = config.dead_letter_ttl
        cutoff = self.clock.now() - ttl if ttl > 0 else None
        if over_count <= 0 and over_bytes <= 0 and cutoff is None:
            return 0
        doomed = _doomed(conn, added, over_count, over_bytes, cutoff)
        for chunk in chunks(doomed, SWEEP_CHUNK):
            conn.execute(f"DELETE FROM dead_letters WHERE rowid IN ({marks(len(chunk))})", chunk)
        if doomed:
            limits = (f"store.max_dead_letters={config.max_dead_letters}, "
                      f"store.max_dead_bytes={config.max_dead_bytes}, "
                      f"store.dead_letter_ttl={config.dead_letter_ttl:g}")
            self.after_commit.append(lambda: log.warning(
                "pruned the oldest %s to keep within %s", plural(len(doomed), "dead letter"),
                limits))
        return len(doomed)

    def requeue_one(self, conn: sqlite3.Connection, id_: str, *, expired: bool) -> int:
        row = conn.execute("SELECT reason FROM dead_letters WHERE id = ? AND "
                           "kind IN ('action', 'result', 'forward')", (id_,)).fetchone()
        if row is None:
            return 0
        if row[0] == NEVER_SENT_AGAIN:
            raise InvalidCommand(
                f"dead letter {id_} is invalid: what came in was no command, and it is kept as "
                f"evidence, never sent: read it with pigateway queue show {id_}")
        if row[0] == "expired" and not expired:
            raise InvalidCommand(
                f"dead letter {id_} expired: its ttl ran out, and it may even have been "
                "delivered with the broker's PUBACK lost. A stale command is sent again only "
                "when asked explicitly: pigateway queue requeue-dead --id ID --expired")
        return self._requeue_rows(conn, "id = ?", (id_,))

    def requeue_chunk(self, conn: sqlite3.Connection, bound: int) -> int:
        # only what can be sent: the inbound records (kind 'inbound', messages that had no
        # id to answer) and what was never a command stay where they are, as evidence;
        # expired ones stay dead
        return self._requeue_rows(
            conn, "rowid IN (SELECT rowid FROM dead_letters WHERE rowid <= ? AND reason NOT IN "
            f"('expired', '{NEVER_SENT_AGAIN}') AND kind IN ('action', 'result', 'forward') "
            "ORDER BY dead_at, queued_at LIMIT ?)",
            (bound, SWEEP_CHUNK))

    def _requeue_rows(self, conn: sqlite3.Connection, where: str,
                      params: Sequence[Any]) -> int:
        return _requeue_rows(conn, where, params, self.clock.now())

    def resume_in_flight(self, conn: sqlite3.Connection) -> int:
        """Whatever was in flight when the last drainer died is queued again, first."""
        self.cursors.forget()
        return conn.execute("DELETE FROM inflight").rowcount

    def release(self, conn: sqlite3.Connection, ids: Sequence[str]) -> None:
        """Claimed rows go back, at the head of their tier: the next claim reads from there."""
        self.cursors.forget()
        _unmark(conn, ids)

    def bury_new(self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], reason: str,
                 detail: str) -> None:
        """Prepared rows that never were queued, straight into the dead letters (an ingested
        message that is not a command), within the dead letters' bounds."""
        now, gateway_now = time.time(), self.clock.now()
        conn.executemany(
            "INSERT INTO dead_letters (id, kind, device, name, params, size, queued_at, "
            "expires_at, ttl, priority, attempts, last_error, reason, detail, dead_at, "
            "dead_on) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, ?, ?, ?, ?)",
            [(*row, reason, detail, now, gateway_now) for row in rows])
        self.prune_dead(conn, len(rows))

    def dead_letter(self, conn: sqlite3.Connection, ids: Sequence[str], reason: str,
                    detail: str | None) -> None:
        self._bury(conn, _ids_sql(ids), list(ids), reason, detail)


def _insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Queue ``rows`` (in ``_INSERT``'s order) and count them in ``totals``, in the same
    transaction. Every verb that adds or removes an outbox row counts it here or in
    :func:`_uncount` (migration 9: a trigger did it a row at a time, 13% of a put_many row's
    instructions)."""
    if rows:
        conn.executemany(_INSERT, rows)
        _count(conn, len(rows), sum([row[_SIZE] for row in rows]))


def _uncount(conn: sqlite3.Connection, deleted: Iterable[Sequence[Any]]) -> int:
    """Take the rows a ``DELETE FROM outbox ... RETURNING size, ...`` removed off the
    counts; how many there were."""
    sizes = [row[0] for row in deleted]
    if sizes:
        _count(conn, -len(sizes), -sum(sizes))
    return len(sizes)


def _count(conn: sqlite3.Connection, commands: int, nbytes: int) -> None:
    conn.execute("UPDATE totals SET commands = commands + ?, bytes = bytes + ? WHERE id = 1",
                 (commands, nbytes))


def _check_indexed(conn: sqlite3.Connection, path: object, ids: Sequence[str]) -> None:
    """:class:`StoreCorrupt` if a row of ``ids`` is in the table where ``outbox.id``'s
    index does not find it (an ack that deleted fewer rows than it acknowledged)."""
    left = fetch_all(conn, f"SELECT id FROM outbox NOT INDEXED WHERE id IN "
                           f"({marks(len(ids))})", ids)
    if left:
        raise StoreCorrupt(f"{path} is corrupt: its outbox.id index does not find "
                           f"{plural(len(left), 'acknowledged command')} ({left[0][0]}, "
                           "...) still in the table; restart pigateway to quarantine it "
                           "(every row is kept)")


def _unmark(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    """The rows of ``ids`` are no longer in flight."""
    for chunk in chunks(list(ids), SWEEP_CHUNK):
        conn.execute(f"DELETE FROM inflight WHERE seq IN (SELECT seq FROM outbox "
                     f"WHERE id IN ({marks(len(chunk))}))", chunk)


def _requeue_rows(conn: sqlite3.Connection, where: str, params: Sequence[Any],
                  gateway_now: float) -> int:
    """Dead letters matching ``where`` back to the tail of the queue, each keeping its own
    ttl from now on the gateway clock."""
    now = time.time()
    rows = fetch_all(conn, "SELECT rowid, id, kind, device, name, params, size, "
                     f"queued_at, expires_at, ttl, priority FROM dead_letters WHERE {where} "
                     "ORDER BY dead_at, queued_at", params)
    requeued = []
    for row in rows:
        ttl = own_ttl(row[7], row[8], row[9])
        requeued.append((*row[1:7], now, requeued_expiry(ttl, gateway_now), ttl, row[10]))
    _insert(conn, requeued)
    for chunk in chunks([row[0] for row in rows], SWEEP_CHUNK):
        conn.execute(f"DELETE FROM dead_letters WHERE rowid IN ({marks(len(chunk))})", chunk)
    return len(rows)


def _read_rows(rows: Sequence[tuple[Any, ...]], expired: set[int]
               ) -> tuple[list[Command], dict[int, str]]:
    """The commands of the rows not ``expired``, and why each row (by seq) that does not
    read cannot (:class:`~pigateway.store.values.Unreadable`, the inbox's reason too)."""
    commands: list[Command] = []
    unreadable: dict[int, str] = {}
    for row in rows:
        if row[0] in expired:
            continue
        try:
            commands.append(row_to_command(row))
        except Unreadable as exc:
            unreadable[row[0]] = str(exc)
    return commands, unreadable


def _move_to_dead(conn: sqlite3.Connection, seqs: Sequence[int], reason: str,
                  detail: str | None, gateway_now: float) -> list[tuple[str, str]]:
    """Rows of the outbox into ``dead_letters`` with a reason; the ``(id, device)`` moved."""
    now = time.time()
    buried: list[tuple[str, str]] = []
    for chunk in chunks(list(seqs), SWEEP_CHUNK):
        in_list = marks(len(chunk))
        # not INSERT OR REPLACE: its implied delete fires no trigger, and the dead-letter
        # totals would drift
        conn.execute(f"DELETE FROM dead_letters WHERE id IN (SELECT id FROM outbox "
                     f"WHERE seq IN ({in_list}))", chunk)
        conn.execute(
            "INSERT INTO dead_letters (id, kind, device, name, params, size, "
            "queued_at, expires_at, ttl, attempts, last_error, reason, detail, dead_at, "
            "dead_on, priority) SELECT id, kind, device, name, params, size, queued_at, "
            f"expires_at, ttl, attempts, last_error, ?, ?, ?, ?, priority FROM outbox "
            f"WHERE seq IN ({in_list})",
            (reason, detail, now, gateway_now, *chunk))
        conn.execute(f"DELETE FROM inflight WHERE seq IN ({in_list})", chunk)
        rows = conn.execute(f"DELETE FROM outbox WHERE seq IN ({in_list}) "
                            "RETURNING size, id, device", chunk).fetchall()
        _uncount(conn, rows)
        buried += [(id_, device) for _, id_, device in rows]
    return buried


def _doomed(conn: sqlite3.Connection, added: int, over_count: int, over_bytes: int,
            cutoff: float | None) -> list[int]:
    """The rowids of the oldest dead letters to delete: past ``cutoff``, or while over a
    bound; at most ``added`` plus :data:`SWEEP_CHUNK`."""
    doomed: list[int] = []
    freed = 0
    cursor = conn.execute(f"SELECT rowid, size, {DIED_ON} FROM dead_letters "
                          f"ORDER BY {DIED_ON} LIMIT ?", (added + SWEEP_CHUNK,))
    for rowid, size, died_on in cursor:  # lazily: mostly the first row says "none"
        aged = cutoff is not None and died_on < cutoff
        if not aged and len(doomed) >= over_count and freed >= over_bytes:
            break
        doomed.append(rowid)
        freed += size
    cursor.close()
    return doomed


def _log_buried(buried: Sequence[tuple[str, str]], reason: str, detail: str | None) -> None:
    """One line for the lot; the journal indexes every id (COMMAND_ID=...) in it."""
    log.warning("dead-lettered %s: %s (%s); see `pigateway queue ls --dead`",
                plural(len(buried), "command"), reason, detail or "no detail",
                extra={"command_id": [row[0] for row in buried[:LOGGED_IDS]],
                       "device": sorted({row[1] for row in buried})[:LOGGED_IDS],
                       "dead_reason": reason})


def max_rowid(table: str) -> Callable[[sqlite3.Connection], int]:
    """The newest row of ``table`` now: a sweep goes no further, so it ends even while
    rows keep arriving."""
    def read(conn: sqlite3.Connection) -> int:
        return int(first(conn, f"SELECT coalesce(max(rowid), 0) FROM {table}")[0])
    return read


def purge_dead_chunk(conn: sqlite3.Connection, bound: int) -> int:
    return conn.execute("DELETE FROM dead_letters WHERE rowid IN (SELECT rowid FROM "
                        "dead_letters WHERE rowid <= ? LIMIT ?)", (bound, SWEEP_CHUNK)).rowcount


def purge_queued_chunk(conn: sqlite3.Connection, last_seq: int) -> int:
    seqs = [row[0] for row in fetch_all(conn, "SELECT seq FROM outbox WHERE seq <= ? "
                                        "ORDER BY seq LIMIT ?", (last_seq, SWEEP_CHUNK))]
    in_list = marks(len(seqs))
    conn.execute(f"DELETE FROM inflight WHERE seq IN ({in_list})", seqs)
    return _uncount(conn, conn.execute(f"DELETE FROM outbox WHERE seq IN ({in_list}) "
                                       "RETURNING size", seqs))


def _ids_sql(ids: Sequence[str]) -> str:
    return f"id IN ({','.join('?' * len(ids))})" if ids else "0"

