"""Running inbound commands: a pool of workers over per-device lanes.

Each device has a lane: its pending commands, run one at a time in the order they were
received. Lanes of different devices run in parallel, at most ``inbound.workers`` handler
calls at once (a semaphore held only while a handler runs, never during a retry's backoff,
so a device that is waiting to retry does not take a worker from the others). Nothing here
runs on the MQTT loop: :meth:`pigateway.inbound.Inbound.accept` only persists.

Every command ends with exactly one result, recorded in the same transaction that marks it
done (:meth:`pigateway.store.inbox.Inbox.finish`). A command that was running when the
process died is ``running`` in the inbox; :meth:`WorkerPool.run` puts it back to ``pending``
and runs it again, which is why handlers must be idempotent. Attempts are counted on disk,
so a command that keeps killing the process stops after ``inbound.max_attempts`` starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pigateway import handlers as registry
from pigateway import wire
from pigateway.aio import wait_backoff
from pigateway.config import Config
from pigateway.counters import COUNTERS
from pigateway.errors import (
    HandlerError,
    InvalidCommand,
    PigatewayError,
    RetryableHandlerError,
    StoreError,
)
from pigateway.handlers import Handler, HandlerFactory, Request
from pigateway.store import Store
from pigateway.store.inbox import Entry
from pigateway.text import bounded, plural

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.workers")

#: Pending commands held in memory at most; the rest wait on disk.
MAX_LOADED = 1000
#: Seconds between looks at the inbox when nobody woke the pool.
POLL = 1.0
#: Seconds between prunes of finished commands past the dedupe window.
PRUNE_EVERY = 60.0
#: Backoff while the store refuses a lane's write (a result is kept in memory meanwhile).
RECORD_BACKOFF = (0.5, 30.0)


@dataclass(frozen=True)
class Outcome:
    """How a handler's exception turns into a result: status, detail, and whether the
    traceback is worth a log line (only for bugs, never for expected failures)."""

    status: str
    detail: str
    traceback: bool = False


#: First match wins: the retry policy of each error class is :data:`RETRYABLE`.
OUTCOMES: tuple[tuple[type[BaseException], Outcome], ...] = (
    (InvalidCommand, Outcome("rejected", "{error}")),
    (RetryableHandlerError, Outcome("error", "gave up after {attempts} attempts: {error}")),
    (HandlerError, Outcome("error", "{error}")),
    (PigatewayError, Outcome("error", "{error}")),
    (Exception, Outcome("error", "the handler failed: {kind}: {error}", traceback=True)),
)
RETRYABLE = (RetryableHandlerError,)


class _Expired(Exception):
    """The command's ttl ran out between two attempts."""


