"""sd_notify against a real datagram socket: readiness, status, watchdog, stop.

The module's parts are tested directly here; tests/test_service_systemd.py runs the whole
service as a subprocess under the same kind of socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from harness.sockets import DatagramListener
from harness.uplink_helpers import wait_until
from pigateway.config import StoreConfig
from pigateway.errors import StoreError
from pigateway.state import GatewayState, Link, Refusal, Refuser
from pigateway.store import Store
from pigateway.systemd import Notifier, ping_bound, status_line, supervise, watchdog_interval
from pigateway.text import format_age


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[DatagramListener]:
    """A real AF_UNIX datagram socket bound as ``NOTIFY_SOCKET``."""
    listener = DatagramListener("notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
    yield listener
    listener.close()


# --------------------------------------------------------------------------- Notifier


def test_each_notification_reaches_the_socket(notify: DatagramListener) -> None:
    notifier = Notifier()
    assert notifier.enabled
    notifier.ready()
    notifier.status("online · queue 0\nsecond line")
    notifier.extend_timeout(1.5)
    notifier.watchdog()
    notifier.stopping()
    notify.wait_for(lambda t: t == "STOPPING=1")
    assert notify.texts() == [
        "READY=1",
        "STATUS=online · queue 0 second line",
        "EXTEND_TIMEOUT_USEC=1500000",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    notifier.close()
    notifier.close()


def test_without_notify_socket_everything_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()
    notifier.extend_timeout(3)
    notifier.close()


def test_a_missing_socket_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/pgw-no-such-dir/notify.sock")
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()


def test_a_manager_that_stops_reading_never_blocks_the_caller(notify: DatagramListener) -> None:
    notify.close()  # the socket file is gone: sends fail and are dropped at once
    notifier = Notifier()
    started = time.monotonic()
    for _ in range(1000):
        notifier.status("x")
    assert time.monotonic() - started < 5


async def test_extending_keeps_asking_for_more_time(notify: DatagramListener) -> None:
    notifier = Notifier()
    async with notifier.extending(step=0.2):
        await asyncio.sleep(0.45)
    count = len(notify.texts())
    assert notify.texts() == ["EXTEND_TIMEOUT_USEC=200000"] * count
    assert count >= 3
    await asyncio.sleep(0.25)
    assert len(notify.texts()) == count, "extensions go on after the block ended"


# --------------------------------------------------------------------------- watchdog_interval


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_from_the_environment(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 4.0


# --------------------------------------------------------------------------- status_line


NOW = 1_800_000_000.0


def _state(**changes: object) -> GatewayState:
    state = GatewayState(link_since=NOW, started_at=NOW)
    state.update(**changes)
    state.link_since = float(changes.get("link_since", NOW))  # type: ignore[arg-type]
    return state


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"link": Link.ONLINE}, "online · queue 0 · dead 0"),
        (
            {"link_since": NOW - 185, "depth": 1204, "oldest_age": 190.0, "retry_at": NOW + 40},
            "offline 3m · queue 1,204 (oldest 3m) · retrying in 40s",
        ),
        ({"link": Link.ONLINE, "draining": True, "depth": 12_345, "oldest_age": 7300.0},
         "online · draining · queue 12,345 (oldest 2h 1m) · dead 0"),
        ({"link": Link.ONLINE, "paused": True, "depth": 3, "draining": True},
         "online · paused · queue 3 · dead 0"),
        ({"link": Link.CONNECTING, "link_since": NOW - 5, "dead_letters": 2},
         "connecting 5s · queue 0 · dead 2"),
        ({"fault": "login refused", "link_since": NOW - 90_000},
         "FAULT login refused · offline 1d 1h · queue 0"),
        ({"link": Link.ONLINE, "depth": 4, "oldest_age": 0.2}, "online · queue 4 · dead 0"),
        ({"link": Link.ONLINE, "local": Link.OFFLINE},
         "online · local offline · queue 0 · dead 0"),
        ({"link": Link.ONLINE, "local": Link.ONLINE}, "online · queue 0 · dead 0"),
    ],
)
def test_status_line(changes: dict[str, object], line: str) -> None:
    assert status_line(_state(**changes), now=NOW) == line


def test_status_line_says_what_work_is_refused_and_why() -> None:
    state = _state(link=Link.ONLINE, depth=7)
    state.set_refusing(Refuser.INGEST, Refusal.DISK_RESERVE, "only 10 bytes free under /q")
    state.set_refusing(Refuser.QUEUE, Refusal.DISK_RESERVE, "only 10 bytes free under /q")
    assert status_line(state, now=NOW) == "REFUSING disk-reserve · online · queue 7 · dead 0"
    state.set_refusing(Refuser.QUEUE, Refusal.QUEUE_FULL, "the queue is full")
    assert status_line(state, now=NOW).startswith("REFUSING disk-reserve, queue-full · ")
    state.clear_refusing(Refuser.INGEST)
    state.clear_refusing(Refuser.QUEUE)
    assert status_line(state, now=NOW) == "online · queue 7 · dead 0"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h 0m"),
     (86_399, "23h 59m"), (86_400, "1d 0h"), (200_000, "2d 7h")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


# --------------------------------------------------------------------------- supervise


@contextlib.asynccontextmanager
async def _supervising(store: Store, state: GatewayState, interval: float,
                       ping_timeout: float | None = None) -> AsyncIterator[asyncio.Task[None]]:
    notifier = Notifier()
    task = asyncio.create_task(
        supervise(notifier, state, store.ping, interval=interval, ping_timeout=ping_timeout))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()


def _watchdogs(notify: DatagramListener) -> list[float]:
    return [d.at for d in notify.messages() if d.text == "WATCHDOG=1"]


async def test_status_follows_the_state_at_most_once_a_second(
    notify: DatagramListener, store_config: StoreConfig
) -> None:
    state = GatewayState()
    async with await Store.open(store_config) as store, _supervising(store, state, 0):
        await notify.until(lambda t: t.startswith("STATUS=offline"))
        state.update(link=Link.ONLINE)
        await notify.until(lambda t: t == "STATUS=online · queue 0 · dead 0", timeout=3)
        for depth in range(1, 21):  # a burst of changes within a few ms
            state.update(depth=depth)
            await asyncio.sleep(0.005)
        await notify.until(lambda t: t == "STATUS=online · queue 20 · dead 0", timeout=3)
    statuses = [d for d in notify.messages() if d.text.startswith("STATUS=")]
    gaps = [b.at - a.at for a, b in itertools.pairwise(statuses)]
    assert min(gaps) > 0.9, "STATUS= sent more than once a second"
    assert len(statuses) <= 4
    assert not _watchdogs(notify), "no watchdog was configured"


async def test_watchdog_pings_at_half_the_interval(
    notify: DatagramListener, store_config: StoreConfig
) -> None:
    state = GatewayState()
    async with await Store.open(store_config) as store, _supervising(store, state, 0.6):
        await asyncio.sleep(1.6)
    times = _watchdogs(notify)
    assert 4 <= len(times) <= 7, times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.1 < gap < 0.75 for gap in gaps), gaps  # period 0.3 s, loose for a busy CI


async def test_watchdog_stops_while_the_loop_is_blocked(
    notify: DatagramListener, store_config: StoreConfig
) -> None:
    state = GatewayState()
    async with await Store.open(store_config) as store, _supervising(store, state, 0.4):
        await asyncio.sleep(0.5)
        blocked_from = time.monotonic()
        time.sleep(1.2)  # noqa: ASYNC251 -- blocking the loop on purpose is the test
        blocked_to = time.monotonic()
        await asyncio.sleep(0.5)
    times = _watchdogs(notify)
    assert any(t < blocked_from for t in times)
    assert any(t > blocked_to for t in times), "pings did not resume after the block"
    assert not [t for t in times if blocked_from + 0.05 < t < blocked_to], "pinged while blocked"


async def test_watchdog_stops_while_the_store_writer_is_wedged(
    notify: DatagramListener, store_config: StoreConfig
) -> None:
    """Another connection holds the write lock: the writer waits, so ping cannot answer."""
    config = store_config.replace(busy_timeout=30.0)
    state = GatewayState()
    async with await Store.open(config) as store, _supervising(store, state, 0.4, 0.1):
        await asyncio.sleep(0.5)
        locker = sqlite3.connect(config.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        put = asyncio.create_task(store.put("pump1", "start"))
        await asyncio.sleep(0.3)  # the writer is now stuck in the busy handler
        wedged_from = time.monotonic()
        await asyncio.sleep(1.2)
        wedged_to = time.monotonic()
        assert state.fault == "store writer not answering"
        locker.execute("COMMIT")
        locker.close()
        await asyncio.wait_for(put, 10)
        await asyncio.sleep(0.6)
    assert state.fault is None, "the store's fault clears once it answers"
    times = _watchdogs(notify)
    assert any(t < wedged_from for t in times)
    assert not [t for t in times if wedged_from < t < wedged_to], "pinged while wedged"
    assert any(t > wedged_to for t in times), "pings did not resume once the store answered"


async def test_a_store_that_fails_the_ping_is_said_once_not_at_every_ping(
    notify: DatagramListener, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's writer failing every call (a disk I/O error): each ping fails with a
    store error. The watchdog's own lines say the episode (an error when the pings stop,
    naming why, a warning when they resume); a warning per ping (every interval / 2) came
    on top for as long as it lasted."""
    failing = [True]

    async def ping() -> None:
        if failing[0]:
            raise StoreError("disk I/O error (simulated)")

    notifier = Notifier()
    task = asyncio.create_task(supervise(notifier, GatewayState(), ping, interval=0.2))
    try:
        await asyncio.sleep(1.0)  # about 10 pings failed
        failing[0] = False
        await asyncio.sleep(0.4)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()
    said = [r for r in caplog.records
            if r.name == "pigateway.systemd" and r.levelno >= logging.WARNING]
    assert [r.levelno for r in said] == [logging.ERROR, logging.WARNING], \
        [r.getMessage() for r in said]
    assert "disk I/O error" in said[0].getMessage(), said[0].getMessage()
    assert len(_watchdogs(notify)) >= 1, "the pings resumed"


