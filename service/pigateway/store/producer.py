"""The queue for a producer without an event loop: ``pigateway send``.

A :class:`Producer` is what ``Store.open(config, drainer=False)`` is, minus asyncio (whose
imports alone cost ``send`` ~40 ms of its 100 ms): it opens the file the same way (the
folder, the header check, never the drainer lock, the same connection set-up, migration
and clock reading), makes a put's rows the same way (:mod:`pigateway.store.puts`) and
commits it with the same :class:`~pigateway.store.commit.GroupCommit` (limits, overflow
policy, full disk), on one connection in the calling thread, one transaction per put.
SQLite's busy timeout (``store.busy_timeout``) waits out the service's own commits.

The service notices a producer's commits as it notices any other process's: its writer
connection's ``PRAGMA data_version`` moves, which a drainer reads every
:data:`~pigateway.store.queue.POLL_INTERVAL` (``Store.wait_for_work``).
"""

from __future__ import annotations

import _thread
import sqlite3
from collections.abc import Sequence
from typing import Any, Self

from pigateway.config import StoreConfig
from pigateway.errors import StoreError
from pigateway.store import delivery, files, puts, schema
from pigateway.store.clock import GatewayClock, Reading
from pigateway.store.commit import GroupCommit
from pigateway.store.connection import connect, fetch_all, translate
from pigateway.store.outbox import Outbox, Then
from pigateway.store.values import Command, NewCommand, check_name


class Producer:
    """Puts, keyed puts and where a command is. Open with ``Producer.open(config)``; use
    as a context manager. Safe to share between threads: its one connection is opened
    without sqlite3's same-thread check (:func:`~pigateway.store.connection.connect`), so
    a lock keeps each put's transaction whole (interleaved, one thread's ROLLBACK undid
    another's reported put)."""

    def __init__(self, config: StoreConfig, conn: sqlite3.Connection, reading: Reading,
                 identity: files.Identity | None = None) -> None:
        self.config = config
        self.path = config.path
        #: the clock of every ``expires_at`` in the file (see :mod:`pigateway.store.clock`)
        self.clock = GatewayClock(reading)
        self._conn: sqlite3.Connection | None = conn
        #: one user of the connection at a time: threading.Lock itself, from the module under
        #: :mod:`threading` (whose import costs a ``send`` ~2% of its instructions)
        self._lock = _thread.allocate_lock()
        self._group = GroupCommit(config.path, Outbox(config, self.clock, []),
                                  None if identity is None else identity.check)

    @classmethod
    def open(cls, config: StoreConfig) -> Producer:
        """Open (creating and migrating, never moving a bad file: that is the drainer's)."""
        files.enter_folder(config.path, drainer=False)
        files.check_as_producer(config.path)
        identity = files.Identity(config.path)
        conn = connect(config)
        try:
            reading = schema.ready(conn, config.path)
        except BaseException:
            conn.close()
            raise
        return cls(config, conn, reading, identity.settle())

    def close(self) -> None:
        """Close the connection. Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, device: str, name: str, params: dict[str, Any] | None = None, *,
            ttl: float | None = None, kind: str = "action", id: str | None = None,
            priority: str | None = None, watch: bool = False) -> Command:
        """Queue one command; durable on return (as ``Store.put``, whose arguments these are)."""
        item, then = puts.command(device, name, params, ttl=ttl, kind=kind, id=id,
                                  priority=priority, watch=watch, gateway_clock=self.clock)
        [command] = self._put([item], then)
        return command

    def put_keyed(self, key: str, item: NewCommand) -> tuple[Command | None, str]:
        """Queue ``item`` unless producer ``key`` is taken (as ``Store.put_keyed``):
        ``(command, its id)``, or ``(None, the first command's id)``."""
        item, then = puts.keyed(key, item, self.clock)
        try:
            [command] = self._put([item], then)
        except StoreError as exc:
            if not puts.key_may_be_taken(exc):
                raise
            return None, puts.owner(self._fetch(*puts.owner_query(key, self.clock)), exc)
        return command, command.id

    def content(self, id_: str) -> tuple[str, str, str] | None:
        """Command ``id_``'s device, name and params (JSON text as stored) while it is
        queued or dead; ``None`` once delivered (its row is gone) or never there."""
        rows = self._fetch(delivery.CONTENT_SQL, (id_,))
        return (str(rows[0][0]), str(rows[0][1]), str(rows[0][2])) if rows else None

    def where(self, id_: str) -> delivery.Where:
        """Where command ``id_`` is now (as ``Store.where``)."""
        check_name("command id", id_)
        return delivery.where_of(id_, [self._fetch(sql, (id_,)) for sql in delivery.WHERE_SQL])

    def _put(self, items: list[NewCommand], then: Then | None) -> list[Command]:
        put = puts.new_put(items, self.config, self.clock, then)
        with self._lock:
            [outcome] = self._group.commit(self._connection(), [put]).outcomes
        if isinstance(outcome, Exception):
            raise outcome
        commands: list[Command] = outcome
        return commands

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return fetch_all(self._connection(), sql, params)
        except sqlite3.Error as exc:
            raise translate(exc, self.path) from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._conn