class WorkerPool:
    """Runs the inbox: see the module docstring."""

    def __init__(self, config: Config, store: Store, *,
                 factories: Mapping[str, HandlerFactory] | None = None) -> None:
        self.config = config
        self.store = store
        self.factories = factories
        self.handlers: dict[str, Handler] = {}
        self._slots = asyncio.Semaphore(config.inbound.workers)
        self._wake = asyncio.Event()
        self._lanes: dict[str, deque[Entry]] = {}
        self._cursor = 0
        self._loaded = 0
        self._opened = False
        # ids marked running (durably) together with the result before them in their lane
        self._premarked: set[str] = set()
        # ids received pending and not loaded yet, by device: a device with any is not idle
        self._expected: dict[str, set[str]] = {}
        # ids handed over by admitted() (not loaded): never loaded again from the inbox
        self._handed: set[str] = set()
        # every pending row on disk is loaded (False until the first load catches up)
        self._caught_up = False
        self._tasks: asyncio.TaskGroup | None = None
        self._failing = FailingDevices()

    # ---- lifecycle

    async def open(self) -> None:
        """Build every device's handler; a config error names ``devices.NAME.KEY``."""
        if self._opened:
            return
        try:
            for name, device in self.config.devices.items():
                self.handlers[name] = registry.build(device, self.config, self.factories)
        except BaseException:
            await self.close()
            raise
        self._opened = True

    async def close(self) -> None:
        """Close every handler once; a failing close is logged, not raised."""
        built, self.handlers = self.handlers, {}
        self._opened = False
        for name, handler in built.items():
            try:
                await handler.close()
            except Exception:
                log.exception("closing the handler of device %s failed", name)

    def wake(self) -> None:
        """A command was persisted: look at the inbox now."""
        self._wake.set()

    # ---- commands handed over at receipt (an idle lane: no mark_running commit of their own)

    def admit(self, command_id: str, device: str) -> bool:
        """Called as a command's insert is queued, before any ``await``: True when its
        device's lane is idle, with nothing of its device pending before it (loaded or
        not), so it may be inserted already running (:meth:`Inbox.receive_running`) and
        handed over with :meth:`admitted`; the lane is held for it meanwhile. False: it
        is inserted pending and loaded from the inbox, in its order; call :meth:`admitted`
        all the same."""
        if (self._caught_up and self._tasks is not None and device not in self._lanes
                and not self._expected.get(device) and self._loaded < MAX_LOADED):
            self._lanes[device] = deque()  # held: commands received meanwhile queue behind
            self._loaded += 1
            return True
        self._expected.setdefault(device, set()).add(command_id)
        return False

    def admitted(self, command_id: str, device: str, held: bool, *, inserted: bool,
                 started: Entry | None = None) -> None:
        """The insert of an :meth:`admit`-ted command is over: ``started`` (marked running
        with it) runs now; a row ``inserted`` pending is loaded from the inbox in its
        order; nothing inserted (a repeat, an error) leaves nothing to run."""
        if not held:
            if not inserted:
                self._forget_expected(command_id, device)
            return
        lane = self._lanes.get(device)
        if started is not None and lane is not None and self._tasks is not None:
            self._handed.add(started.id)
            self._premarked.add(started.id)
            lane.appendleft(started)
        else:
            self._loaded -= 1
            if inserted:  # pending on disk (its running mark failed): its lane waits for it
                self._expected.setdefault(device, set()).add(command_id)
                self._wake.set()
        if lane is None:
            return
        if lane and self._tasks is not None:
            runner = self._run_lane(device)
            try:
                self._tasks.create_task(runner, name=f"lane-{device}")
                return
            except RuntimeError:  # the pool is stopping: its rows run after the restart
                runner.close()
                self._loaded -= len(lane)
        del self._lanes[device]

    def _forget_expected(self, command_id: str, device: str) -> None:
        waiting = self._expected.get(device)
        if waiting is not None:
            waiting.discard(command_id)
            if not waiting:
                del self._expected[device]

    async def run(self) -> None:
        """Recover interrupted commands, then run lanes until cancelled; the handlers are
        closed when it ends (so a caller that only runs it needs no ``async with``)."""
        await self.open()
        try:
            await self.store.inbox.recover()
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._prune_loop(), name="inbox-prune")
                while True:
                    self._wake.clear()
                    await self._load(tasks)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(POLL):  # not wait_for: 3.11's can swallow
                            await self._wake.wait()       # a cancel that meets a wake-up
        finally:
            self._tasks = None
            self._caught_up = False
            await self.close()

    async def _load(self, tasks: asyncio.TaskGroup) -> None:
        """Hand newly pending commands to their device's lane, starting lanes as needed."""
        self._caught_up = False
        while self._loaded < MAX_LOADED:
            room = MAX_LOADED - self._loaded
            entries = await self.store.inbox.pending(self._cursor, room)
            for entry in entries:
                self._cursor = entry.seq
                self._forget_expected(entry.id, entry.device)
                if entry.id in self._handed:  # pending again in a retry's backoff: in its lane
                    continue
                self._loaded += 1
                lane = self._lanes.get(entry.device)
                if lane is not None:
                    lane.append(entry)
                    continue
                self._lanes[entry.device] = deque([entry])
                tasks.create_task(self._run_lane(entry.device), name=f"lane-{entry.device}")
            if len(entries) < room:  # caught up: no need to ask again until woken
                self._caught_up = True
                return

    async def _run_lane(self, device: str) -> None:
        lane = self._lanes[device]
        try:
            while lane:
                try:
                    await self._execute(lane[0], lane[1] if len(lane) > 1 else None)
                except Exception:  # a bug must not stop every device; the row stays unfinished
                    log.exception("command %s on %s could not be finished; it runs again after "
                                  "a restart", lane[0].id, device)
                lane.popleft()
                self._loaded -= 1
                if self._loaded == MAX_LOADED - 1:
                    self._wake.set()
        finally:
            del self._lanes[device]

    async def _prune_loop(self) -> None:
        while True:
            before = self.store.clock.now() - dedupe_horizon(self.config)
            try:
                await self.store.inbox.prune(before)
            except StoreError as exc:
                log.warning("could not prune finished inbound commands: %s", exc)
            await asyncio.sleep(PRUNE_EVERY)

    # ---- one command

    async def _execute(self, entry: Entry, after: Entry | None = None) -> None:
        """Run ``entry`` to its one result; ``after`` (next in the lane) is marked running in
        the same commit as that result, which saves its lane one fsync per command."""
        handler = self.handlers.get(entry.device)
        answer = _answer_unrun(entry, handler is not None, self.config.inbound.max_attempts,
                               self.store.clock.now())
        if answer is None:
            assert handler is not None  # a command without one is answered unrun
            answer = await self._attempts(entry, handler)
        await self._finish(entry, *answer, after)

    async def _attempts(self, entry: Entry, handler: Handler) -> tuple[str, Any]:
        """Run with retries; returns (status, detail) of the final outcome.

        A plain loop over :class:`~pigateway.aio.wait_backoff` (as
        :func:`~pigateway.aio.reconnecting` is), not tenacity's ``AsyncRetrying``: tenacity
        builds and inspects its actions on every attempt (``inspect`` on each callable), a
        few hundred microseconds of the event loop per command, paid even when the first
        attempt succeeds, as nearly all do.
        """
        inbound = self.config.inbound
        backoff = wait_backoff(inbound.backoff_initial, inbound.backoff_max,
                               floor=inbound.backoff_initial)
        tries = inbound.max_attempts - entry.attempts  # >= 1: _execute checked
        attempt, trial = entry.attempts, 0
        while True:
            attempt, trial = attempt + 1, trial + 1
            try:
                value = await self._attempt(entry, handler, attempt)
            except _Expired:
                return "expired", _expired_detail(entry)
            except RETRYABLE as exc:
                if trial >= tries:
                    return _outcome(entry, exc, attempt)
                wait = backoff.delay(trial)
                await self._failed_attempt(entry, exc, attempt, wait)
                await asyncio.sleep(wait)
            except Exception as exc:  # every failure becomes a result (OUTCOMES)
                return _outcome(entry, exc, attempt)
            else:
                self._failing.answered(entry.device)
                return "ok", _ok_detail(value, self.config.store.max_params_bytes)

    async def _attempt(self, entry: Entry, handler: Handler, attempt: int) -> Any:
        if _expired(entry, self.store.clock.now()):
            raise _Expired
        # durable before the handler runs, so a command that kills the process is counted
        if not (attempt == entry.attempts + 1 and entry.id in self._premarked):
            started = time.time()
            await self._durably(lambda: self.store.inbox.mark_running(entry.id, attempt, started),
                                f"mark command {entry.id} running")
        self._premarked.discard(entry.id)
        request = Request(id=entry.id, device=entry.device, name=entry.name,
                          params=entry.params, attempt=attempt)
        # a handler may need longer than a device's (manage's config-set waits for its proof)
        timeout = getattr(handler, "timeout", None) or self.config.inbound.handler_timeout
        async with self._slots:
            try:
                async with asyncio.timeout(timeout):
                    return await handler.run(request)
            except TimeoutError as exc:
                raise RetryableHandlerError(f"no answer within {timeout:g}s "
                                            "(inbound.handler_timeout)") from exc

    async def _failed_attempt(self, entry: Entry, error: BaseException, attempt: int,
                              wait: float) -> None:
        self._failing.failed(entry, error, attempt, wait)
        try:
            await self.store.inbox.note_failed_attempt(entry.id, str(error))
        except StoreError as exc:  # only bookkeeping: the attempt count is on disk already
            log.warning("could not note a failed attempt: %s", exc)

    # ---- results

    async def _finish(self, entry: Entry, status: str, detail: Any,
                      after: Entry | None = None) -> None:
        document = wire.result_document(entry.id, status, detail,
                                         max_bytes=self.config.store.max_params_bytes)
        then_running = None if after is None else (after.id, after.attempts + 1, time.time())
        done_on = self.store.clock.now()
        level = logging.INFO if status == "ok" else logging.WARNING
        shown = document.get("detail")
        log.log(level, "command %s on %s: %s%s", entry.id, entry.device, status,
                "" if shown is None or status == "ok" else f" ({bounded(shown)})",
                extra={"command_id": entry.id, "device": entry.device})
        await self._durably(lambda: self.store.inbox.finish(entry.id, entry.device, document,
                                                            done_on=done_on,
                                                            then_running=then_running),
                            f"record the result of command {entry.id}")
        self._handed.discard(entry.id)  # done: never pending again (one a bug ended stays)
        COUNTERS.inbound_done(status)
        if after is not None:
            self._premarked.add(after.id)

    async def _durably(self, write: Callable[[], Awaitable[object]], what: str) -> None:
        """Run ``write``, waiting out a store error with capped backoff.

        A store error (busy, locked, full) is not the command's fault, so it never becomes
        the command's result: the lane waits here, keeping its order, until the store
        takes the write (or the pool is cancelled, and the command runs after a restart).
        A result waiting here is kept in memory meanwhile.
        """
        delay = RECORD_BACKOFF[0]
        failures = 0
        while True:
            try:
                await write()
            except StoreError as exc:  # waited out: a warning once, not an error per try
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "cannot %s (%s); waiting for the store, retrying in %.1fs", what, exc,
                        delay)
            else:
                if failures:
                    log.info("%s: the store took it after %d tries", what, failures + 1)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECORD_BACKOFF[1])


