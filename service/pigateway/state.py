"""The one observable state of a running gateway.

LEDs, systemd's ``STATUS=`` line, the retained state message, the control socket and
``pigateway status`` all read this object; nothing computes its own copy. Writers call the
typed writers (:meth:`GatewayState.set_link`, :meth:`~GatewayState.set_fault`, ...) or
:meth:`GatewayState.update`; readers await :meth:`GatewayState.changed`.

A fault is owned by its source (:class:`FaultSource`): each sets and clears only its own, so
the link coming up cannot hide a wedged store. ``fault``, what the views read, is the oldest
fault still set.

A refusal is work pigateway turns away while it runs (:class:`Refusal`: the queue full, the
disk at its reserve, a store that cannot take a write), owned like a fault by the part that
sees it (:class:`Refuser`). Every view shows it (``refusing``, ``refusals``), and its writer
says it in the journal at warning once per episode, so a gateway that has stopped taking
commands never looks healthy.

``link_since`` is when the link last went up or down: an outage's clock runs from when the
link was lost, whatever reconnect attempts come and go inside it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any

from pigateway.errors import QueueFull, StoreError, StoreFull

log = logging.getLogger(__name__)

#: Seconds after a refusal ended within which the same refusal is the same episode (not
#: said again at warning).
EPISODE_GAP = 30.0


class FaultSource(enum.StrEnum):
    """Who set a fault; only that source clears it."""

    LINK = "link"  #: the uplink: refused login, TLS set-up
    DRAIN = "drain"  #: the uplink's drain: a store stuck or gone under it
    WATCHDOG = "watchdog"  #: systemd.py: the store writer does not answer
    STORE = "store"  #: the app: the store is gone (corrupt)
    OTHER = "other"  #: :meth:`GatewayState.update` with ``fault=`` (tests, tools)


class Refusal(enum.StrEnum):
    """Why work is refused (the ``reason`` label of ``pigateway_refusing``)."""

    QUEUE_FULL = "queue-full"  #: the queue at store.max_commands/max_bytes, overflow reject
    DISK_RESERVE = "disk-reserve"  #: the disk under store.min_free_bytes
    STORE_BUSY = "store-busy"  #: the store cannot take a write now (locked, failing)

    @classmethod
    def of(cls, error: StoreError) -> Refusal:
        """The reason of a store's refusal."""
        if isinstance(error, StoreFull):
            return cls.DISK_RESERVE
        if isinstance(error, QueueFull):
            return cls.QUEUE_FULL
        return cls.STORE_BUSY


class Refuser(enum.StrEnum):
    """Who sees a refusal; only that part sets and clears it."""

    QUEUE = "queue"  #: the app's look at the queue: every producer would be refused
    INGEST = "ingest"  #: ingest: the store refuses the local broker's messages
    INBOUND = "inbound"  #: the uplink's intake: the store refuses the cloud's commands


class Link(enum.StrEnum):
    """Where the MQTT uplink stands."""

    OFFLINE = "offline"
    CONNECTING = "connecting"
    ONLINE = "online"


