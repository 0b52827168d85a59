"""systemd supervision: readiness, status line, watchdog and stop notifications.

The service is ``Type=notify``. It says ``READY=1`` once the store is open and the panel is
claimed (never waiting for the broker: a gateway must start and queue while offline),
mirrors the state object in ``STATUS=``, and sends ``WATCHDOG=1`` only while the event loop
runs *and* the store's writer answers, so a hung loop or a wedged database leads to
systemd's watchdog restart instead of a zombie that looks alive.

Run by hand (no ``NOTIFY_SOCKET``) every notification is a silent no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

import sdnotify

from pigateway.aio import cancel_and_wait
from pigateway.errors import StoreError
from pigateway.state import FaultSource, GatewayState, Link
from pigateway.text import bounded, format_age, plural

log = logging.getLogger(__name__)

STATUS_MIN_GAP = 1.0
"""Seconds between two ``STATUS=`` lines at least (the issue's "at most once a second")."""
EXIT_STOP_OVERDUE = 3
"""Exit status when a graceful stop overran its bound (systemd logs it; the data is safe)."""


class Notifier:
    """sd_notify messages through :mod:`sdnotify`; harmless when systemd is not listening."""

    def __init__(self) -> None:
        self.socket_path = os.environ.get("NOTIFY_SOCKET") or None
        # sdnotify leaks a socket when NOTIFY_SOCKET is unset: only build it when there is
        # somewhere to send to. Non-blocking, so that a service manager that stops reading
        # costs a lost notification, never a stalled event loop.
        self._sd = sdnotify.SystemdNotifier() if self.socket_path else None
        if self._sd is not None and self._sd.socket is not None:
            self._sd.socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``NOTIFY_SOCKET`` was set and reachable)."""
        return self._sd is not None and self._sd.socket is not None

    def ready(self) -> None:
        """The store is open and recovered, the panel claimed: start-up is over."""
        self._send("READY=1")

    def status(self, line: str) -> None:
        """Show ``line`` in ``systemctl status`` (one line; newlines become spaces)."""
        self._send("STATUS=" + " ".join(line.split("\n")))

    def stopping(self) -> None:
        """SIGTERM arrived: a bounded graceful stop follows."""
        self._send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before systemd gives up on start-up (or stop)."""
        self._send(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog(self) -> None:
        """Tell systemd's watchdog that the service is healthy."""
        self._send("WATCHDOG=1")

    def close(self) -> None:
        """Release the notify socket (idempotent)."""
        if self._sd is not None and self._sd.socket is not None:
            self._sd.socket.close()
            self._sd.socket = None

    @contextlib.asynccontextmanager
    async def extending(self, step: float = 30.0) -> AsyncIterator[None]:
        """Keep extending the start-up timeout by ``step`` while the block runs.

        A long integrity check on a big queue must not be killed by ``TimeoutStartSec=``;
        a check that hangs for good still is, ``step`` after its last extension stops.
        """
        self.extend_timeout(step)
        task = asyncio.create_task(self._keep_extending(step), name="notify-extend")
        try:
            yield
        finally:
            await cancel_and_wait(task)

    async def _keep_extending(self, step: float) -> None:
        while True:
            await asyncio.sleep(step / 2)
            self.extend_timeout(step)

    def _send(self, message: str) -> None:
        if self._sd is not None:
            # sdnotify encodes Latin-1 (and drops what does not fit, like "·"); systemd reads
            # UTF-8. Hand it the UTF-8 bytes spelled as Latin-1 so they go out unchanged.
            self._sd.notify(message.encode("utf-8").decode("latin-1"))


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """systemd's watchdog timeout (``WatchdogSec=``) in seconds, or None when it is off.

    sdnotify does not read ``WATCHDOG_USEC``; sd_watchdog_enabled(3) says to ignore it when
    ``WATCHDOG_PID`` names another process (the variables leaked into a child).
    :func:`supervise` pings at half this interval.
    """
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


def bound_stop(seconds: float) -> asyncio.TimerHandle:
    """Make the graceful stop that starts now end within ``seconds``, whatever hangs.

    If the service has not exited by then, the tasks still running are logged (what hung,
    for the bug report) and the process exits with :data:`EXIT_STOP_OVERDUE`. Committed
    commands are safe on disk either way; this only beats systemd's SIGKILL at
    ``TimeoutStopSec=`` to it with an explanation. Cancel the returned handle to disarm.
    """
    return asyncio.get_running_loop().call_later(seconds, _stop_overdue, seconds)


#: Names of the tasks still running that the overdue stop's line gives (then how many).
SHOWN_STUCK: Final = 20


def _stop_overdue(seconds: float) -> None:
    current = asyncio.current_task()
    stuck = sorted(t.get_name() for t in asyncio.all_tasks() if t is not current)
    shown = ", ".join(stuck[:SHOWN_STUCK]) or "(nothing)"
    if len(stuck) > SHOWN_STUCK:  # one per connection, command, lane: bounded, not short
        shown += f" ... ({plural(len(stuck), 'task')} in all)"
    log.error("the graceful stop took more than %.0fs; exiting now. Still running: %s",
              seconds, shown)
    logging.shutdown()
    os._exit(EXIT_STOP_OVERDUE)


# --------------------------------------------------------------------------- the status line


def status_line(state: GatewayState, now: float | None = None) -> str:
    """The one-line ``STATUS=`` of ``state``, e.g. ``online · queue 0 · dead 0``.

    Parts in order: the fault (if any), the work refused (``REFUSING disk-reserve``), the
    link (with how long it has been up or down, from ``link_since``), the local
    broker's link of ingest while it is down (``local offline``), paused,
    draining, the queue depth (with the oldest command's age), dead letters (always while
    online, else only when there are any), and the next reconnect.
    """
    at = time.time() if now is None else now
    parts = [part for build in _PARTS if (part := build(state, at))]
    return " · ".join(parts)


def _fault(state: GatewayState, now: float) -> str | None:
    return f"FAULT {state.fault}" if state.fault else None


def _refusing(state: GatewayState, now: float) -> str | None:
    """Work turned away, by reason (``pigateway status`` has the detail)."""
    reasons = dict.fromkeys(r["reason"] for r in state.refusals())
    return f"REFUSING {', '.join(reasons)}" if reasons else None


def _link(state: GatewayState, now: float) -> str:
    if state.link is Link.ONLINE:
        return "online"
    return f"{state.link} {format_age(now - state.link_since)}"


def _local(state: GatewayState, now: float) -> str | None:
    """The local broker's link (ingest), only while it is not online."""
    if state.local is None or state.local is Link.ONLINE:
        return None
    return f"local {state.local}"


def _paused(state: GatewayState, now: float) -> str | None:
    return "paused" if state.paused else None


def _draining(state: GatewayState, now: float) -> str | None:
    return "draining" if state.draining and not state.paused else None


def _queue(state: GatewayState, now: float) -> str:
    """The commands waiting or in flight: not those the broker acknowledged (``acked``),
    which the queue's count shows until their delete and its next read."""
    waiting = max(0, state.depth - state.acked)
    oldest = state.oldest_age
    if waiting and oldest is not None and oldest >= 1:
        return f"queue {waiting:,} (oldest {format_age(oldest)})"
    return f"queue {waiting:,}"


def _dead(state: GatewayState, now: float) -> str | None:
    if state.dead_letters or state.link is Link.ONLINE:
        return f"dead {state.dead_letters:,}"
    return None


def _retry(state: GatewayState, now: float) -> str | None:
    if state.retry_at is None or state.link is Link.ONLINE:
        return None
    return f"retrying in {format_age(state.retry_at - now)}"


_PARTS: tuple[Callable[[GatewayState, float], str | None], ...] = (
    _fault, _refusing, _link, _local, _paused, _draining, _queue, _dead, _retry,
)


# --------------------------------------------------------------------------- supervision


def ping_bound(watchdog: float, busy_timeout: float) -> float:
    """How long the watchdog waits for the store's ping: a quarter of the watchdog interval,
    but longer than one lock wait (``store.busy_timeout``) where the interval allows, so a
    lock held by another process (a ``sqlite3`` shell, a ``queue purge``) is not taken for a
    wedged writer; a restart would not free it, and five restarts make systemd give up."""
    return min(max(watchdog / 4, busy_timeout * 1.2 + 0.1), watchdog * 0.45)


async def supervise(
    notifier: Notifier,
    state: GatewayState,
    ping: Callable[[], Awaitable[None]],
    *,
    interval: float | None = None,
    ping_timeout: float | None = None,
) -> None:
    """Keep ``STATUS=`` current and feed the watchdog while the loop and ``ping`` are healthy.

    Runs until cancelled. ``interval`` defaults to :func:`watchdog_interval`; without one
    only the status line is kept. ``WATCHDOG=1`` goes out every ``interval / 2`` after
    ``await ping()`` (the store's writer) answered within ``ping_timeout`` (default
    ``interval / 4``). A blocked loop sends nothing because this coroutine does not run;
    a wedged store sends nothing because its ping does not answer. Either way systemd
    restarts the service after ``interval``.
    """
    wd = watchdog_interval() if interval is None else interval
    async with asyncio.TaskGroup() as group:
        group.create_task(_keep_status(notifier, state), name="systemd-status")
        if wd:
            bound = ping_timeout if ping_timeout is not None else wd / 4
            watchdog = _keep_watchdog(notifier, state, ping, wd / 2, bound)
            group.create_task(watchdog, name="systemd-watchdog")


async def _keep_status(notifier: Notifier, state: GatewayState) -> None:
    """Send the status line when it changes, at most every :data:`STATUS_MIN_GAP` seconds.

    The line also changes with time alone ("offline 3m", "retrying in 40s"), so it is
    recomputed at least once a second even without a state update.
    """
    loop = asyncio.get_running_loop()
    last = ""
    while True:
        seen = state.version
        line = status_line(state)
        sent_at = loop.time()
        if line != last:
            notifier.status(line)
            last = line
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATUS_MIN_GAP):  # not wait_for: 3.11's can lose a cancel
                await state.changed(since=seen)  # a change made meanwhile is not missed
        await asyncio.sleep(max(0.0, sent_at + STATUS_MIN_GAP - loop.time()))