# --------------------------------------------------------------------------- bound_stop

STUCK_STOP = """
import asyncio, logging, sys
from pigateway.systemd import bound_stop

async def main() -> None:
    handle = bound_stop(0.3)
    if sys.argv[1] == "disarm":
        handle.cancel()
        await asyncio.sleep(0.6)
        return
    if sys.argv[1] == "many":
        for n in range(2000):
            asyncio.create_task(asyncio.Event().wait(), name=f"stuck-part-{n:04d}")
    await asyncio.create_task(asyncio.Event().wait(), name="stuck-part")  # never ends

logging.basicConfig(level=logging.INFO)
asyncio.run(main())
"""


@pytest.mark.parametrize(("mode", "code"), [("stuck", 3), ("disarm", 0), ("many", 3)])
def test_a_stuck_stop_exits_within_its_bound_and_says_what_hung(mode: str, code: int) -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", STUCK_STOP, mode], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == code, result.stderr
    assert time.monotonic() - started < 20
    if mode != "disarm":
        assert "graceful stop took more than 0s" in result.stderr
        assert "stuck-part" in result.stderr
    if mode == "many":  # one line, however many tasks hang: the first names and the count
        said = [line for line in result.stderr.splitlines() if "graceful stop" in line]
        assert len(said) == 1 and len(said[0]) < 1000, said[0][:200]
        assert "2,002 tasks in all" in said[0], said[0][-200:]  # with main and stuck-part


