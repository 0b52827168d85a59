"""The gateway clock: seconds that only move forward, for every TTL in the queue file.

A Raspberry Pi has no real-time clock. It boots with the time fake-hwclock saved at the
last shutdown (or 1970) and steps to the real time when NTP answers, hours, months or
years later; an operator may set it back. A TTL measured on the wall clock dies at the
step forward and lives too long after a step back. The gateway clock does not step:

* within one boot it is ``CLOCK_BOOTTIME`` (counts suspend, never set) plus an offset;
* the offset of each boot is kept in the ``clock`` table of the queue file (one row, for
  the current boot, named by ``/proc/sys/kernel/random/boot_id``; read and written by
  :mod:`pigateway.store.clock_row`);
* a new boot continues from the last reading the old boot left: the drainer writes a
  reading every :data:`HEARTBEAT` seconds (in a commit it shares with other writes when
  there are any) and when it closes;
* the time the gateway was down is added only when it can be known: the wall clock was
  synchronised at the old boot's last reading and is synchronised in this boot. If it is
  not yet synchronised at the new boot, the downtime is added when it becomes so (the
  clock jumps forward then, never back). Otherwise it is not counted: a TTL then outlives
  the downtime (at most the downtime plus one heartbeat), which is the price of a clock
  that can never kill a command early.

The gateway clock starts equal to the wall clock the first time a queue file gets its
``clock`` row, so TTLs written before it existed (wall-clock deadlines) keep their
meaning. ``queued_at``, ``dead_at`` and the wire contract stay on the wall clock;
``expires_at`` (outbox and inbox) and every age the file keeps (the inbox's ``done_on``, a
dead letter's ``dead_on``, a delivery record's ``kept_on``, producer keys, watches) are on
the gateway clock, and displays convert ``expires_at`` back with :meth:`GatewayClock.to_wall`.

The sources (:func:`wall`, :func:`boottime`, :func:`boot_id`, :func:`synchronised`) are
module-level functions so that tests can step the wall clock or simulate a reboot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

from pigateway.errors import StoreError
from pigateway.store import lazylog

#: the journal's LOGGER field, as it was before this module moved into its package
log = lazylog.getLogger("pigateway.clock")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
#: Created by systemd-timesyncd once the wall clock is synchronised (removed at boot).
SYNCED_PATH = Path("/run/systemd/timesync/synchronized")
#: Seconds between two readings the drainer writes; bounds the time a reboot can lose.
HEARTBEAT = 60.0
#: The longest boot id read (a UUID is 36 characters).
_MAX_BOOT_ID = 64
#: Seconds of float rounding allowed when comparing boot times (offsets are ~1.8e9 s).
_SAME_BOOT_SLACK = 0.01



# --------------------------------------------------------------------------- sources


def wall() -> float:
    """The wall clock (steps when NTP or a person sets it)."""
    return time.time()


def boottime() -> float:
    """Seconds since this boot, suspend included; never set, starts near 0 at every boot."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """This boot's id, which changes at every boot."""
    try:
        text = BOOT_ID_PATH.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise StoreError(f"cannot read the boot id from {BOOT_ID_PATH} ({exc}); the queue's "
                         "TTLs need it (is /proc mounted?)") from exc
    return text.strip()[:_MAX_BOOT_ID]


def synchronised() -> bool:
    """Whether the wall clock is synchronised (systemd-timesyncd says so)."""
    return SYNCED_PATH.exists()


# --------------------------------------------------------------------------- readings


class Reading(NamedTuple):
    """The ``clock`` row: how to read the gateway clock in one boot, and its last reading.

    ``gap_from`` is the wall time of the previous boot's last synchronised reading while
    this boot's downtime is still to be counted (the wall clock was not yet synchronised
    when this boot began); ``None`` once counted or when it cannot be known.
    """

    boot_id: str
    offset: float  # gateway time = boottime() + offset, in this boot
    reading: float  # the gateway time of the last reading written
    wall: float  # the wall time of that reading
    synced: bool  # whether the wall clock was synchronised then
    gap_from: float | None = None

    def now(self) -> float:
        return boottime() + self.offset


