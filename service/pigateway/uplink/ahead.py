"""The rows the batcher holds claimed ahead: one queue per device, in claim order.

Why a queue per device: a device is in at most one unacknowledged batch
(:mod:`pigateway.uplink.inflight`), so under a backlog most claimed rows belong to devices that
are busy. Kept as one list, every batch had to walk past all of them to find the free
devices' rows (O(rows claimed ahead) per batch, and deeper claim-ahead cost more per
batch than it won). Indexed by device, a batch looks only at the free devices and, of
each, only the rows that may fit (O(devices + the batch's own rows)), so the batcher can
hold enough rows ahead for every in-flight slot.

Order: a device's rows stay in the order they were claimed (rows put back go first, in
the order they came back, :meth:`Ahead.put_first`); nothing here reorders a device's rows.
Across devices the order is only fairness: a device whose rows went out moves to the end.
Every row keeps its claim sequence number, so a batch lists its commands in claim order
and :meth:`Ahead.in_order` gives back exactly what a single list would have held.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol, TypeVar

#: Kinds of rows that travel alone, one message each (the batcher's SOLO).
SOLO = ("result", "forward")


class Row(Protocol):
    """What the queues need of a claimed row."""

    @property
    def id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def queued_at(self) -> float: ...
    @property
    def size(self) -> int: ...
    @property
    def params(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Row)


def weight(row: Row) -> int:
    """About the bytes a row takes in a batch (its params, its name, the rest of its frame)."""
    return row.size + len(row.name) + 96


class Ahead(Generic[R]):
    """Claimed rows not handed out yet, by device; counts kept as rows come and go."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[tuple[int, R, int]]] = OrderedDict()
        self._weights: dict[str, int] = {}
        self.rows = 0
        #: estimated bytes of every row held (:func:`weight`)
        self.weight = 0
        self._last = 0  # claim sequence of the newest row
        self._first = 0  # sequence of the row put back first (below every claim)

    def __bool__(self) -> bool:
        return self.rows > 0

    def __len__(self) -> int:
        return self.rows

    def devices(self) -> int:
        return len(self._queues)

    def extend(self, rows: Iterable[R]) -> None:
        """Rows just claimed: after every row held."""
        for row in rows:
            self._last += 1
            self._push(row, self._last)

    def put_first(self, rows: Sequence[R]) -> None:
        """Rows that go first again (a batch that failed alone), in the order given,
        ahead of every row held: their devices move to the front."""
        self._first -= len(rows)
        for n in range(len(rows) - 1, -1, -1):
            row = rows[n]
            self._push(row, self._first + n, front=True)
            self._queues.move_to_end(row.device, last=False)

    def _push(self, row: R, seq: int, *, front: bool = False) -> None:
        queue = self._queues.get(row.device)
        if queue is None:
            queue = self._queues[row.device] = deque()
            self._weights[row.device] = 0
        size = weight(row)
        if front:
            queue.appendleft((seq, row, size))
        else:
            queue.append((seq, row, size))
        self._count(row.device, 1, size)

    def _count(self, device: str, rows: int, size: int) -> None:
        self.rows += rows
        self.weight += size
        self._weights[device] += size

    def ready(self, busy: Collection[str]) -> list[str]:
        """Devices with rows held that are in no unacknowledged batch, fairest first."""
        return [device for device in self._queues if device not in busy]

    def weight_of(self, devices: Iterable[str]) -> int:
        return sum(self._weights[device] for device in devices)

    def first_is_solo(self) -> bool:
        """Whether the row at the front travels alone (nothing to wait or claim for)."""
        for queue in self._queues.values():
            return queue[0][1].kind in SOLO
        return False

    def oldest(self) -> float:
        """The earliest ``queued_at`` held (a device's first row is its oldest)."""
        return min(queue[0][1].queued_at for queue in self._queues.values())

    def candidates(self, devices: Iterable[str], *, budget: int, most: int,
                   train: int = 1) -> list[R]:
        """The rows the next batch may take: of at most ``most`` of ``devices``, each
        device's rows from its first (up to a row that travels alone; a topic whose first
        row is a forwarded message, up to ``train`` of them in a row), until about
        ``budget`` bytes; in claim order. O(the rows returned)."""
        picked: list[tuple[int, R, int]] = []
        spent = 0
        for count, device in enumerate(devices):
            if count >= most or spent >= budget:
                break
            queue = self._queues[device]
            if train > 1 and queue[0][1].kind == "forward":
                spent += self._train(queue, train, picked)
                continue
            for entry in queue:
                picked.append(entry)
                spent += entry[2]
                if spent >= budget or entry[1].kind in SOLO:
                    break
        picked.sort(key=lambda entry: entry[0])
        return [entry[1] for entry in picked]

    @staticmethod
    def _train(queue: deque[tuple[int, R, int]], most: int,
               picked: list[tuple[int, R, int]]) -> int:
        """A topic's first forwarded rows, at most ``most``, into ``picked``; their weight."""
        spent = 0
        for n, entry in enumerate(queue):
            if n >= most or entry[1].kind != "forward":
                break
            picked.append(entry)
            spent += entry[2]
        return spent

    def remove(self, candidates: Sequence[R], kept: Iterable[R]) -> int:
        """Forget the ``candidates`` not ``kept`` (handed out, dead-lettered); returns how many.

        Each device's candidates are the front of its queue: they are taken off and the
        kept ones put back in front, in their order. A device that gave rows moves to the end.
        """
        stay = {row.id for row in kept}
        seen: dict[str, int] = {}
        losing: set[str] = set()
        for row in candidates:
            seen[row.device] = seen.get(row.device, 0) + 1
            if row.id not in stay:
                losing.add(row.device)
        gone = 0
        for device, count in seen.items():
            if device not in losing:  # every candidate of it kept: its queue is as it was
                continue
            queue = self._queues[device]
            front = [queue.popleft() for _ in range(count)]
            back = [entry for entry in front if entry[1].id in stay]
            queue.extendleft(reversed(back))
            lost = len(front) - len(back)
            gone += lost
            self._count(device, -lost, -sum(entry[2] for entry in front) + sum(e[2] for e in back))
            if not queue:
                del self._queues[device]
                del self._weights[device]
            elif lost:
                self._queues.move_to_end(device)
        return gone

    def in_order(self) -> list[R]:
        """Every row held, in claim order (rows put back first)."""
        entries = [entry for queue in self._queues.values() for entry in queue]
        entries.sort(key=lambda entry: entry[0])
        return [entry[1] for entry in entries]

    def __iter__(self) -> Iterator[R]:
        return iter(self.in_order())

    def clear(self) -> None:
        self._queues.clear()
        self._weights.clear()
        self.rows = self.weight = 0
