"""The group-commit writer: one task, one connection on its own thread, one commit for
everything waiting.

Callers queue jobs (a put, a verb, or the ping); the writer takes every job waiting and
runs them in ONE transaction (one fsync), each in its own savepoint, so a failing job is
undone alone and the others still commit. A caller's future is settled only after the
COMMIT: durable on return.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pigateway.counters import COUNTERS
from pigateway.errors import StoreError, StoreFull
from pigateway.store.connection import run_transaction, translate, truncate_wal
from pigateway.store.outbox import Outbox, Put
from pigateway.store.thread import SqliteThread

T = TypeVar("T")
Run = Callable[[sqlite3.Connection], Any]

#: Jobs coalesced into one transaction at most.
GROUP_LIMIT = 4096


@dataclass
class _Job:
    """One unit of work: a put (``put``; consecutive ones share one insert) or ``run``."""

    future: asyncio.Future[Any]
    run: Run | None = None
    put: Put | None = None
    #: run on the writer's thread outside any transaction (it takes no lock: the ping)
    bare: bool = False


class Writer:
    """Queue jobs with :meth:`submit`/:meth:`submit_put`; :meth:`start` the task that
    commits them, :meth:`close` to finish what is queued and stop."""

    def __init__(self, thread: SqliteThread, path: Path, outbox: Outbox) -> None:
        self.path = path
        self._thread = thread
        self._outbox = outbox
        #: what the transaction under way says once it commits (shared with the outbox)
        self._after_commit = outbox.after_commit
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        """Commit what is queued, stop the task and close the connection."""
        self._closed = True
        if self._task is not None:
            self._jobs.put_nowait(None)
            # asyncio.wait, not await: a cancelled close() must stay cancelled (3.11)
            await asyncio.wait({self._task})
        await self._thread.close()

    def submit(self, run: Callable[[sqlite3.Connection], T], *,
               bare: bool = False) -> asyncio.Future[T]:
        """Queue ``run(conn)`` now (its place in the commit order is taken on this call);
        the future is settled after the commit. ``bare``: outside any transaction."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future=future, run=run, bare=bare))
        return future

    def submit_put(self, put: Put) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(future=future, put=put))
        return future

    async def transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``run(conn)`` as one transaction now, wholly on the writer's thread: one
        hop per commit, not one per statement (for the open, before the task starts)."""
        return await self._thread.call(run_transaction, self.path, run)

    async def on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the writer's thread, outside any transaction."""
        return await self._thread.call(fn, *args)

    def _enqueue(self, job: _Job) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        self._jobs.put_nowait(job)

    async def _write_loop(self) -> None:
        """Take every job waiting and commit them together: one transaction, one fsync."""
        while True:
            jobs = [await self._jobs.get()]
            while len(jobs) < GROUP_LIMIT and not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            work = [job for job in jobs if job is not None]
            for job in [job for job in work if job.bare]:  # answered before any lock wait
                await self._run_bare(job)
            work = [job for job in work if not job.bare]
            if work:
                await self._commit(work)
            if None in jobs:  # close() asked us to stop
                return

    async def _run_bare(self, job: _Job) -> None:
        assert job.run is not None
        try:
            _settle(job.future, result=await self._thread.call(job.run))
        except Exception as exc:
            _settle(job.future, error=self._translated(exc))

    async def _commit(self, jobs: list[_Job], *, reclaimed: bool = False) -> None:
        """Run ``jobs`` in one transaction and hand each caller its own outcome."""
        started = time.monotonic()
        self._after_commit.clear()
        try:
            outcomes = await self.transaction(lambda conn: self._run_jobs(conn, jobs))
            COUNTERS.commit_seconds.observe(time.monotonic() - started)
        except Exception as exc:  # the commit itself failed: none of it happened
            outcomes = [exc] * len(jobs)
        else:
            said = list(self._after_commit)
            self._after_commit.clear()
            for say in said:
                say()
        full = [job for job, out in zip(jobs, outcomes, strict=True)
                if isinstance(out, StoreFull)]
        if full and not reclaimed:
            # the WAL keeps space the file system counts as used: hand it back, try again
            await self._thread.call(truncate_wal)
            await self._commit(full, reclaimed=True)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if full and not reclaimed and isinstance(outcome, StoreFull):
                continue  # settled by the retry
            if isinstance(outcome, BaseException):
                _settle(job.future, error=outcome)
            else:
                _settle(job.future, result=outcome)

    def _run_jobs(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
        """Each job's result or error, in order; consecutive puts share one insert."""
        outcomes: list[Any] = []
        for segment in _segments(jobs):
            outcomes += self._run_segment(conn, segment)
        return outcomes

    def _run_segment(self, conn: sqlite3.Connection, segment: list[_Job]) -> list[Any]:
        """One savepoint: a failing job is undone alone and the others still commit.

        A group of puts that fails as a whole (a duplicate id, a failing ``then``) is tried
        again put by put, so only the culprit fails.
        """
        conn.execute("SAVEPOINT job")
        said = len(self._after_commit)
        try:
            if segment[0].run is not None:
                outcomes: list[Any] = [segment[0].run(conn)]
            else:
                puts = [job.put for job in segment if job.put is not None]
                outcomes = list(self._outbox.insert_group(conn, puts))
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            del self._after_commit[said:]  # undone: nothing to say about it
            if len(segment) > 1:
                return [out for job in segment for out in self._run_segment(conn, [job])]
            return [self._translated(exc)]
        conn.execute("RELEASE job")
        return outcomes

    def _translated(self, exc: Exception) -> Exception:
        return translate(exc, self.path) if isinstance(exc, sqlite3.Error) else exc


def _settle(future: asyncio.Future[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _segments(jobs: list[_Job]) -> Iterable[list[_Job]]:
    """Consecutive puts together (one insert for all), every other job alone."""
    run: list[_Job] = []
    for job in jobs:
        if job.put is not None:
            run.append(job)
            continue
        if run:
            yield run
            run = []
        yield [job]
    if run:
        yield run