def first_reading() -> Reading:
    """A new queue file: the gateway clock starts equal to the wall clock."""
    now_wall, since_boot = wall(), boottime()
    return Reading(boot_id(), now_wall - since_boot, now_wall, now_wall, synchronised())


def next_boot(last: Reading) -> Reading:
    """The first reading of a new boot: continue from ``last``, plus the downtime if known."""
    since_boot, now_wall, synced = boottime(), wall(), synchronised()
    gap_from = last.wall if last.synced else None
    offset = last.reading
    if gap_from is not None and synced:
        offset += _downtime(gap_from, now_wall - since_boot)
        gap_from = None
    return Reading(boot_id(), offset, offset + since_boot, now_wall, synced, gap_from)


def beat(current: Reading) -> Reading:
    """A new reading in the same boot; counts the downtime once the wall clock is synced."""
    synced = synchronised()
    now_wall, since_boot = wall(), boottime()
    offset, gap_from = current.offset, current.gap_from
    if gap_from is not None and synced:
        offset += _downtime(gap_from, now_wall - since_boot)
        gap_from = None
    return current._replace(offset=offset, reading=since_boot + offset, wall=now_wall,
                            synced=synced, gap_from=gap_from)


def _downtime(last_wall: float, boot_wall: float) -> float:
    """Seconds from the last reading of the old boot to the start of this one (never < 0)."""
    return max(0.0, boot_wall - last_wall)


def current(stored: Reading | None) -> Reading:
    """The reading for this boot, given the stored one (``None``: a new file)."""
    if stored is None:
        return first_reading()
    if stored.boot_id != boot_id() and restarted(stored):
        return next_boot(stored)
    return stored


def restarted(stored: Reading) -> bool:
    """Whether ``CLOCK_BOOTTIME`` began again since ``stored`` was read: a new boot.

    A boot id that differs is not enough. Under systemd-nspawn (and any container whose
    init gives a unit a fresh procfs) the service and a shell read different boot ids of
    one running kernel; taking each other's for a new boot, each leapt the gateway clock
    forward by the host's uptime (a ttl of 4000 s ran out in 144 s). ``CLOCK_BOOTTIME``
    is the kernel's, the same in every view, and starts near 0 at a boot: when it has run
    on since the stored reading, this is the boot that wrote it. (A real reboot whose old
    boot lasted less than the new one has run when it first opens the file is taken for
    the same boot: the clock then continues from the offset, the TTLs longer by at most
    that short uptime, never shorter.)"""
    return boottime() < stored.reading - stored.offset - _SAME_BOOT_SLACK


# --------------------------------------------------------------------------- the clock


class GatewayClock:
    """The clock every ``expires_at`` in the queue file is on (see the module docstring)."""

    def __init__(self, reading: Reading) -> None:
        self.reading = reading

    def now(self) -> float:
        """Gateway seconds now; never less than an earlier answer in this boot."""
        return self.reading.now()

    def deadline(self, ttl: float) -> float:
        """The ``expires_at`` of a TTL of ``ttl`` seconds starting now."""
        return self.now() + ttl

    def to_wall(self, at: float | None) -> float | None:
        """A gateway time as the wall time it is (or was), for a person to read."""
        return None if at is None else at - self.now() + wall()

    def adopt(self, reading: Reading | None) -> float:
        """Take the reading the file holds now (a heartbeat may have counted a downtime:
        the clock jumped forward); the seconds it moved this clock forward (0: none).
        A reading of another boot, or behind this one, is not taken: never backwards."""
        if (reading is None or reading.boot_id != self.reading.boot_id
                or reading.offset < self.reading.offset):
            return 0.0
        jump = reading.offset - self.reading.offset
        self.reading = reading
        return jump
