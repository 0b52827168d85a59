"""What a producer's put is made of before it is committed, for both ways to put: the
:class:`~pigateway.store.queue.Store` (the service and the Python API: async, group
commit) and the :class:`~pigateway.store.producer.Producer` (``pigateway send``: no event
loop). One definition each of the rows a put writes and when they are checked
(:func:`new_put`), of a watched put (:func:`command`) and of a keyed one (:func:`keyed`,
:func:`key_taken`, :func:`owner_query`, :func:`owner`), so that the two agree.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from pigateway.config import StoreConfig
from pigateway.errors import QueueFull, StoreConflict, StoreError, StoreFull
from pigateway.store import delivery
from pigateway.store.clock import GatewayClock
from pigateway.store.ids import new_id
from pigateway.store.outbox import Put, Then
from pigateway.store.values import NewCommand, check_name, prepare_many

#: One SQL statement and its parameters.
Statement = tuple[str, Sequence[Any]]


def new_put(items: Sequence[NewCommand], config: StoreConfig, gateway_clock: GatewayClock,
            then: Then | None) -> Put:
    """``items`` checked and made rows now, in the caller: bad input fails here, before it
    can spoil a commit shared with others. ``queued_at`` is the wall clock's now;
    ``expires_at`` counts from the gateway clock's (:mod:`pigateway.store.clock`)."""
    now, gateway_now = time.time(), gateway_clock.now()
    return Put(prepare_many(items, config, now, gateway_now), list(items), then,
               gateway_clock.reading.offset)


def command(device: str, name: str, params: dict[str, Any] | None, *, ttl: float | None,
            kind: str, id: str | None, priority: str | None, watch: bool,
            gateway_clock: GatewayClock, also: Sequence[Statement] = ()
            ) -> tuple[NewCommand, Then | None]:
    """The command of one put, and what runs in its transaction: with ``watch`` the record
    that notes its delivery (:mod:`pigateway.store.delivery`); ``also``, statements only
    tests' back door passes (``tests/harness/backdoor.py``)."""
    then = statements(also) if also else None
    if watch:
        id = id or new_id()
        then = _and_then(then, timed(gateway_clock, functools.partial(_watch, id)))
    item = NewCommand(device=device, name=name, params={} if params is None else params,
                      ttl=ttl, kind=kind, id=id, priority=priority)
    return item, then


def keyed(key: str, item: NewCommand, gateway_clock: GatewayClock) -> tuple[NewCommand, Then]:
    """``item`` with its id settled, and what runs in its transaction: producer ``key``
    claimed for it (a key taken within :data:`~pigateway.store.delivery.KEY_SECONDS` fails
    the put: :func:`key_taken`), and the record that notes its delivery."""
    check_name("producer key", key)
    id_ = item.id or new_id()
    # the key's age, as every age in delivery, on the clock the put's transaction read
    return item._replace(id=id_), timed(gateway_clock, lambda now: [
        *delivery.key_statements(key, id_, now), *delivery.watch_statements(id_, now)])


def _watch(id_: str, now: float) -> Sequence[Statement]:
    return delivery.watch_statements(id_, now)


def key_may_be_taken(exc: StoreError) -> bool:
    """Whether a keyed put's failure may mean its key is taken, so that :func:`owner_query`
    must be read before the failure is the answer: a conflict (SQLite's constraint code; the
    read then tells the key's own from a duplicate command id), or a queue (or disk) too
    full to take the put, which comes first, even when the key's first command is already
    queued (resending it is then still a no-op, not a refusal)."""
    return isinstance(exc, (StoreConflict, QueueFull, StoreFull))


def owner_query(key: str, gateway_clock: GatewayClock) -> tuple[str, tuple[Any, ...]]:
    """The read of the command id that holds producer ``key`` now."""
    return delivery.KEY_OWNER_SQL, (key, gateway_clock.now() - delivery.KEY_SECONDS)


def owner(rows: Sequence[Sequence[Any]], refusal: StoreError) -> str:
    """The id :func:`owner_query` read; none (the key went stale meanwhile): ``refusal``."""
    if not rows:
        raise refusal
    return str(rows[0][0])


def timed(gateway_clock: GatewayClock, make: Callable[[float], Sequence[Statement]]) -> Then:
    """Statements stamped with the gateway clock's now *inside* the put's transaction,
    where the clock is the one the file holds (:func:`pigateway.store.clock_row.follow`):
    a producer open for days stamps on the clock the drainer moved meanwhile."""
    def run(conn: sqlite3.Connection) -> None:
        statements(make(gateway_clock.now()))(conn)
    return run


def _and_then(first: Then | None, second: Then) -> Then:
    if first is None:
        return second

    def run(conn: sqlite3.Connection) -> None:
        first(conn)
        second(conn)
    return run


def statements(items: Sequence[Statement]) -> Then:
    """Run ``items`` in order on the put's connection (inside its transaction)."""
    def run(conn: sqlite3.Connection) -> None:
        for sql, params in items:
            conn.execute(sql, params)
    return run
