"""The store against a model: hypothesis drives random sequences of verbs and checks each step.

The model is the queue written the obvious way, as a Python list in put order with an
in-flight flag per command, a dead-letter dict and the overflow rule. Whatever sequence of
put, put_many (in the three priority lanes), claim, ack, nack, release, dead_letter, requeue,
purge and reopen hypothesis finds, the real store (a SQLite file on disk, closed and opened
again as a drainer would be after a crash) must agree with the model on which commands are
queued, in which order, which are in flight, and which are dead and why. The claims read on
from where the last one ended (:mod:`pigateway.store.claims`): the partial acks, releases
and nacks, the queue drained and filled again (reused seqs) and the lanes are what can
lead such a cursor astray.

Each example gets its own event loop (``asyncio.Runner``) and its own folder; the store
is closed in ``teardown``.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, QueueFull
from pigateway.store import NewCommand, Store

T = TypeVar("T")
MAX_COMMANDS = 8
MAX_ATTEMPTS = 2
names = st.sampled_from(["on", "off", "set", "blink"])
devices = st.sampled_from(["pump", "valve", "fan"])
params = st.dictionaries(st.sampled_from(["a", "b", "c"]),
                         st.integers(-5, 5) | st.text(max_size=5), max_size=2)
#: None: the kind's (normal for an action); mostly normal, as queues are
priorities = st.sampled_from([None, None, None, "high", "low"])
LANE = {"high": 0, None: 1, "normal": 1, "low": 2}


@dataclass
class Entry:
    """One queued command as the model sees it."""

    id: str
    name: str
    attempts: int = 0
    in_flight: bool = False
    priority: int = 1


class QueueModel:
    """The queue in memory: put order, in-flight marks, dead letters, overflow."""

    def __init__(self, overflow: Literal["reject", "drop-oldest"]) -> None:
        self.overflow = overflow
        self.queue: list[Entry] = []  # in put order
        self.dead: dict[str, str] = {}
        self.lane: dict[str, int] = {}  # a dead letter keeps its priority

    def in_claim_order(self) -> list[Entry]:
        """Priority first (high, normal, low), put order within one."""
        return sorted(self.queue, key=lambda e: e.priority)

    def room_for(self, count: int) -> list[Entry] | None:
        """What must be dropped to add ``count`` commands; ``None`` means QueueFull."""
        over = len(self.queue) + count - MAX_COMMANDS
        if over <= 0:
            return []
        if self.overflow == "reject" or count > MAX_COMMANDS:
            return None
        # the lowest priority goes first, the oldest first within it
        idle = [e for e in sorted(self.queue, key=lambda e: -e.priority) if not e.in_flight]
        return idle[:over] if len(idle) >= over else None

    def put(self, entries: list[Entry]) -> None:
        dropped = self.room_for(len(entries))
        assert dropped is not None
        self.bury([e.id for e in dropped], "overflow")
        self.queue.extend(entries)
        self.lane.update((e.id, e.priority) for e in entries)

    def claim(self, limit: int) -> list[str]:
        taken = [e for e in self.in_claim_order() if not e.in_flight][:limit]
        for entry in taken:
            entry.in_flight = True
        return [e.id for e in taken]

    def ack(self, ids: set[str]) -> None:
        self.queue = [e for e in self.queue if e.id not in ids]

    def release(self, ids: set[str]) -> None:
        for entry in self.queue:
            if entry.id in ids:
                entry.in_flight = False

    def nack(self, ids: set[str]) -> None:
        spent = []
        for entry in self.queue:
            if entry.id in ids:
                entry.in_flight = False
                entry.attempts += 1
                if entry.attempts >= MAX_ATTEMPTS:
                    spent.append(entry.id)
        self.bury(spent, "max-attempts")

    def bury(self, ids: list[str], reason: str) -> None:
        for id_ in ids:
            self.dead[id_] = reason
        self.ack(set(ids))

    def resume(self) -> None:
        for entry in self.queue:
            entry.in_flight = False


class StoreMachine(RuleBasedStateMachine):
    """Random verbs on a real store, checked against :class:`QueueModel` after each."""

    overflow: Literal["reject", "drop-oldest"] = "drop-oldest"

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="pigateway-model-"))
        self.config = StoreConfig(path=self.folder / "queue.db", max_commands=MAX_COMMANDS,
                                  overflow=self.overflow, max_attempts=MAX_ATTEMPTS,
                                  default_ttl=0, min_free_bytes=0,
                                  # the logic is under test here, not fsync (test_store_crash)
                                  synchronous="normal")
        self.runner = asyncio.Runner()
        self.store = self.run(Store.open(self.config))
        self.model = QueueModel(self.overflow)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.runner.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    # ---- producing

    @rule(device=devices, name=names, payload=params, priority=priorities)
    def put(self, device: str, name: str, payload: dict[str, Any], priority: str | None) -> None:
        self._put([NewCommand(device, name, payload, priority=priority)])

    @rule(items=st.lists(st.tuples(devices, names, params, priorities), min_size=1,
                         max_size=10))
    def put_many(self, items: list[tuple[str, str, dict[str, Any], str | None]]) -> None:
        self._put([NewCommand(device, name, payload, priority=priority)
                   for device, name, payload, priority in items])

    def _put(self, items: list[NewCommand]) -> None:
        if self.model.room_for(len(items)) is None:
            try:
                self.run(self.store.put_many(items))
            except QueueFull:
                return
            raise AssertionError("the model expected QueueFull")
        commands = self.run(self.store.put_many(items))
        assert [c.params for c in commands] == [i.params for i in items]
        self.model.put([Entry(c.id, c.name, priority=LANE[i.priority])
                        for c, i in zip(commands, items, strict=True)])

    # ---- draining

    @rule(limit=st.integers(1, 6))
    def claim(self, limit: int) -> None:
        claimed = self.run(self.store.claim(limit))
        expected = self.model.claim(limit)
        assert [c.id for c in claimed] == expected
        attempts = {e.id: e.attempts for e in self.model.queue}
        assert [c.attempts for c in claimed] == [attempts[c.id] for c in claimed]

    def _in_flight(self) -> list[str]:
        return [e.id for e in self.model.queue if e.in_flight]

    @precondition(lambda self: any(e.in_flight for e in self.model.queue))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._in_flight()), min_size=1, unique=True))
        assert self.run(self.store.ack(ids)) == len(ids)
        self.model.ack(set(ids))

    @precondition(lambda self: any(e.in_flight for e in self.model.queue))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._in_flight()), min_size=1, unique=True))
        self.run(self.store.nack(ids, "model says no"))
        self.model.nack(set(ids))

    @precondition(lambda self: any(e.in_flight for e in self.model.queue))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """Claimed rows given back unsent (some of them: a batch the broker refused while
        others stay in flight): the next claim offers exactly these first, in order."""
        ids = data.draw(st.lists(st.sampled_from(self._in_flight()), min_size=1, unique=True))
        self.run(self.store.release(ids))
        self.model.release(set(ids))

    @precondition(lambda self: any(e.in_flight for e in self.model.queue))
    @rule()
    def nack_all(self) -> None:
        """A lost link: everything in flight goes back, so attempts climb to the limit."""
        ids = self._in_flight()
        self.run(self.store.nack(ids, "link lost"))
        self.model.nack(set(ids))

    @precondition(lambda self: bool(self.model.queue))
    @rule(data=st.data(), reason=st.sampled_from(["invalid", "rejected-by-broker"]))
    def dead_letter(self, data: st.DataObject, reason: str) -> None:
        every = [e.id for e in self.model.queue]
        ids = data.draw(st.lists(st.sampled_from(every), min_size=1, max_size=3, unique=True))
        self.run(self.store.dead_letter(ids, reason))
        self.model.bury(ids, reason)

    @precondition(lambda self: bool(self.model.dead))
    @rule(data=st.data())
    def requeue_one(self, data: st.DataObject) -> None:
        """A dead letter goes back to the tail, attempts reset (limits do not apply); an
        ``invalid`` one was never a command and stays dead, refused by name."""
        id_ = data.draw(st.sampled_from(sorted(self.model.dead)))
        if self.model.dead[id_] == "invalid":
            with pytest.raises(InvalidCommand, match="evidence"):
                self.run(self.store.requeue_dead(id_))
            return
        assert self.run(self.store.requeue_dead(id_)) == 1
        del self.model.dead[id_]
        self.model.queue.append(Entry(id_, "", priority=self.model.lane[id_]))

    @rule(queued=st.booleans())
    def purge(self, queued: bool) -> None:
        expected = len(self.model.dead) + (len(self.model.queue) if queued else 0)
        assert self.run(self.store.purge(queued=queued)) == expected
        self.model.dead.clear()
        if queued:
            self.model.queue.clear()

    @rule()
    def reopen(self) -> None:
        """Close and open again as a drainer: whatever was in flight is queued again."""
        self.run(self.store.close())
        self.store = self.run(Store.open(self.config))
        self.model.resume()

    # ---- what must always hold

    @invariant()
    def same_queue(self) -> None:
        # requeues are not bounded by max_commands: every row, whatever the depth
        queued = self.run(self.store.list_queued(1000))
        expected = self.model.in_claim_order()
        assert [c.id for c in queued] == [e.id for e in expected]
        assert [c.attempts for c in queued] == [e.attempts for e in expected]

    @invariant()
    def same_stats(self) -> None:
        stats = self.run(self.store.stats())
        assert stats.depth == len(self.model.queue)
        assert stats.in_flight == len(self._in_flight())
        reasons: dict[str, int] = {}
        for reason in self.model.dead.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        assert stats.dead == reasons
        assert stats.bytes == sum(c.size for c in self.run(self.store.list_queued(100)))

    @invariant()
    def same_dead_letters(self) -> None:
        dead = self.run(self.store.list_dead(1000))
        assert {d.command.id: d.reason for d in dead} == self.model.dead


class RejectingStoreMachine(StoreMachine):
    """The same rules with ``overflow = "reject"``."""

    overflow = "reject"


_settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestStoreModel = StoreMachine.TestCase
TestStoreModel.settings = _settings
TestRejectingStoreModel = RejectingStoreMachine.TestCase
TestRejectingStoreModel.settings = settings(_settings, max_examples=20)