async def _keep_watchdog(
    notifier: Notifier, state: GatewayState, ping: Callable[[], Awaitable[None]],
    period: float, bound: float,
) -> None:
    loop = asyncio.get_running_loop()
    healthy = True
    while True:
        started = loop.time()
        failure = await _answers(ping, bound, said=not healthy)
        ok = failure is None
        if ok:
            notifier.watchdog()
        if ok != healthy:
            healthy = ok
            _log_health(failure, bound)
            _mark_fault(state, ok)
        due = started + period
        await asyncio.sleep(max(0.0, due - loop.time()))
        late = loop.time() - due
        if late > period / 2:
            log.warning("event loop was blocked for %.1fs; watchdog pings were late", late)


async def _answers(ping: Callable[[], Awaitable[None]], bound: float, *,
                   said: bool) -> str | None:
    """None when ``ping`` returned within ``bound`` seconds, else why not (any error counts).
    A bug's traceback is logged with the first failure of an episode (not ``said``) only:
    the pings go on every period while it lasts."""
    try:
        async with asyncio.timeout(bound):
            await ping()
    except TimeoutError:
        return f"no answer within {bound:.1f}s"
    except StoreError as exc:  # busy, locked, full: its message says it; no traceback
        return str(exc)
    except Exception as exc:
        if not said:
            log.exception("store ping failed")
        return f"{type(exc).__name__}: {exc}"
    return None


STORE_FAULT = "store writer not answering"


def _mark_fault(state: GatewayState, ok: bool) -> None:
    """Show a wedged store as the watchdog's fault (LEDs, STATUS=); clear it once it answers."""
    if not ok:
        state.set_fault(FaultSource.WATCHDOG, STORE_FAULT)
    else:
        state.clear_fault(FaultSource.WATCHDOG)


def _log_health(failure: str | None, bound: float) -> None:
    """The episode's two lines: its start (with why) and its end; the pings between are
    not said one by one."""
    if failure is None:
        log.warning("store writer answers again; watchdog pings resume")
    else:
        log.error(
            "store writer did not answer within %.1fs (%s); watchdog pings stop, "
            "systemd restarts the service if this lasts", bound, bounded(failure, 300),
        )
