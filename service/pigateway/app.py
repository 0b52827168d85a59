"""The service: open the store, run every part in one TaskGroup, stop gracefully.

``pigateway run`` is ``asyncio.run(app.run(config))``. :class:`Gateway` owns the lifetime of
every part: the store is opened first (a gateway must start and queue while offline, so
nothing waits for the broker), then each part is entered in :meth:`Gateway._serve`, one
line each, and they all live in ONE ``asyncio.TaskGroup``: if one part fails for good, the
others are cancelled and the service exits non-zero so that systemd restarts it.

SIGTERM/SIGINT start a bounded graceful stop: stop claiming, wait up to
``uplink.publish_timeout`` for the PUBACKs in flight, nack the rest (back at the head of
the queue), close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import tenacity

from pigateway.aio import first_error
from pigateway.config import Config
from pigateway.errors import PigatewayError, StoreError
from pigateway.homeassistant import HomeAssistant
from pigateway.inbound import Inbound
from pigateway.ingest import Ingest
from pigateway.listeners.control import ControlServer
from pigateway.listeners.metrics import Exporter
from pigateway.logs import setup_logging
from pigateway.manage import Manage
from pigateway.manage.remoteconfig import Trial
from pigateway.pins import auto_fallback
from pigateway.pins.panel import Panel
from pigateway.state import FaultSource, GatewayState, Link, Refusal, Refuser
from pigateway.store import Store, queue
from pigateway.systemd import Notifier, bound_stop, ping_bound, supervise, watchdog_interval
from pigateway.text import plural
from pigateway.uplink import Uplink
from pigateway.uplink.store_calls import store_is_gone

log = logging.getLogger(__name__)

#: Seconds between reads of the queue's depth, age and dead letters into the state.
STATS_INTERVAL = 0.5
#: Seconds the parts get to wind down after the uplink stopped (then they are cancelled).
WIND_DOWN = 2.0
#: Seconds of start-up time asked of systemd at a time while the store opens (and checks).
START_EXTENSION = 30.0
#: Seconds on top of publish_timeout + WIND_DOWN before a stuck stop exits anyway (the unit's
#: TimeoutStopSec=30s must stay above the sum: 10 + 2 + 5 with the defaults).
STOP_SLACK = 5.0


class Gateway:
    """One running gateway: the state every view reads, and the controls that change it."""

    def __init__(self, config: Config, *, policy: tenacity.AsyncRetrying | None = None,
                 notifier: Notifier | None = None, trial: Trial | None = None) -> None:
        self.config = config
        self.trial = trial  # a remote config-set this start tries (pigateway.manage.remoteconfig)
        self.restart_requested = False
        self.manage: Manage | None = None
        self.notifier = Notifier() if notifier is None else notifier
        self.state = GatewayState()
        self.policy = policy
        self.store: Store | None = None
        self.uplink: Uplink | None = None
        self.panel: Panel | None = None
        self.ingest: Ingest | None = None
        self._stopping = asyncio.Event()

    # ---- controls (control socket, GPIO buttons, signals)

    def pause(self) -> None:
        """Stop draining; commands keep being queued on disk."""
        self.state.set_paused(True)
        if self.uplink is not None:
            self.uplink.pause()
        log.info("paused: draining stops, queueing goes on")

    def resume(self) -> None:
        self.state.set_paused(False)
        if self.uplink is not None:
            self.uplink.resume()
        log.info("resumed: draining again")

    def toggle_pause(self) -> None:
        """The pause button: pause when draining, resume when paused."""
        if self.state.paused:
            self.resume()
        else:
            self.pause()

    def flush(self) -> None:
        """Send the batch window now, and retry the connection at once if it is waiting."""
        if self.uplink is not None:
            self.uplink.flush()

    async def requeue_dead(self) -> int:
        """Every dead letter but the expired back in the queue (Home Assistant's button;
        ``pigateway queue requeue-dead``'s call)."""
        if self.store is None:
            raise StoreError("the store is not open")
        return await self.store.requeue_dead()

    def manage_reachable(self) -> bool:
        """Online, with the broker's grant of the manage subscription: a config-set that
        leaves the operator no way in is not proven by being online."""
        return (self.state.link is Link.ONLINE and self.uplink is not None
                and self.uplink.manage_granted)

    def restart(self) -> None:
        """The graceful stop, then an exit that systemd restarts (remote management)."""
        self.restart_requested = True
        self.stop()

    def stop(self) -> None:
        """Begin the graceful stop (what SIGTERM does)."""
        self.notifier.stopping()
        self._stopping.set()

    # ---- lifetime

    async def run(self) -> None:
        """Open the store and serve until :meth:`stop`; raise the first part's fatal error."""
        async with self.notifier.extending(START_EXTENSION):  # a long integrity check
            store = await Store.open(self.config.store)
        async with store, self._views(), self._inbound(store) as inbound:
            self.store = store
            self.state.update(pins=auto_fallback())  # the panel and devices have asked
            self.notifier.ready()  # store open and recovered, panel claimed; never the broker
            try:
                await self._serve(store, inbound)
            except BaseExceptionGroup as group:
                raise first_error(group) from group
            finally:
                self.store = None

    async def _serve(self, store: Store, inbound: Inbound | None) -> None:
        uplink = Uplink(self.config, store, self.state, policy=self.policy,
                        on_command=None if inbound is None else inbound.accept,
                        on_manage=None if inbound is None or self.manage is None
                        else inbound.accept_manage)
        self.uplink = uplink
        if self.state.paused:
            uplink.pause()
        await self._refresh_or_say(store, failing=False)
        log.info("store %s open and recovered; %d queued", store.path, self.state.depth)
        ingest = self.ingest = Ingest(self.config, store, self.state)
        async with asyncio.TaskGroup() as parts:
            link = parts.create_task(uplink.run(), name="uplink")
            watchdog = supervise(self.notifier, self.state, store.ping,
                                 ping_timeout=self._ping_bound())
            others = [parts.create_task(self._keep_stats(store), name="store-stats"),
                      parts.create_task(watchdog, name="systemd")]
            if inbound is not None:  # the worker pool; it closes the handlers when it ends
                others.append(parts.create_task(inbound.run(), name="inbound"))
            if self.manage is not None:  # a config-set on trial: commit or roll back
                others.append(parts.create_task(self.manage.watch_trial(), name="manage"))
            if ingest.enabled:  # the gateway's own broker into the queue
                others.append(parts.create_task(ingest.run(), name="ingest"))
            if (exporter := Exporter(self.config.metrics, self.state, store)).enabled:
                others.append(parts.create_task(exporter.run(), name="metrics"))
            ha, winding = HomeAssistant(self.config, self), {link}  # ha: a link of its own
            if ha.enabled or ha.retiring:
                others.append(task := parts.create_task(ha.run(), name="homeassistant"))
                winding.add(task)  # its "offline" is said while the uplink winds down
            await self._stopping.wait()
            ha.stop()
            if ingest.enabled:  # what it took is committed and acknowledged first
                await ingest.stop()
            log.info("stopping: no new batches; waiting up to %.0fs for PUBACKs in flight",
                     self.config.uplink.publish_timeout)
            await uplink.stop(self.config.uplink.publish_timeout)
            await asyncio.wait(winding, timeout=WIND_DOWN)
            for task in [link, *others]:
                task.cancel()
        await self._refresh_or_say(store, failing=False)
        log.info("stopped; %s queued on disk", plural(self.state.depth, "command stays",
                                                        "commands stay"))

    def _ping_bound(self) -> float | None:
        """The watchdog's wait for the store's ping (None: no watchdog asked for)."""
        interval = watchdog_interval()
        return None if interval is None else ping_bound(interval, self.config.store.busy_timeout)

    @contextlib.asynccontextmanager
    async def _views(self) -> AsyncIterator[None]:
        """The GPIO panel and the control socket: claimed before READY, released last."""
        self.panel = Panel(self.config.gpio, self.state, on_toggle_pause=self.toggle_pause,
                           on_flush=self.flush)
        async with self.panel, ControlServer(self.config.control.socket, self):
            yield

    @contextlib.asynccontextmanager
    async def _inbound(self, store: Store) -> AsyncIterator[Inbound | None]:
        """Device handlers claim their pins and check their options before READY too, so a
        bad ``[devices.NAME]`` fails the start instead of the running service."""
        if not self.config.inbound.enabled:
            yield None
            return
        if self.config.manage.enabled:
            self.manage = Manage(self.config, self, store, self.trial)
        async with Inbound(self.config, store, manage=self.manage) as inbound:
            yield inbound

    async def _keep_stats(self, store: Store) -> None:
        """Mirror the queue's depth, oldest age and dead letters into the state."""
        failing = False
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            failing = await self._refresh_or_say(store, failing=failing)

    async def _refresh_or_say(self, store: Store, *, failing: bool) -> bool:
        """:meth:`_refresh`; a store that cannot answer now is said once (and asked again at
        the next interval) instead of ending the service. Returns whether it failed.

        Only a store that is gone (corrupt) ends the service, shown as a fault first.
        """
        try:
            await self._refresh(store)
        except StoreError as exc:
            if store_is_gone(exc):
                self.state.set_fault(FaultSource.STORE, f"store: {exc}")
                self.state.note_error(str(exc))
                log.critical("store: %s", exc)
                raise
            if not failing:
                log.warning("store: cannot read the queue's stats now (%s); the views keep "
                            "the last figures", exc)
            return True
        if failing:
            log.warning("store: the queue's stats read again")
        return False

    async def _refresh(self, store: Store) -> None:
        begun = self.state.queue_read_begins()
        stats = await store.stats()
        self.state.set_queue(stats.depth, stats.oldest_age, stats.dead_total,
                             deleted_before=begun)
        # what a producer's put would meet now: its refusal is not seen here otherwise. Read
        # at each tick, not waited for as an event: its inputs change outside this process
        # (the disk's free space, puts of `pigateway send` in other processes), which nothing
        # announces (SQLite's hooks are per connection; inotify would wake at every write of
        # the WAL). It costs a quarter of the stats read beside it: ~40 us of CPU a tick on
        # the x86 test machine, under 0.01% of a core at two ticks a second.
        refusal = await store.refusal()
        if refusal is None:
            self.state.clear_refusing(Refuser.QUEUE)
        else:
            self.state.set_refusing(Refuser.QUEUE, Refusal.of(refusal), str(refusal))
        if queue.replaced(store):  # a stat a tick, as cheap as the refusal's statvfs
            await self._leave_replaced(store)

    async def _leave_replaced(self, store: Store) -> None:
        """The queue file was removed or replaced under the service: producers fill the new
        one, which only a restart opens. Said at once (CRITICAL, the store's fault in every
        view); the old file is drained first, then the service exits to be restarted."""
        if self.state.fault_of(FaultSource.STORE) is None:
            log.critical("store: %s was removed or replaced while the service had it open; "
                         "every send since went into the new file. The service drains what "
                         "the old one still holds (its dead letters go with it), then "
                         "restarts onto the new one", store.path)
            self.state.set_fault(FaultSource.STORE, f"store: {store.path} was removed or "
                                 "replaced; restarting once the old file is drained")
        if not self.restart_requested and not await queue.holds_work(store):
            log.warning("store: the old queue file is drained; restarting onto %s", store.path)
            self.restart()


def report_failure(exc: BaseException, config_path: Path, *, config_error: bool,
                   restarted: bool = True) -> None:
    """Say why the service cannot start or stopped, at crit, with what an operator runs.

    Under systemd stderr is the journal at priority info, where the documented
    ``journalctl -u pigateway -p warning`` does not look: every reason the service ends
    goes through logging instead (set up before the config is read, so a config that
    cannot be read is said too). A config error, and any other exit the unit does not
    retry (``RestartPreventExitStatus=``: not ``restarted``), says how to start again once
    fixed: it is said once, not at every restart.
    """
    if config_error:
        log.critical("%s. pigateway cannot start: fix %s (`pigateway config check` checks "
                     "it as the service will meet it), then run `systemctl restart "
                     "pigateway`; systemd does not restart it by itself after a config error",
                     exc, config_path)
        return
    if not restarted:
        log.critical("pigateway cannot start: %s. systemd does not restart it by itself "
                     "after this; once done, run `systemctl restart pigateway`", exc)
        return
    hint = _permission_hint(exc)
    if isinstance(exc, PigatewayError):
        log.critical("pigateway cannot run: %s%s", exc, hint)
    else:  # a bug: the traceback is what a report needs
        log.critical("pigateway cannot run: %s: %s%s", type(exc).__name__, exc, hint,
                     exc_info=exc)


def _permission_hint(exc: BaseException) -> str:
    """What to run when a file the service needs belongs to another user (a queue a
    ``sudo pigateway send`` created as root, a folder made by hand)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, PermissionError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or not cause.filename:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    folder = Path(os.fsdecode(cause.filename)).parent
    return (f". The service runs as user {user}, which may not use {os.fsdecode(cause.filename)}:"
            f" give it the folder, e.g. `chown -R {user}: {folder}`, then run "
            "`systemctl restart pigateway`")


async def run(config: Config, trial: Trial | None = None) -> bool:
    """``pigateway run``: the service until SIGTERM or SIGINT; whether a restart was asked
    (remote management: the caller exits with a status systemd restarts on)."""
    setup_logging(config.log.level)
    gateway = Gateway(config, trial=trial)
    loop = asyncio.get_running_loop()
    bounds: list[asyncio.TimerHandle] = []

    def on_signal() -> None:
        if not bounds:  # the first signal starts the clock of the bounded stop
            bounds.append(bound_stop(config.uplink.publish_timeout + WIND_DOWN + STOP_SLACK))
        gateway.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await gateway.run()
        return gateway.restart_requested
    finally:
        for handle in bounds:
            handle.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