@dataclass
class GatewayState:
    """What the gateway is doing now. Mutate only through the writers and :meth:`update`."""

    link: Link = Link.OFFLINE
    #: the local broker's link of :mod:`pigateway.ingest`; None when no ``[[ingest]]`` rule
    local: Link | None = None
    paused: bool = False
    draining: bool = False
    depth: int = 0
    oldest_age: float | None = None
    in_flight: int = 0
    #: commands the broker acknowledged that ``depth`` still counts (their delete has not
    #: committed, or no read of the queue's figures began since): ``depth - acked`` wait
    #: or are in flight
    acked: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    fault: str | None = None
    #: the oldest refusal still set, as ``who: reason: detail`` (None: work is taken)
    refusing: str | None = None
    #: what the broker and the config allow on the current link (see Uplink.limits_in_force)
    limits: dict[str, Any] | None = None
    #: why the pins are mock (pin_factory = "auto" without a gpiochip); None: real or asked for
    pins: str | None = None
    retry_at: float | None = None
    #: when the link last went up (online) or down (anything else)
    link_since: float = field(default_factory=time.time)
    started_at: float = field(default_factory=time.time)
    version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    _faults: dict[FaultSource, str] = field(default_factory=dict, repr=False, compare=False)
    _refusals: dict[Refuser, tuple[Refusal, str]] = field(default_factory=dict, repr=False,
                                                          compare=False)
    _refusals_ended: dict[Refuser, tuple[Refusal, float]] = field(
        default_factory=dict, repr=False, compare=False)
    #: acknowledged rows not deleted yet; rows deleted in all; of those, the ones a read
    #: of the queue's figures began after (so ``depth`` no longer counts them)
    _acked_rows: int = field(default=0, repr=False, compare=False)
    _deleted: int = field(default=0, repr=False, compare=False)
    _deleted_seen: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fault is not None:
            self._faults[FaultSource.OTHER] = self.fault

    # ---- typed writers

    def set_link(self, link: Link, *, retry_at: float | None = None) -> bool:
        """Where the uplink stands; ``retry_at`` (wall clock) while it waits to reconnect."""
        return self.update(link=link, retry_at=retry_at)

    def set_local(self, link: Link | None) -> bool:
        """Where ingest's link to the local broker stands (None: no ingest)."""
        return self.update(local=link)

    def set_retry_at(self, retry_at: float | None) -> bool:
        return self.update(retry_at=retry_at)

    def set_paused(self, paused: bool) -> bool:
        return self.update(paused=paused)

    def set_progress(self, *, in_flight: int | None = None,
                     draining: bool | None = None) -> bool:
        """Batches unacknowledged, and whether rows are on their way (given ones only)."""
        changes: dict[str, Any] = {}
        if in_flight is not None:
            changes["in_flight"] = in_flight
        if draining is not None:
            changes["draining"] = draining
        return self.update(**changes)

    def set_queue(self, depth: int, oldest_age: float | None, dead_letters: int, *,
                  deleted_before: int | None = None) -> bool:
        """The store's figures: queued rows, the oldest one's age, dead letters;
        ``deleted_before``: :meth:`queue_read_begins` as the read began (its figures show
        every delete that committed before)."""
        if deleted_before is not None:
            self._deleted_seen = max(self._deleted_seen, deleted_before)
        return self.update(depth=depth, oldest_age=oldest_age, dead_letters=dead_letters,
                           acked=self._acked_shown(depth))

    def queue_read_begins(self) -> int:
        """A read of the queue's figures begins: what :meth:`set_queue` is told after it."""
        return self._deleted

    def note_acked(self, rows: int) -> None:
        """The broker acknowledged ``rows`` commands (PUBACK); their delete follows.

        Wakes no reader (:meth:`changed`): ``acked`` moves with every batch, thousands a
        second when ingest forwards, and no reader acts on it; the control socket and the
        state document read it when asked, the STATUS= line at its next second."""
        self._acked_rows += rows
        self.acked = self._acked_shown(self.depth)

    def note_deleted(self, rows: int) -> None:
        """The delete of ``rows`` acknowledged commands committed; ``depth`` counts them
        until a read that began after it, so ``acked`` keeps them till then (no wake)."""
        self._acked_rows = max(0, self._acked_rows - rows)
        self._deleted += rows
        self.acked = self._acked_shown(self.depth)

    def _acked_shown(self, depth: int) -> int:
        return min(depth, self._acked_rows + self._deleted - self._deleted_seen)

    def set_limits(self, limits: dict[str, Any] | None) -> bool:
        """The limits in force on the link (CONNACK's and the pacing), for every view."""
        return self.update(limits=limits)

    def note_error(self, text: str | None) -> bool:
        """The last error worth showing (``last_error``); not a fault."""
        return self.update(last_error=text)

    def set_fault(self, source: FaultSource, text: str) -> bool:
        """Show a fault an operator must fix, owned by ``source``."""
        self._faults[source] = text
        return self._show_fault()

    def clear_fault(self, source: FaultSource) -> bool:
        """Clear ``source``'s fault (another source's stays)."""
        self._faults.pop(source, None)
        return self._show_fault()

    def fault_of(self, source: FaultSource) -> str | None:
        return self._faults.get(source)

    def _show_fault(self) -> bool:
        return self._apply({"fault": self._shown_fault()})

    def _shown_fault(self) -> str | None:
        """The oldest fault still set: what the views show."""
        return next(iter(self._faults.values()), None)

    def set_refusing(self, who: Refuser, why: Refusal, detail: str, *, note: str = "") -> bool:
        """``who`` turns work away for ``why``; said at warning when this episode begins
        (with ``note``, what the refuser does meanwhile: the journal's line only, not the
        views), not again while it lasts. A queue hovering at its limit refuses and takes by
        turns: the same refusal again within :data:`EPISODE_GAP` seconds of its end is the
        same episode."""
        before = self._refusals.get(who)
        self._refusals[who] = (why, detail)
        if before is None or before[0] is not why:
            ended = self._refusals_ended.get(who)
            same = ended is not None and ended[0] is why \
                and time.monotonic() - ended[1] < EPISODE_GAP
            log.log(logging.DEBUG if same else logging.WARNING,
                    "refusing work: %s: %s: %s%s", who, why, detail, f"; {note}" if note else "")
        return self._show_refusal()

    def clear_refusing(self, who: Refuser, *, summary: str = "") -> bool:
        """``who`` takes work again (another part's refusal stays); said at info, with
        ``summary`` (what the episode came to) when its refuser counted it."""
        before = self._refusals.pop(who, None)
        if before is not None:
            self._refusals_ended[who] = (before[0], time.monotonic())
            log.info("%s takes work again (it was refusing it: %s%s)", who, before[0],
                     f"; {summary}" if summary else "")
        return self._show_refusal()

    def refusals(self) -> list[dict[str, str]]:
        """Every refusal set, oldest first: ``{"by", "reason", "detail"}``."""
        return [{"by": str(who), "reason": str(why), "detail": detail}
                for who, (why, detail) in self._refusals.items()]

    def _show_refusal(self) -> bool:
        first = next(iter(self._refusals.items()), None)
        shown = None if first is None else f"{first[0]}: {first[1][0]}: {first[1][1]}"
        return self._apply({"refusing": shown})

    # ---- the general writer

    def update(self, **changes: Any) -> bool:
        """Set fields; wake the readers when anything really changed. Returns whether it did.

        ``fault=`` sets (or, with ``None``, clears) the fault of :attr:`FaultSource.OTHER`.
        """
        for name in changes:
            if name.startswith("_") or not hasattr(self, name):
                raise AttributeError(f"GatewayState has no field {name!r}")
            if name == "refusing":  # owned, and said in the journal: only its writers
                raise AttributeError("refusing is set by set_refusing and clear_refusing")
        if "fault" in changes:
            if changes["fault"] is None:
                self._faults.pop(FaultSource.OTHER, None)
            else:
                self._faults[FaultSource.OTHER] = changes["fault"]
            changes["fault"] = self._shown_fault()
        return self._apply(changes)

    def _apply(self, changes: dict[str, Any]) -> bool:
        dirty = False
        for name, value in changes.items():
            if getattr(self, name) != value:
                if name == "link" and (value is Link.ONLINE) != (self.link is Link.ONLINE):
                    self.link_since = time.time()  # up or down: not each attempt inside
                setattr(self, name, value)
                dirty = True
        if dirty:
            self.version += 1
            self._changed.set()
        return dirty

    async def changed(self, since: int | None = None) -> int:
        """Wait for a change; return the new :attr:`version`.

        With ``since`` (a version the reader has already shown), return at once when a
        change happened meanwhile, so a reader that was busy misses nothing.
        """
        while since is None or self.version <= since:
            self._changed.clear()
            await self._changed.wait()
            since = since if since is not None else self.version - 1
        return self.version

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot (for the control socket, the retained message, the CLI)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        data["link"] = str(self.link)
        data["local"] = None if self.local is None else str(self.local)
        data["refusals"] = self.refusals()
        data["retry_in"] = (
            max(0.0, round(self.retry_at - time.time(), 1)) if self.retry_at is not None else None
        )
        data["uptime"] = round(time.time() - self.started_at, 1)
        return data
