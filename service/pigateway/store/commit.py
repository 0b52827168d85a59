"""One group commit, as it runs on a connection: every job given in ONE transaction (one
fsync), each in its own savepoint, so a failing job is undone alone and the others still
commit; consecutive puts share one insert.

Plain code, no event loop: the service's writer (:mod:`pigateway.store.writer`) hands it
each group in one hop to its connection's thread, and ``pigateway send``
(:mod:`pigateway.store.producer`) commits its one put with it. So both meet the limits, a
duplicate and a full disk the same way, with the same errors.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from pigateway.errors import StoreFull
from pigateway.store import clock_row
from pigateway.store.connection import run_transaction, translate, truncate_wal
from pigateway.store.outbox import Outbox, Put

#: A job that is not a put: run on the connection inside the transaction; what it returns
#: is the job's result.
Run = Callable[[sqlite3.Connection], Any]
Job = Put | Run


class Committed(NamedTuple):
    """What :meth:`GroupCommit.commit` did (a tuple: ``pigateway send`` imports this module,
    and a dataclass costs it ~0.5 ms to set up)."""

    #: each job's result, or the exception it failed with, in the order of the jobs
    outcomes: list[Any]
    #: seconds each transaction that committed took (the jobs a full disk refused add one)
    seconds: list[float]


class GroupCommit:
    """Commits groups of jobs on the queue at ``path`` with ``outbox``'s verbs."""

    def __init__(self, path: Path, outbox: Outbox, guard: Callable[[], None] | None = None) -> None:
        self.path = path
        self._outbox = outbox
        #: run first in every transaction; a producer's refuses a file moved aside
        #: (:class:`~pigateway.store.files.Identity`)
        self._guard = guard
        #: what the transaction under way says once it commits (shared with the outbox)
        self._after_commit = outbox.after_commit

    def commit(self, conn: sqlite3.Connection, jobs: Sequence[Job]) -> Committed:
        """Run ``jobs`` in one transaction. The ones a full disk refused are tried once more,
        in a transaction of their own, after the WAL is truncated: it keeps space the file
        system counts as used, which a drained queue can so hand back."""
        outcomes, seconds = self._once(conn, jobs)
        full = [n for n, outcome in enumerate(outcomes) if isinstance(outcome, StoreFull)]
        if full:
            truncate_wal(conn)
            again, more = self._once(conn, [jobs[n] for n in full])
            if len(full) > 1 and all(o is again[0] for o in again):  # undone as a whole
                again, more = self._each_alone(conn, [jobs[n] for n in full], more)
            for n, outcome in zip(full, again, strict=True):
                outcomes[n] = outcome
            seconds += more
        return Committed(outcomes, seconds)

    def _each_alone(self, conn: sqlite3.Connection, jobs: Sequence[Job],
                    seconds: list[float]) -> tuple[list[Any], list[float]]:
        """Each job in a transaction of its own: a full disk undid the transaction they
        shared as a whole (SQLite rolls all of it back when a statement meets a full disk
        midway, a big put's insert spilling into the WAL), so only this way does the job
        that does not fit fail alone. Only on a full disk's path."""
        outcomes: list[Any] = []
        for job in jobs:
            one, more = self._once(conn, [job])
            outcomes += one
            seconds = seconds + more
        return outcomes, seconds

    def _once(self, conn: sqlite3.Connection,
              jobs: Sequence[Job]) -> tuple[list[Any], list[float]]:
        """One transaction: each job's outcome, and its duration if it committed. What its
        work has to say (a log line) is said after the COMMIT, never for work undone."""
        started = time.monotonic()
        self._after_commit.clear()
        try:
            outcomes = run_transaction(conn, self.path, lambda conn: self._run_jobs(conn, jobs))
        except Exception as exc:  # the commit itself failed: none of it happened
            return [exc] * len(jobs), []
        seconds = time.monotonic() - started
        said = list(self._after_commit)
        self._after_commit.clear()
        for say in said:
            say()
        return outcomes, [seconds]

    def _run_jobs(self, conn: sqlite3.Connection, jobs: Sequence[Job]) -> list[Any]:
        """Each job's result or error, in order; consecutive puts share one insert. The
        gateway clock is read here, in the transaction, where it cannot move under the
        jobs (:func:`~pigateway.store.clock_row.follow`)."""
        if self._guard is not None:
            self._guard()
        clock_row.follow(conn, self._outbox.clock)
        outcomes: list[Any] = []
        for segment in _segments(jobs):
            outcomes += self._run_segment(conn, segment)
        return outcomes

    def _run_segment(self, conn: sqlite3.Connection, segment: list[Put] | Run) -> list[Any]:
        """One savepoint: a failing job is undone alone and the others still commit.

        A group of puts that fails as a whole (a duplicate id, a failing ``then``) is tried
        again put by put, so only the culprit fails.
        """
        conn.execute("SAVEPOINT job")
        said = len(self._after_commit)
        try:
            if isinstance(segment, list):
                outcomes: list[Any] = list(self._outbox.insert_group(conn, segment))
            else:
                outcomes = [segment(conn)]
        except Exception as exc:
            if not conn.in_transaction:  # SQLite undid the whole transaction (a full disk
                raise  # midway through a statement): the group's failure, not this job's
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            del self._after_commit[said:]  # undone: nothing to say about it
            if isinstance(segment, list) and len(segment) > 1:
                return [out for put in segment for out in self._run_segment(conn, [put])]
            return [translated(exc, self.path)]
        conn.execute("RELEASE job")
        return outcomes


def translated(exc: Exception, path: Path) -> Exception:
    """A job's error as its caller gets it: an sqlite3 error as the store error it means."""
    return translate(exc, path) if isinstance(exc, sqlite3.Error) else exc


def _segments(jobs: Sequence[Job]) -> Iterable[list[Put] | Run]:
    """Consecutive puts together (one insert for all), every other job alone."""
    puts: list[Put] = []
    for job in jobs:
        if isinstance(job, Put):
            puts.append(job)
            continue
        if puts:
            yield puts
            puts = []
        yield job
    if puts:
        yield puts
