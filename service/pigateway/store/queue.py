"""The :class:`Store`: the queue as the service and producers use it. It opens the file
(checking, quarantining, migrating, holding the drainer lock), starts the writer and
hands each verb to it; what the verbs do inside a transaction is in
:mod:`pigateway.store.outbox` and :mod:`pigateway.store.inbox`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import cached_property
from typing import Any, Self, TypeVar

from pigateway.config import StoreConfig
from pigateway.errors import StoreError
from pigateway.store import clock, clock_row, delivery, files, puts, schema
from pigateway.store.clock import GatewayClock
from pigateway.store.connection import data_version, fetch_all, first, select_one, translate
from pigateway.store.inbox import Inbox, outbox_device
from pigateway.store.outbox import (
    SWEEP_CHUNK,
    Outbox,
    Then,
    max_rowid,
    purge_dead_chunk,
    purge_queued_chunk,
)
from pigateway.store.reading import Reads
from pigateway.store.thread import SqliteThread
from pigateway.store.values import Command, NewCommand
from pigateway.store.writer import Writer

log = logging.getLogger("pigateway.store")
T = TypeVar("T")
#: Told the running total of rows a long sweep has handled (the CLI prints it).
Progress = Callable[[int], None]

#: How often a drainer looks for commits made by other processes (``pigateway send``).
POLL_INTERVAL = 0.05
#: Seconds one ``claim`` call goes on burying an expired backlog before it hands back an
#: empty claim (and wakes :meth:`Store.wait_for_work`): a cancelled claim ends soon.
CLAIM_SWEEP_SECONDS = 1.0


class Store(Reads):
    """The queue. Open with ``await Store.open(config)``; use as an async context manager."""

    def __init__(self, config: StoreConfig, writer: Writer, outbox: Outbox,
                 reader: SqliteThread, *, drainer: bool) -> None:
        self.config = config
        #: the clock of every ``expires_at`` in the file (see :mod:`pigateway.store.clock`)
        self.clock = outbox.clock
        self.path = config.path
        self.drainer = drainer
        self._writer = writer
        self._outbox = outbox
        self._reader = reader
        self._wakeup = _Wakeup(writer)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._closed = False
        #: the file this store opened, as (device, inode): see :func:`replaced`
        self.identity: tuple[int, int] | None = None

    # ---- lifecycle

    @classmethod
    async def open(cls, config: StoreConfig, *, drainer: bool = True) -> Store:
        """Open (creating, migrating, quarantining a corrupt file) and start the writer.

        A ``drainer`` (the service) holds an exclusive lock file so that two services never
        drain one queue, and puts back whatever was in flight when the last one died.
        Producers pass ``drainer=False``; ``pigateway send`` uses the same without an event
        loop, :class:`~pigateway.store.producer.Producer`.
        """
        lock_fd = files.enter_folder(config.path, drainer=drainer)
        try:
            store = cls(config, *await _parts(config, drainer=drainer), drainer=drainer)
        except BaseException:
            files.release_lock(lock_fd)
            raise
        store._lock_fd = lock_fd
        store.identity = files.identity(config.path)
        await store._start()
        return store

    async def _start(self) -> None:
        """A drainer takes back what was in flight; then the writer (and heartbeat) start."""
        if self.drainer:
            resumed = await self._writer.transaction(self._outbox.resume_in_flight)
            if resumed:
                log.warning("%d commands were in flight when pigateway last stopped; "
                            "they are queued again, first", resumed)
        await self._wakeup.start()
        self._writer.start()
        if self.drainer:
            self._heartbeat_task = asyncio.create_task(_heartbeat_loop(self),
                                                       name="store-clock")
            try:
                await self.prune_dead()  # bounds lowered since, or dead letters aged out
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Finish pending writes and close both connections. Safe to call twice."""
        if self._closed:
            return
        if self._heartbeat_task is not None:
            # not awaited: nothing may stand between close() and stopping the writer
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
            # the last reading, so the next boot continues from the moment we stopped
            _consume(self._submit(clock_row.heartbeat))
        self._closed = True
        await self._writer.close()
        await self._reader.close()
        files.release_lock(self._lock_fd)
        self._lock_fd = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- producing

    async def put(self, device: str, name: str, params: dict[str, Any] | None = None, *,
                  ttl: float | None = None, kind: str = "action", id: str | None = None,
                  priority: str | None = None, watch: bool = False) -> Command:
        """Queue one command; durable on return.

        ``priority`` ("high", "normal", "low"; None: results high, actions normal): higher
        priorities are claimed first; within one, the order of puts holds. ``watch``: keep a
        record of its delivery for :meth:`where` (:mod:`pigateway.store.delivery`).
        """
        item, then = puts.command(device, name, params, ttl=ttl, kind=kind, id=id,
                                  priority=priority, watch=watch, gateway_clock=self.clock)
        [command] = await self._submit_put([item], then)
        return command

    async def put_keyed(self, key: str, item: NewCommand) -> tuple[Command | None, str]:
        """Queue ``item`` (watched) unless producer ``key`` was used in the last
        :data:`~pigateway.store.delivery.KEY_SECONDS`: then nothing is queued and the first
        command's id comes back (``(None, id)``); else ``(command, its id)``."""
        item, then = puts.keyed(key, item, self.clock)
        try:
            [command] = await self._submit_put([item], then)
        except StoreError as exc:
            if not puts.key_may_be_taken(exc):
                raise
            return None, puts.owner(await self._fetch(*puts.owner_query(key, self.clock)), exc)
        return command, command.id

    async def put_many(self, items: Sequence[NewCommand], *,
                       buried: Sequence[tuple[NewCommand, str, str]] = ()) -> list[Command]:
        """Queue a list at once, all or nothing; durable on return.

        ``buried``: messages that never became commands (an ingested payload that is not
        one), each with its reason and detail, kept as dead letters in the *same* commit,
        never sent: whoever acknowledges the lot (ingest's PUBACK) then acknowledges
        nothing the store refused. Each is checked here, in the caller
        (:class:`~pigateway.errors.InvalidCommand`), before anything is written.
        """
        dead = [(puts.new_put([item], self.config, self.clock, None).rows, reason, detail)
                for item, reason, detail in buried]

        def bury(conn: sqlite3.Connection) -> None:
            for rows, reason, detail in dead:
                self._outbox.bury_new(conn, rows, reason, detail)

        if not items:
            if dead:
                await self._call(bury)
            return []
        return await self._submit_put(list(items), bury if dead else None)

    async def _submit_put(self, items: list[NewCommand], then: Then | None) -> list[Command]:
        put = puts.new_put(items, self.config, self.clock, then)
        result: list[Command] = await self._writer.submit_put(put)
        self._wakeup.set()
        return result

    async def _put_result(self, device: str, document: dict[str, Any],
                          then: Then | None) -> None:
        """Queue an inbound command's result, and ``then`` in the same transaction."""
        item = NewCommand(device=outbox_device(device), name="result", params=document,
                          kind="result")
        await self._submit_put([item], then)

    @cached_property
    def inbox(self) -> Inbox:
        """The inbox of commands from the broker: receive, finish, ... (its verbs)."""
        return Inbox(self)

    # ---- draining

    async def claim(self, limit: int) -> list[Command]:
        """Mark up to ``limit`` of the oldest queued commands in flight and return them.

        Expired commands met on the way are dead-lettered as ``expired`` and not returned,
        at most :data:`SWEEP_CHUNK` per transaction: an expired backlog is buried chunk by
        chunk, each its own commit. After :data:`CLAIM_SWEEP_SECONDS` of that an empty claim
        comes back and :meth:`wait_for_work` returns at once, so the caller claims again.
        """
        if not self.drainer:
            raise StoreError("this store was opened as a producer; only a drainer claims")
        deadline = time.monotonic() + CLAIM_SWEEP_SECONDS
        while True:
            claimed, more_expired = await self._call(
                lambda conn: self._outbox.claim(conn, limit))
            if claimed or not more_expired:
                return claimed
            if time.monotonic() >= deadline:
                self._wakeup.set()  # more to bury: the drain comes back at once
                return claimed

    async def ack(self, ids: Sequence[str], batch: str | None = None) -> int:
        """Delete delivered commands (call only after the broker acknowledged them); with
        ``batch``, the watched ones get a delivery record in the same transaction
        (:mod:`pigateway.store.delivery`: ``queue show``, ``send --wait``)."""
        def run(conn: sqlite3.Connection) -> int:
            deleted = self._outbox.ack(conn, ids)
            if batch is not None:
                gateway_now = self.clock.now()
                if noted := delivery.record(conn, ids, batch, time.time(), gateway_now):
                    delivery.prune(conn, gateway_now, noted)
            return deleted
        return await self._call(run)

    async def nack(self, ids: Sequence[str], error: str) -> None:
        """Put claimed commands back at the head; past ``max_attempts`` they are dead-lettered."""
        await self._call(lambda conn: self._outbox.nack(conn, ids, error))

    async def charge(self, ids: Sequence[str], error: str) -> set[str]:
        """Count an attempt on claimed commands that stay claimed (a drainer tries them again
        itself); past ``max_attempts`` they are dead-lettered: their ids are returned."""
        return await self._call(lambda conn: self._outbox.charge(conn, ids, error))

    async def release(self, ids: Sequence[str]) -> None:
        """Put claimed commands back at the head without counting an attempt.

        For rows a drainer claimed but never sent (its link ended first): they were not
        tried, so they must not creep towards ``max_attempts``.
        """
        await self._call(lambda conn: self._outbox.release(conn, ids))

    async def dead_letter(self, ids: Sequence[str], reason: str,
                          detail: str | None = None) -> None:
        """Move commands to the dead-letter table with a reason; logs one warning line."""
        await self._call(lambda conn: self._outbox.dead_letter(conn, ids, reason, detail))

    # ---- observing

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a put happened here or another process committed, or after ``timeout``."""
        await self._wakeup.wait(timeout)

    async def heartbeat(self) -> None:
        """Write a reading of the gateway clock (a new boot continues from the last one)."""
        jump = self.clock.adopt(await self._call(clock_row.heartbeat))
        if jump:  # only a beat moves the offset within a boot: the downtime, now counted
            log.info("the wall clock is synchronised: the %.0f s the gateway was down now "
                     "count towards TTLs", jump)

    async def ping(self) -> None:
        """Return once the writer task and its thread answer (for the watchdog).

        It takes no lock: a lock another process holds is waited out by each transaction
        for at most ``store.busy_timeout`` and then fails alone, so the ping is answered
        after at most that long (the watchdog allows it: :func:`pigateway.systemd.ping_bound`).
        A writer that does not come back (a hung disk) does not answer at all.
        """
        await self._writer.submit(select_one, bare=True)

    async def refusal(self) -> StoreError | None:
        """What a put would be refused with now (the disk reserve, a full queue), or None;
        read on the reader's connection, so it waits for no writer. What the last commit
        that wrote nothing met refuses too (a file system gone read-only, a disk SQLite found
        full): the clock's heartbeat writes once a minute, so it is never older than that."""
        if self._writer.refused is not None:
            return self._writer.refused
        try:
            return await self._reader.call(self._outbox.refusal)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc
        except OSError as exc:  # statvfs of a folder gone: a store error, said and retried
            raise StoreError(f"cannot look at the disk under {self.path}: {exc}") from exc

    # ---- maintenance

    async def requeue_dead(self, id: str | None = None, *, expired: bool = False,
                           progress: Progress | None = None) -> int:
        """Move dead letters back to the tail of the queue, attempts reset; each keeps its
        own ttl, counted again from now (:func:`~pigateway.store.values.requeued_expiry`).

        All of them: every one but the ``expired``, in chunks, each its own commit (a stale
        command is never replayed to a device unasked; one may also have been delivered
        with its PUBACK lost). One by ``id``: an expired one only with ``expired=True``,
        else :class:`InvalidCommand` says how to ask.
        """
        if id is not None:
            return await self._call(
                lambda conn: self._outbox.requeue_one(conn, id, expired=expired))
        bound = await self._call(max_rowid("dead_letters"))
        return await self._sweep(lambda conn: self._outbox.requeue_chunk(conn, bound), progress)

    async def purge(self, *, queued: bool, progress: Progress | None = None) -> int:
        """Delete dead letters, and with ``queued`` the whole queue too. Returns rows deleted.

        In chunks, each its own commit, so a running service keeps its writer; only rows
        that existed when the purge began are deleted (puts meanwhile are kept).
        """
        bound, last = await self._call(
            lambda conn: (max_rowid("dead_letters")(conn), max_rowid("outbox")(conn)))
        total = await self._sweep(lambda conn: purge_dead_chunk(conn, bound), progress)
        if queued:
            total += await self._sweep(lambda conn: purge_queued_chunk(conn, last),
                                       lambda done: progress(total + done) if progress else None)
        return total

    async def prune_dead(self) -> int:
        """Bring dead letters within their bounds now, in chunks (a drainer does it at open)."""
        return await self._sweep(lambda conn: self._outbox.prune_dead(conn, 0), None)

    # ---- through the writer

    def _submit(self, run: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        return self._writer.submit(run)

    async def _call(self, run: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(run)

    async def _sweep(self, step: Callable[[sqlite3.Connection], int],
                     progress: Progress | None, *, chunks: int | None = None) -> int:
        return await _in_chunks(self._call, step, progress, chunks)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return await self._reader.call(fetch_all, sql, params)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc


def _consume(future: asyncio.Future[Any]) -> None:
    """Let a future nobody awaits fail quietly: for the last reading of a closing drainer,
    whose loss costs the TTLs at most one heartbeat of time after a reboot."""
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


async def _parts(config: StoreConfig, *, drainer: bool) -> tuple[Writer, Outbox, SqliteThread]:
    """Check the file, connect the writer, migrate, read the clock, connect the reader."""
    identity = None
    if drainer:
        await asyncio.to_thread(files.check_as_drainer, config)
    else:
        files.check_as_producer(config.path)
        identity = files.Identity(config.path)
    thread = await SqliteThread.open(config, "store-writer")
    try:
        reading = await thread.call(schema.ready, config.path)
        reader = await SqliteThread.open(config, "store-reader")
    except BaseException:
        await thread.close()
        raise
    outbox = Outbox(config, GatewayClock(reading), [])
    guard = None if identity is None else identity.settle().check
    return Writer(thread, config.path, outbox, guard), outbox, reader


class _Wakeup:
    """What wakes a drainer waiting for work: a put made here (an event), or a commit of
    another process (the writer connection's ``data_version`` moved), polled every
    :data:`POLL_INTERVAL` seconds."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._event = asyncio.Event()
        self._version = 0

    def set(self) -> None:
        self._event.set()

    async def start(self) -> None:
        self._version = await self._read_version()

    async def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, POLL_INTERVAL)):
                    await self._event.wait()
                # consumed here, not cleared on entry: a put that committed after the
                # caller's last (empty) claim must wake it now, not at the next poll
                self._event.clear()
                return
            version = await self._read_version()
            if version != self._version:
                self._version = version
                return

    async def _read_version(self) -> int:
        """Asked of the writer connection, whose data_version moves only when *another*
        connection commits: our own claims and acks do not wake :meth:`wait`.
        (It runs on the writer's thread between two transactions, never inside one.)"""
        return await self._writer.on_thread(data_version)


def replaced(store: Store) -> bool:
    """Whether the queue's path names another file than the one ``store`` opened: it was
    removed or replaced under it (an operator's ``rm``, a backup moved over it), and every
    producer since writes a file this store does not read."""
    try:
        return files.identity(store.path) != store.identity
    except OSError:  # the folder cannot be looked at now (a failing card): not that
        return False


async def holds_work(store: Store) -> bool:
    """Whether the file ``store`` opened still holds a queued command (in flight too) or
    an inbound command not yet finished."""
    return bool(await store._reader.call(_holds_work))  # the store's own room


def _holds_work(conn: sqlite3.Connection) -> bool:
    return bool(first(conn, "SELECT EXISTS (SELECT 1 FROM outbox) OR EXISTS (SELECT 1 FROM "
                            "inbox WHERE state != 'done')")[0])


async def _heartbeat_loop(store: Store) -> None:
    """The drainer's readings, every :data:`pigateway.store.clock.HEARTBEAT` seconds: one
    small row, committed with whatever else is being written then."""
    while True:
        await asyncio.sleep(clock.HEARTBEAT)
        try:
            await store.heartbeat()
        except StoreError as exc:  # the next one may pass; a reboot meanwhile loses a beat
            log.warning("could not write a reading of the gateway clock: %s", exc)


async def _in_chunks(call: Callable[[Callable[[sqlite3.Connection], int]], Awaitable[int]],
                     step: Callable[[sqlite3.Connection], int], progress: Progress | None,
                     chunks: int | None) -> int:
    """Run ``step`` (which handles at most :data:`SWEEP_CHUNK` rows) in its own
    transactions until it handles fewer (or ``chunks`` times): other writers' jobs
    commit in between."""
    total = 0
    while True:
        done = await call(step)
        total += done
        if progress is not None and done:
            progress(total)
        if chunks is not None:
            chunks -= 1
        if done < SWEEP_CHUNK or chunks == 0:
            return total
