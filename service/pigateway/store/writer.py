"""The group-commit writer: one task, one connection on its own thread, one commit for
everything waiting.

Callers queue jobs (a put, a verb, or the ping); the writer takes every job waiting and
hands them to its thread in one hop, where :class:`~pigateway.store.commit.GroupCommit`
runs them in ONE transaction (one fsync), each in its own savepoint, so a failing job is
undone alone and the others still commit. A caller's future is settled only after the
COMMIT: durable on return.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pigateway.counters import COUNTERS
from pigateway.errors import StoreError, StoreFull, StoreReadOnly
from pigateway.store.commit import GroupCommit, Job, translated
from pigateway.store.connection import run_transaction
from pigateway.store.outbox import Outbox, Put
from pigateway.store.thread import SqliteThread

T = TypeVar("T")

#: Jobs coalesced into one transaction at most.
GROUP_LIMIT = 4096


@dataclass
class _Queued:
    """A job (a :class:`Put`, or a function of the connection) and the future of its caller."""

    future: asyncio.Future[Any]
    job: Job
    #: run on the writer's thread outside any transaction (it takes no lock: the ping)
    bare: bool = False


class Writer:
    """Queue jobs with :meth:`submit`/:meth:`submit_put`; :meth:`start` the task that
    commits them, :meth:`close` to finish what is queued and stop."""

    def __init__(self, thread: SqliteThread, path: Path, outbox: Outbox,
                 guard: Callable[[], None] | None = None) -> None:
        self.path = path
        self._thread = thread
        self._group = GroupCommit(path, outbox, guard)
        self._jobs: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: What the last commit that wrote nothing met, a read-only file system or a full
        #: disk (None: the last one wrote): what a put would meet now, which no look at
        #: statvfs tells (a card gone read-only, a disk SQLite found full below the guard)
        self.refused: StoreReadOnly | StoreFull | None = None

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
        self._enqueue(_Queued(future=future, job=run, bare=bare))
        return future

    def submit_put(self, put: Put) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Queued(future=future, job=put))
        return future

    async def transaction(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``run(conn)`` as one transaction now, wholly on the writer's thread: one
        hop per commit, not one per statement (for the open, before the task starts)."""
        return await self._thread.call(run_transaction, self.path, run)

    async def on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the writer's thread, outside any transaction."""
        return await self._thread.call(fn, *args)

    def _enqueue(self, job: _Queued) -> None:
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

    async def _run_bare(self, job: _Queued) -> None:
        assert not isinstance(job.job, Put)
        try:
            _settle(job.future, result=await self._thread.call(job.job))
        except Exception as exc:
            _settle(job.future, error=translated(exc, self.path))

    async def _commit(self, jobs: list[_Queued]) -> None:
        """Commit ``jobs`` together, in one hop to the thread, and hand each caller its own
        outcome."""
        try:
            done = await self._thread.call(self._group.commit, [job.job for job in jobs])
        except Exception as exc:  # the thread is gone: none of it happened
            outcomes: list[Any] = [exc] * len(jobs)
        else:
            outcomes = done.outcomes
            for seconds in done.seconds:
                COUNTERS.commit_seconds.observe(seconds)
        if any(not isinstance(o, BaseException) for o in outcomes):
            self.refused = None
        elif refusals := [o for o in outcomes if isinstance(o, StoreReadOnly | StoreFull)]:
            self.refused = refusals[0]
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _settle(job.future, error=outcome)
            else:
                _settle(job.future, result=outcome)


def _settle(future: asyncio.Future[Any], *, result: Any = None,
            error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
