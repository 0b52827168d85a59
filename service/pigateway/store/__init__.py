"""The durable command queue: one SQLite file in WAL mode, shared by several processes.

A command is durable once :meth:`Store.put` returns: it is committed, synchronously, to
disk. Concurrent puts share one commit (group commit) through a single writer task, so
durability does not cost throughput. Callers use verbs, never SQL:

* the outbox (:mod:`~pigateway.store.outbox`): ``put``, ``claim``, ``ack``, ``nack``,
  ``release``, ``dead_letter``, ``requeue_dead``, ``purge``. ``outbox`` holds queued commands
  in ``seq`` order; ``inflight`` marks the ones a drainer has claimed (emptied when a
  drainer opens, so whatever was in flight when the process died is queued again, first);
  ``dead_letters`` keeps everything that left the queue without delivery, with a reason;
  ``totals`` is one row of counts and bytes kept inside every transaction that changes the
  rows (the queue's by the verbs, one update a statement; the dead letters' by triggers),
  so limits are checked without scanning and never drift from the rows;
* the inbox (:mod:`~pigateway.store.inbox`, ``store.inbox``): ``receive``, ``finish``,
  ``mark_running``, ``prune``, ... for commands from the broker.

The rooms: :mod:`~pigateway.store.files` (integrity check, quarantine, drainer lock),
:mod:`~pigateway.store.schema` (migrations), :mod:`~pigateway.store.connection` (a
connection), :mod:`~pigateway.store.thread` (a connection on its own thread),
:mod:`~pigateway.store.writer` (group commit),
:mod:`~pigateway.store.queue` (:class:`Store`), :mod:`~pigateway.store.reading`
(:class:`QueueReader`), :mod:`~pigateway.store.values`. Nothing is loaded into memory as
a whole; every read is bounded by a ``LIMIT``. ``pigateway send`` uses
:class:`~pigateway.store.producer.Producer`, the rooms without an event loop.

The names below are imported from their rooms on first use, not with the package:
``pigateway send`` imports :mod:`~pigateway.store.producer`, and with it this package,
and must not pay for the :class:`Store`'s asyncio (``send`` starts in 100 ms).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pigateway.store.producer import Producer
    from pigateway.store.queue import Progress, Store
    from pigateway.store.reading import QueueReader, Reads
    from pigateway.store.values import Command, DeadLetter, NewCommand, Stats, prepare

#: What a user of the store needs: the store and its readers, what goes in and comes out.
#: Everything else (limits, schema, files) is imported from its room by name.
__all__ = ["Command", "DeadLetter", "NewCommand", "Producer", "Progress", "QueueReader",
           "Reads", "Stats", "Store", "prepare"]

#: The room each name of :data:`__all__` comes from (the imports above, for mypy).
_ROOMS: dict[str, str] = {
    "Producer": "producer", "Progress": "queue", "Store": "queue",
    "QueueReader": "reading", "Reads": "reading",
    "Command": "values", "DeadLetter": "values", "NewCommand": "values", "Stats": "values",
    "prepare": "values",
}

if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        """A public name, imported from its room now (and kept, so this runs once)."""
        room = _ROOMS.get(name)
        if room is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{room}"), name)
        globals()[name] = value
        return value