class FailingDevices:
    """Devices failing now, each with its failed runs since its last answer: the first
    failed run of an episode is a warning, the rest info lines, and the device's next answer
    one info line, so an outage of one device is not a warning per retry of every command.
    Bounded by the configured devices (a command for an unknown one never runs)."""

    def __init__(self) -> None:
        self._failed_runs: dict[str, int] = {}

    def failed(self, entry: Entry, error: BaseException, attempt: int, wait: float) -> None:
        first = entry.device not in self._failed_runs
        self._failed_runs[entry.device] = self._failed_runs.get(entry.device, 0) + 1
        log.log(logging.WARNING if first else logging.INFO,
                "command %s on %s failed (attempt %d), trying again in %.1fs: %s%s",
                entry.id, entry.device, attempt, wait, bounded(error),
                "; its device's further retries are said at info until it answers"
                if first else "", extra={"command_id": entry.id, "device": entry.device})

    def answered(self, device: str) -> None:
        """A run on ``device`` succeeded: its failing episode, if any, ends (at info)."""
        failed = self._failed_runs.pop(device, None)
        if failed:
            log.info("device %s answers again (after %s)", device,
                     plural(failed, "failed run"), extra={"device": device})


def _answer_unrun(entry: Entry, has_handler: bool, max_attempts: int,
                  now: float) -> tuple[str, Any] | None:
    """The result of a command that is not run (None: run it): its device gone from the
    config, its params unreadable, its ttl over, or its attempts spent by restarts."""
    if not has_handler:
        return "rejected", f"unknown device {entry.device!r}: it is no longer in the config"
    if entry.unreadable is not None:
        return "rejected", f"its params as stored cannot be read ({entry.unreadable}); not run"
    if _expired(entry, now):
        return "expired", _expired_detail(entry)
    if entry.attempts >= max_attempts:
        return "error", (f"interrupted {entry.attempts} times (the service stopped while it "
                         f"ran); not tried again. Last error: {entry.last_error or 'none'}")
    return None