def test_an_abstract_notify_socket_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd may name an abstract socket (``@name``), as in containers."""
    name = f"pgw-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier()
        notifier.ready()
        assert sock.recv(100) == b"READY=1"
        notifier.close()


async def test_a_ping_that_fails_typed_is_one_line_not_a_traceback(
    notify: DatagramListener, store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The ping's typed store error says what is wrong, in the line that says the pings
    stop; a traceback (or a line) per ping says nothing more. (A lock does not fail the
    ping, which takes none: a closed store does.)"""
    state = GatewayState()
    store = await Store.open(store_config)
    async with _supervising(store, state, 0.4, 0.3):
        await store.close()
        assert await wait_until(lambda: state.fault is not None, 5)
        await asyncio.sleep(0.6)  # three pings more, failing the same
    failed = [r for r in caplog.records if r.name == "pigateway.systemd"
              and r.levelno >= logging.WARNING]
    assert len(failed) == 1 and failed[0].exc_info is None, [r.getMessage() for r in failed]
    assert "did not answer" in failed[0].getMessage()
    assert "closed" in failed[0].getMessage(), failed[0].getMessage()


async def test_a_lock_another_process_holds_is_not_a_wedged_writer(
    notify: DatagramListener, store_config: StoreConfig
) -> None:
    """A sqlite3 shell holding the write lock for longer than busy_timeout and than the
    watchdog interval: each transaction fails alone after busy_timeout and the ping (which
    takes no lock) is answered between them, so WATCHDOG=1 keeps coming and systemd does not
    restart a service that a restart would not help (five restarts and it gives up)."""
    config = store_config.replace(busy_timeout=0.3)
    interval = 2.0
    state = GatewayState()
    bound = ping_bound(interval, config.busy_timeout)
    assert bound > config.busy_timeout
    async with await Store.open(config) as store, _supervising(store, state, interval, bound):
        await asyncio.sleep(0.5)
        locker = sqlite3.connect(config.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        locked_from = time.monotonic()
        puts = [asyncio.create_task(store.put("pump1", f"start-{i}")) for i in range(8)]
        for put in puts:  # each fails alone after busy_timeout; the writer goes on
            with contextlib.suppress(StoreError):
                await put
            await asyncio.sleep(0.2)
        await asyncio.sleep(max(0.0, locked_from + 2.5 * interval - time.monotonic()))
        locked_to = time.monotonic()
        assert state.fault is None, "a locked store is not a wedged writer"
        locker.execute("COMMIT")
        locker.close()
    times = [t for t in _watchdogs(notify) if locked_from < t < locked_to]
    gaps = [b - a for a, b in itertools.pairwise([locked_from, *times, locked_to])]
    assert max(gaps) < interval, f"the watchdog went quiet for {max(gaps):.1f}s while locked"
