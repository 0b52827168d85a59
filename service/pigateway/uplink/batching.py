"""Batching: pyoverkiz's action-queue rules, applied to what the drain claims from the store.

A command is durable the moment ``put`` returns, so nothing waits in memory *before* the
commit; batching only decides how rows that are already on disk travel to the broker:

- one action per device per batch; a later command of the same device is appended to that
  device's ``commands``, in the order it was put (per-device order holds across batches,
  because once a device's command is left for the next batch, all its later ones are too);
- at most ``max_actions`` devices and ``max_batch_bytes`` bytes of JSON per batch;
- the window ``batch_delay`` starts at the first pending command (its ``queued_at``) and is
  not reset by later ones, so a backlog goes at once; :meth:`Batcher.flush` ends it now;
- a command that alone does not fit in ``max_batch_bytes`` is dead-lettered ``too-large``
  (never retried forever), one past its TTL ``expired`` (stale commands are never replayed
  to a physical device);
- rows of kind ``result`` travel alone, one message each, on the results topic; rows of
  kind ``forward`` (:mod:`pigateway.ingest`) too, each as the device's own message on its
  own topic (:func:`pigateway.mqtt.forwarded.unpack`).

The pure functions (:func:`encode_command`, :func:`take_batch`, :func:`plan`) are what the
tests call directly; :class:`Batcher` is the small async driver between store and uplink.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, Protocol, TypeVar

from pigateway import wire
from pigateway.aio import first_of
from pigateway.mqtt import forwarded
from pigateway.store.ids import new_id
from pigateway.uplink.ahead import SOLO, Ahead, Row

REASON_TOO_LARGE = "too-large"
#: A command the broker refused for good (a PUBACK failure code), found alone
REJECTED: Final = "rejected-by-broker"
REASON_EXPIRED = "expired"
#: A row whose params cannot be sent as JSON (NaN, Infinity: never written by a put; a
#: salvaged or hand-edited file): dead-lettered alone, never requeued (it would fail again)
REASON_INVALID = "invalid"
#: Batches' worth of rows the batcher holds claimed ahead under a backlog, at least (one
#: per in-flight slot when there are more slots): the rows of the devices a PUBACK frees are
#: at hand when it comes. Held per device (:mod:`pigateway.uplink.ahead`), a batch costs its own
#: rows, not what is held.
AHEAD = 2


class Queued(Row, Protocol):
    """What batching needs of a claimed row (the store's ``Command`` has all of it): what the
    per-device queues need, and the deadline."""

    @property
    def expires_at(self) -> float | None: ...


C = TypeVar("C", bound=Queued)


class Deadlines(Protocol):
    """The clock ``expires_at`` is on (the store's gateway clock, :mod:`pigateway.store.clock`)."""

    def now(self) -> float: ...


class WorkSource(Protocol[C]):
    """The part of the store the batcher uses (narrow on purpose: tests can read it at a glance)."""

    @property
    def clock(self) -> Deadlines: ...

    async def claim(self, limit: int) -> list[C]: ...
    async def release(self, ids: Sequence[str]) -> None: ...
    async def wait_for_work(self, timeout: float) -> None: ...
    async def dead_letter(
        self, ids: Sequence[str], reason: str, detail: str | None = None
    ) -> None: ...


class Gate(Protocol):
    """Which devices are in a batch not acknowledged yet (:class:`~.inflight.InFlight`)."""

    def busy(self) -> Collection[str]: ...
    def free_slots(self) -> int: ...
    def arm(self) -> None: ...
    async def wait_freed(self) -> None: ...


class Open:
    """No device is ever busy (tests, the bench's plans): every batch may go at once."""

    def busy(self) -> Collection[str]:
        return ()

    def free_slots(self) -> int:
        return 1

    def arm(self) -> None:
        return None

    async def wait_freed(self) -> None:
        await asyncio.Event().wait()  # never: nothing is ever freed


@dataclass(frozen=True)
class Rules:
    """The limits of one batch, from ``[uplink]`` plus the gateway id that goes in every batch.

    ``max_batch_bytes`` is what batches are packed to; ``hard_bytes`` (default: the same) is
    what decides ``too-large``. They differ only while the uplink packs smaller batches than
    it knows the broker takes (a limit learnt under MQTT 3.1.1): then a command between the
    two still travels, alone.
    """

    gateway: str
    max_actions: int = 50
    max_batch_bytes: int = 256 * 1024
    hard_bytes: int | None = None

    @property
    def too_large_above(self) -> int:
        return self.hard_bytes or self.max_batch_bytes


@dataclass(frozen=True)
class Batch(Generic[C]):
    """One MQTT message: a batch of actions, or a single result document; or a *train*:
    several forwarded messages of one local topic, in order (:func:`train_parts`)."""

    id: str
    kind: Literal["actions", "results", "forward"]
    commands: tuple[C, ...]
    payload: bytes
    #: forwarded messages, one per command: uplink topic and what each carries besides
    #: the payload (``payload`` is the first one's)
    forwards: tuple[forwarded.Forward, ...] = ()

    @property
    def ids(self) -> list[str]:
        return [command.id for command in self.commands]

    @property
    def forward(self) -> forwarded.Forward | None:
        """The forwarded message a batch of one is (None: not a forward)."""
        return self.forwards[0] if self.forwards else None

    @property
    def train(self) -> bool:
        """Several messages of one topic: published one after the other, each its own
        PUBLISH, without waiting for the PUBACK before the next (:func:`train_parts`)."""
        return len(self.forwards) > 1


def train_parts(batch: Batch[C]) -> list[Batch[C]]:
    """A train as the single messages it is made of, in order, each a batch of its own.

    The ledger (:mod:`pigateway.uplink.inflight`) holds the train's topic by the train, as a
    split batch's devices are held by the batch first built: the topic's next messages
    wait until every part is done, whatever happens to each part on the way.
    """
    return [Batch(command.id, "forward", (command,), forward.payload, (forward,))
            for command, forward in zip(batch.commands, batch.forwards, strict=True)]


@dataclass(frozen=True)
class Take(Generic[C]):
    """What :func:`take_batch` made of the pending rows."""

    batch: Batch[C] | None
    rest: list[C]
    too_large: list[C] = field(default_factory=list)
    expired: list[C] = field(default_factory=list)
    #: rows whose params cannot be encoded as JSON (:data:`REASON_INVALID`)
    invalid: list[C] = field(default_factory=list)


def encode_command(command: Queued) -> str:
    """The wire form of one command inside a batch (:func:`pigateway.wire.batch_command`):
    a claimed row's params as the queue stores them, spliced, not decoded and encoded
    again (the largest per-command cost of a drain)."""
    stored: str | None = getattr(command, "params_json", None)
    if stored is not None:
        return wire.batch_command_stored(command.id, command.name, stored, command.queued_at)
    return wire.batch_command(command.id, command.name, command.params, command.queued_at)


def utf8_length(text: str) -> int:
    """The bytes ``text`` takes in UTF-8 (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode())


def is_expired(command: Queued, now: float) -> bool:
    return command.expires_at is not None and command.expires_at <= now


class _Builder:
    """Assembles one actions batch, keeping its exact JSON size as commands are added."""

    def __init__(self, rules: Rules, batch_id: str, sent_at: float) -> None:
        self.rules = rules
        self.head = wire.batch_head(rules.gateway, batch_id, sent_at)
        self.batch_id = batch_id
        self.actions: dict[str, list[str]] = {}
        self.members: list[Queued] = []
        self.size = len(self.head.encode()) + len(wire.batch_tail())

    @staticmethod
    def _action_frame(device: str) -> int:
        return len(wire.action(device, []).encode())

    def cost(self, device: str, size: int) -> int:
        """Bytes that adding an encoded command of ``size`` bytes for ``device`` would add
        to the payload."""
        if device in self.actions:
            return size + 1
        return size + self._action_frame(device) + (1 if self.actions else 0)

    def fits(self, device: str, size: int) -> bool:
        """Whether an encoded command of ``size`` bytes for ``device`` fits."""
        if device not in self.actions and len(self.actions) >= self.rules.max_actions:
            return False
        return self.size + self.cost(device, size) <= self.rules.max_batch_bytes

    def add(self, command: Queued, encoded: str, size: int) -> None:
        self.size += self.cost(command.device, size)
        self.actions.setdefault(command.device, []).append(encoded)
        self.members.append(command)

    def payload(self) -> bytes:
        actions = ",".join(wire.action(device, commands)
                           for device, commands in self.actions.items())
        return f"{self.head}{actions}{wire.batch_tail()}".encode()


def fits_alone(command: Queued, rules: Rules, encoded: str | None = None) -> bool:
    """Whether a command can travel at all under ``max_batch_bytes``."""
    if command.kind in SOLO:
        return True  # one message each: the broker's PUBACK says whether it is too large
    hard = dataclasses.replace(rules, max_batch_bytes=rules.too_large_above)
    builder = _Builder(hard, new_id(0), time.time())
    return builder.fits(command.device, utf8_length(encoded or encode_command(command)))


def take_batch(pending: Sequence[C], rules: Rules, *, now: float,
               batch_id: str | None = None, expires_now: float | None = None,
               busy: Collection[str] = (), train: int = 1) -> Take[C]:
    """Take the next batch from ``pending`` (oldest first); return it with what is left.

    Rows of a ``busy`` device (one in a batch the broker has not acknowledged yet,
    :mod:`pigateway.uplink.inflight`) stay pending, in order: a device is in at most one batch at
    a time. Of the other rows the oldest decides: a result travels alone, a forwarded row
    with at most ``train`` - 1 forwarded rows of its topic that follow it (a train, each
    its own PUBLISH); otherwise the action rows are packed in order, skipping the rows that
    travel alone (they stay pending) and any device that already had to wait. ``now`` is
    the wall clock (``sent_at``, the batch id, a train's id); ``expires_now`` the clock
    ``expires_at`` is on (the store's gateway clock; ``now`` when not given). A train's id
    is its first row's with ``-train`` (a row is in one train at a time).
    """
    expiry_now = now if expires_now is None else expires_now
    if pending and pending[0].kind in SOLO and pending[0].device not in busy \
            and not is_expired(pending[0], expiry_now):
        taken = _take_result(list(pending), rules, [], expiry_now)  # no scan: one at a time
        if train > 1 and taken.batch is not None and taken.batch.kind == "forward":
            return _take_train(taken.batch, taken.rest, train, expiry_now,
                               batch_id or f"{taken.batch.id}-train")
        return taken
    expired: list[C] = []
    live: list[C] = []
    for command in pending:
        (expired if is_expired(command, expiry_now) else live).append(command)
    first = next((n for n, c in enumerate(live) if c.device not in busy), None)
    if first is None:
        return Take(None, live, expired=expired)
    if live[first].kind in SOLO:
        taken = _take_result(live[first:], rules, expired, expiry_now)
        return dataclasses.replace(taken, rest=[*live[:first], *taken.rest])
    return _take_actions(live, rules, now, batch_id or new_id(now), expired, busy=busy)


def _take_result(live: list[C], rules: Rules, expired: list[C], now: float) -> Take[C]:
    head, rest = live[0], live[1:]
    if head.kind == "forward":
        left = None if head.expires_at is None else head.expires_at - now
        try:
            forward = forwarded.unpack(head.params, ttl_left=left, command_id=head.id)
        except ValueError:
            return Take(None, rest, too_large=[head], expired=expired)
        return Take(Batch(head.id, "forward", (head,), forward.payload, (forward,)), rest,
                    expired=expired)
    stored: str | None = getattr(head, "params_json", None)  # as queued: no encoding again
    try:
        payload = (wire.encode(head.params) if stored is None else stored).encode()
    except (TypeError, ValueError):  # UnicodeEncodeError too: one row, one failure
        return Take(None, rest, expired=expired, invalid=[head])
    if len(payload) > rules.too_large_above:
        return Take(None, rest, too_large=[head], expired=expired)
    return Take(Batch(head.id, "results", (head,), payload), rest, expired=expired)


def _take_train(first: Batch[C], rest: list[C], most: int, now: float,
                train_id: str) -> Take[C]:
    """``first`` (one forwarded message) with the forwarded rows of its topic that follow
    it in ``rest``, up to ``most`` in all: the topic's rows in ``rest`` are its next ones, in
    order. The train ends before the first row of the topic that is no forward, is
    expired or does not unpack (it is judged alone, as the head of a later take)."""
    device = first.commands[0].device
    rows: list[C] = [first.commands[0]]
    forwards = list(first.forwards)
    left: list[C] = []
    ended = False
    for row in rest:
        if ended or row.device != device or len(rows) >= most:
            left.append(row)
            continue
        forward = _forward_of(row, now) if row.kind == "forward" else None
        if forward is None:
            ended = True
            left.append(row)
            continue
        rows.append(row)
        forwards.append(forward)
    if len(rows) == 1:
        return Take(first, rest)
    return Take(Batch(train_id, "forward", tuple(rows), first.payload, tuple(forwards)), left)


def _forward_of(row: Queued, now: float) -> forwarded.Forward | None:
    """The message a forward row holds, or None when it must be judged alone (expired,
    not a message)."""
    if is_expired(row, now):
        return None
    left = None if row.expires_at is None else row.expires_at - now
    try:
        return forwarded.unpack(row.params, ttl_left=left, command_id=row.id)
    except ValueError:
        return None


def _take_actions(live: list[C], rules: Rules, now: float, batch_id: str,
                  expired: list[C], *, busy: Collection[str] = ()) -> Take[C]:
    builder = _Builder(rules, batch_id, now)
    waiting: set[str] = set(busy)
    rest: list[C] = []
    too_large: list[C] = []
    invalid: list[C] = []
    for command in live:
        if command.kind in SOLO or command.device in waiting or _cannot_join(builder, command):
            waiting.add(command.device)  # a device's later actions wait behind it too
            rest.append(command)
            continue
        try:  # a lone surrogate fails utf8_length (UnicodeEncodeError), not the payload
            encoded = encode_command(command)
            size = utf8_length(encoded)
        except (TypeError, ValueError):  # one row, one failure: never the claim's, nor
            # its batch's (a BLOB where text belongs: SQLite keeps it in a TEXT column)
            invalid.append(command)
            continue
        if builder.fits(command.device, size):
            builder.add(command, encoded, size)
        elif not fits_alone(command, rules, encoded):
            too_large.append(command)
        elif not builder.members:
            builder.add(command, encoded, size)  # over the packing size, under the hard one
        else:
            waiting.add(command.device)
            rest.append(command)
    batch = Batch(batch_id, "actions", tuple(builder.members), builder.payload()) \
        if builder.members else None
    return Take(batch, rest, too_large=too_large, expired=expired,  # type: ignore[arg-type]
                invalid=invalid)


def _cannot_join(builder: _Builder, command: Queued) -> bool:
    """Whether ``command`` surely does not fit in a batch already started, told without
    encoding it (its params alone are ``size`` bytes): a long backlog is not encoded row by
    row once the batch is full."""
    if not builder.members:
        return False
    if command.device not in builder.actions and len(builder.actions) >= builder.rules.max_actions:
        return True
    return command.size + len(command.name) > builder.rules.max_batch_bytes - builder.size


@dataclass(frozen=True)
class Plan(Generic[C]):
    """Every batch a set of rows makes, in sending order, and the rows that cannot travel."""

    batches: list[Batch[C]]
    too_large: list[C]
    expired: list[C]
    invalid: list[C] = field(default_factory=list)


def plan(commands: Sequence[C], rules: Rules, *, now: float) -> Plan[C]:
    """All the batches ``commands`` make, in sending order (for tests and the bench)."""
    result: Plan[C] = Plan([], [], [])
    pending = list(commands)
    while pending:
        take = take_batch(pending, rules, now=now)
        result.too_large.extend(take.too_large)
        result.expired.extend(take.expired)
        result.invalid.extend(take.invalid)
        if take.batch is not None:
            result.batches.append(take.batch)
        pending = take.rest
    return result


def split(batch: Batch[C], rules: Rules, *, now: float) -> list[Batch[C]]:
    """A refused batch of several commands as batches of its two halves, in order.

    A broker that refuses a whole batch for good (too large, invalid) may object to one
    command only: halving again and again finds that one while the others are delivered.
    Each half is a subset of a batch that fitted, so it fits in one batch of its own; none
    is judged expired here (every claimed row must stay in some batch, or it would stay
    claimed with nobody to give it back). Raises ``ValueError`` if a row found no batch.
    """
    if len(batch.commands) < 2:
        return [batch]
    middle = len(batch.commands) // 2
    parts: list[Batch[C]] = []
    for half in (batch.commands[:middle], batch.commands[middle:]):
        pending: list[C] = list(half)
        for _ in range(len(half)):  # at most one batch per command
            take = take_batch(pending, rules, now=now, expires_now=-math.inf)
            if take.batch is None:
                break
            parts.append(take.batch)
            pending = take.rest
            if not pending:
                break
    if sorted(i for part in parts for i in part.ids) != sorted(batch.ids):
        raise ValueError(f"batch {batch.id} could not be split without losing a command")
    return parts


# --------------------------------------------------------------------------- the driver


class Batcher(Generic[C]):
    """Claims rows from the store and hands out one batch at a time, under the window rules.

    Rows it has claimed but not yet handed out stay held (:attr:`pending`, in flight in
    the store's eyes), one queue per device (:class:`~pigateway.uplink.ahead.Ahead`); the uplink
    gives them back with :meth:`give_back` when its link ends. :meth:`interrupt` makes a
    waiting :meth:`next_batch` return ``None`` (pause, stop) without ever abandoning a
    claim half-way: a claim the writer runs is always recorded.
    """

    def __init__(self, store: WorkSource[C], rules: Rules, *, batch_delay: float,
                 claim_limit: int = 500, idle_poll: float = 5.0,
                 clock: Callable[[], float] = time.time, gate: Gate | None = None) -> None:
        """``clock`` is the wall clock (``queued_at``, ``sent_at``); expiry is judged on
        ``store.clock``, the clock ``expires_at`` is on, which a wall-clock step does not
        move. ``gate``: the devices in a batch not acknowledged yet, whose rows wait."""
        self.store = store
        self.gate: Gate = gate or Open()
        self.base_rules = rules
        self.rules = rules
        self.batch_delay = batch_delay
        self.claim_limit = claim_limit
        self.idle_poll = idle_poll
        self.clock = clock
        self.held: Ahead[C] = Ahead()
        self._more = False  # the last claim was full: the store likely holds more
        self._returned: list[C] = []
        self._woken = asyncio.Event()  # rows were put back
        self._flush = asyncio.Event()
        self._interrupt = asyncio.Event()

    @property
    def pending(self) -> list[C]:
        """Every row held, in claim order (for views and tests: O(rows held))."""
        return self.held.in_order()

    def limit(self, packing: int, hard: int) -> None:
        """Pack batches to ``packing`` bytes and call ``too-large`` only above ``hard``.

        Both are capped by the rules the batcher was made with; the uplink calls this per
        connection with what the broker takes (see :class:`Rules`).
        """
        self.rules = dataclasses.replace(
            self.base_rules, max_batch_bytes=min(packing, hard, self.base_rules.max_batch_bytes),
            hard_bytes=min(hard, self.base_rules.max_batch_bytes))

    def flush(self) -> None:
        """End the current window now: what is pending goes at once."""
        self._flush.set()

    def interrupt(self) -> None:
        """Make :meth:`next_batch` return ``None`` soon, until :meth:`proceed`."""
        self._interrupt.set()

    def proceed(self) -> None:
        self._interrupt.clear()

    def put_back(self, commands: Sequence[C]) -> None:
        """Rows of a batch that failed alone go first again (still claimed): ahead of
        every later row of their devices, which stayed held meanwhile.

        Kept aside until :meth:`next_batch` looks again (it may be waiting on the store
        with the held rows in hand), in the order they came back.
        """
        self._returned.extend(commands)
        self._woken.set()

    def claimed(self) -> list[str]:
        """Ids of every row claimed and not handed out (held or put back)."""
        return [command.id for command in (*self._returned, *self.held.in_order())]

    def give_back(self) -> list[str]:
        """Forget the held rows and return their ids (the caller releases them)."""
        ids = self.claimed()
        self.held.clear()
        self._returned = []
        return ids

    def _merge_returned(self) -> None:
        self._woken.clear()
        if self._returned:
            self.held.put_first(self._returned)
            self._returned = []

    async def next_batch(self) -> Batch[C] | None:
        """Wait for work and the window, then return the next batch (``None``: interrupted)."""
        while True:
            if not await self._gather():
                return None
            self.gate.arm()
            self._merge_returned()
            rules, candidates, train = self._candidates(self.gate.busy())
            take = take_batch(candidates, rules, now=self.clock(),
                              expires_now=self.store.clock.now(), train=train)
            # rows are forgotten only once the dead letters are on disk: a cancel (the link
            # dropped) or a store error while they are written leaves every row held, the
            # batch's too, in order, for give_back() or the next call
            await self._discard(take)
            gone = self.held.remove(candidates, take.rest)
            if not self.held:
                self._flush.clear()
            if take.batch is not None:
                return take.batch
            if self.held and not gone:
                await self._blocked()

    def _candidates(self, busy: Collection[str]) -> tuple[Rules, list[C], int]:
        """The rules for the next batch, the rows it may take (the free devices' first
        rows, about a batch's worth and a quarter: the batch costs its own rows, not all
        held) and how long a train of forwarded messages may be.

        A device is in one unacknowledged batch at a time, so one batch holding every
        device would leave the other in-flight slots idle until its PUBACK. When the free
        devices' rows make several batches' worth, each batch takes
        ``devices / min(free slots, batches' worth)`` of them: the batches stay full and
        travel side by side. A light load (one batch's worth) still goes as one message.
        A forwarded message is a PUBLISH of its own, so a topic's train takes its share of
        the free slots (free slots / free devices), one slot a message.
        """
        ready = self.held.ready(busy)
        rules = self.rules
        slots = self.gate.free_slots()
        train = max(1, slots // max(1, len(ready)))
        if slots > 1 and len(ready) > 1:
            worth = min(slots, max(self.held.weight_of(ready) // rules.max_batch_bytes,
                                   len(ready) // rules.max_actions))
            if worth > 1:
                rules = dataclasses.replace(
                    rules, max_actions=min(rules.max_actions, math.ceil(len(ready) / worth)))
        return rules, self.held.candidates(ready, budget=rules.max_batch_bytes * 5 // 4,
                                           most=rules.max_actions, train=train), train

    async def _blocked(self) -> None:
        """Every held row waits for its device's batch in flight: wait until a device is
        freed, or new work comes (maybe for another device: then claim it)."""
        if self._interrupt.is_set():
            return
        if not self._full(AHEAD) and await self._claim():
            return  # meanwhile, the rows for the devices' next batches (or a free device's)
        woken = await first_of(self.gate.wait_freed(), self._interrupt.wait(),
                               self._woken.wait(), self.store.wait_for_work(self.idle_poll))
        if woken == 3 and len(self.held) < self.claim_limit:
            await self._claim()

    async def _gather(self) -> bool:
        """Hold rows until the oldest one's window is over (or a flush, or a full batch).

        Returns False when interrupted.
        """
        self._merge_returned()
        while not self.held:
            if self._interrupt.is_set():
                return False
            if not await self._claim():
                self._flush.clear()
                await self._wait(self.idle_poll)
            self._merge_returned()
        if self.held.first_is_solo():
            return not self._interrupt.is_set()  # travels alone: no window to wait for
        # the window is counted on the monotonic clock: a wall clock set back (a Pi without
        # an RTC meeting NTP) must not hold a batch for the size of the jump
        age = max(0.0, self.clock() - self.held.oldest())
        deadline = time.monotonic() + max(0.0, self.batch_delay - age)
        while not self._flush.is_set() and not self._full():
            if self._interrupt.is_set():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._wait(left)
            if deadline <= time.monotonic():
                break  # the window is over: what is held goes now, no further store call
            await self._claim()
        # under a backlog (the last claim was full), the rows of the next batches too, so
        # that batches of different devices travel side by side (:meth:`_candidates`);
        # a light load costs no further store call: its batch goes now
        for _ in range(AHEAD):
            if not self._more or self._full(AHEAD) or not await self._claim():
                break
        return not self._interrupt.is_set()

    def _full(self, batches: int = 1) -> bool:
        """A cheap estimate (O(1)) of whether the held rows make ``batches`` whole ones."""
        held = self.held
        if held.first_is_solo():
            return True  # a result or forwarded message travels alone: nothing to wait or claim for
        worth = max(held.weight // self.rules.max_batch_bytes,
                    held.devices() // self.rules.max_actions)
        return worth >= batches

    async def _claim(self) -> int:
        """Claim more rows; if cancelled meanwhile, still record what the writer claimed."""
        claim = asyncio.ensure_future(self.store.claim(self.claim_limit))
        try:
            got = await asyncio.shield(claim)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.held.extend(await claim)
            raise
        self.held.extend(got)
        self._more = len(got) >= self.claim_limit
        return len(got)

    async def _wait(self, seconds: float) -> None:
        """Until the store sees new work, a flush, an interrupt, or ``seconds`` pass."""
        if self._flush.is_set() or self._interrupt.is_set() or self._returned:
            return
        await first_of(self.store.wait_for_work(seconds), self._flush.wait(),
                       self._interrupt.wait(), self._woken.wait())

    async def _discard(self, take: Take[C]) -> None:
        if take.too_large:
            await self.store.dead_letter(
                [c.id for c in take.too_large], REASON_TOO_LARGE,
                f"bigger than the largest batch allowed ({self.rules.too_large_above} bytes: "
                "uplink.max_batch_bytes or the broker's maximum packet size)",
            )
        if take.expired:
            await self.store.dead_letter([c.id for c in take.expired], REASON_EXPIRED,
                                         "its ttl ran out before it could be sent")
        if take.invalid:
            await self.store.dead_letter([c.id for c in take.invalid], REASON_INVALID,
                                         "its stored params are not JSON (NaN or Infinity), "
                                         "not UTF-8, or a field is not text")