def _ok_detail(value: Any, max_params_bytes: int) -> Any:
    """The handler's return value as the ``detail`` of ``ok``, if it is JSON and fits."""
    if value is None:
        return None
    try:
        size = len(json.dumps(value, allow_nan=False).encode())
    except (TypeError, ValueError):
        value, size = str(value), len(str(value).encode())
    if size > max_params_bytes // 2:
        return f"(a result of {size} bytes was left out: over half store.max_params_bytes)"
    return value


def _expired(entry: Entry, now: float) -> bool:
    """``now`` on the gateway clock (``store.clock``), the clock ``expires_at`` is on."""
    return entry.expires_at is not None and now >= entry.expires_at


def _expired_detail(entry: Entry) -> str:
    assert entry.expires_at is not None
    # rows of before migration 3 have no ttl, and their expires_at is a wall time
    ttl = entry.ttl if entry.ttl is not None else entry.expires_at - entry.received_at
    return f"its ttl of {ttl:g}s ran out before it could run"


def _outcome(entry: Entry, exc: Exception, attempts: int) -> tuple[str, str]:
    outcome = next(o for kind, o in OUTCOMES if isinstance(exc, kind))
    if outcome.traceback:
        log.error("the handler of %s failed on command %s", entry.device, entry.id,
                  exc_info=exc, extra={"command_id": entry.id, "device": entry.device})
    detail = outcome.detail.format(error=exc, kind=type(exc).__name__,
                                   attempts=attempts)
    return outcome.status, detail


def dedupe_horizon(config: Config) -> float:
    """Seconds a finished command id is remembered: ``inbound.dedupe_window``, but never
    less than the broker can still deliver the message again.

    A message whose PUBACK was lost (the link dropped right after it) comes again when the
    session resumes, up to ``mqtt.session_expiry`` after the drop under MQTT 5, and the drop
    is noticed within about two keepalives. Forgetting the id before that would run the
    command twice. Under MQTT 3.1.1 the broker alone decides how long a session lives
    (mosquitto: ``persistent_client_expiration``), so the window is taken as configured:
    docs/handlers.md says to keep that broker setting within it.
    """
    window = config.inbound.dedupe_window
    if config.mqtt.protocol == "5" and config.mqtt.session_expiry > 0:  # 0: no session kept
        return max(window, float(config.mqtt.session_expiry + 2 * config.mqtt.keepalive))
    return window
