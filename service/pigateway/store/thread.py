"""A connection to the queue on a thread of its own, for the service's event loop.

Every transaction the service runs is one hop to that thread, which matters because each
hop costs about as much as a small statement. The connection itself is set up and used by
the plain functions of :mod:`pigateway.store.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from pigateway.config import StoreConfig
from pigateway.errors import StoreError
from pigateway.store.connection import connect

T = TypeVar("T")


class SqliteThread:
    """A ``sqlite3`` connection owned by one thread: everything on it runs there, in order.

    Standard library only: a thread serving a :class:`queue.SimpleQueue` and answering
    through :meth:`asyncio.loop.call_soon_threadsafe`, so no private API of a wrapper is
    involved. (A ``ThreadPoolExecutor(max_workers=1)`` with ``run_in_executor`` does the
    same with more bookkeeping per hop: one-row commits measured ~15% slower with it, and a
    put is one hop.) The thread is a daemon: a process that exits without closing its store
    does not hang, and an unfinished transaction is rolled back by SQLite.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Hop | None] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    @classmethod
    async def open(cls, config: StoreConfig, name: str) -> SqliteThread:
        thread = cls(name)
        try:
            thread._conn = await thread._hop(functools.partial(connect, config))
        except BaseException:
            thread._jobs.put(None)
            raise
        return thread

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on the connection's thread, in one hop."""
        if self._closed:
            raise StoreError("the store's connection is closed")
        return await self._hop(functools.partial(fn, self._conn, *args))

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._conn is not None:
                await self._hop(self._conn.close)
        finally:
            self._jobs.put(None)

    async def _hop(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Hop(loop, future, fn))
        return await future

    def _serve(self) -> None:
        while (hop := self._jobs.get()) is not None:
            try:
                result = hop.fn()
            except BaseException as exc:  # handed to the caller, whatever it is
                hop.answer(None, exc)
            else:
                hop.answer(result, None)


class _Hop(NamedTuple):
    """One function for the thread, and where its outcome goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    fn: Callable[[], Any]

    def answer(self, result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
