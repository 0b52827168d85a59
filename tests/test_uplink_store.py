"""The drain against a store that is busy for a while: nothing is lost or sent twice.

Another process holds SQLite's write lock (a real second connection, ``BEGIN IMMEDIATE``)
for several times ``store.busy_timeout`` while batches are in flight: their PUBACKs come
in, the deletes fail, and the drain must wait the lock out (nothing lost, nothing sent
twice, the uplink still running) instead of ending the service.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.netproxy import Proxy
from harness.uplink_helpers import (
    RecordingState,
    drained,
    make_config,
    per_device_order_holds,
    running_uplink,
    subscribed,
    wait_until,
)
from pigateway import systemd
from pigateway.state import GatewayState, Link
from pigateway.store import NewCommand

pytestmark = pytest.mark.broker

BUSY = 0.3


async def test_acks_wait_out_a_lock_held_by_another_process(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    proxy = await Proxy(mosquitto.port, delay=0.3).start()  # PUBACKs come late: in flight
    cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=2048,
                      max_inflight=4, store={"busy_timeout": BUSY})
    holder = sqlite3.connect(cfg.store.path, isolation_level=None, timeout=10,
                             check_same_thread=False)
    state = RecordingState()
    total = 200
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub, \
                running_uplink(cfg, state=state) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            put = await run.store.put_many(
                [NewCommand(f"dev{n % 5}", "set", {"n": n, "pad": "r" * 50})
                 for n in range(total)])
            assert await wait_until(lambda: run.state.in_flight > 0, 10)
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
            await asyncio.sleep(6 * BUSY)  # PUBACKs arrive; their deletes meet the lock
            assert not run.task.done()
            assert "locked" in (run.state.last_error or "")
            await asyncio.to_thread(holder.execute, "ROLLBACK")
            assert await sub.wait_for(total, 20)
            assert await drained(run.store, 10)
            stats = await run.store.stats()
            assert not run.task.done()
    finally:
        holder.close()
        await proxy.close()
    assert stats.dead_total == 0 and stats.in_flight == 0
    assert proxy.connections == 1  # the broker link was never torn down for the store
    assert len(sub.commands) == total  # a batch acknowledged is never sent again
    assert per_device_order_holds([(c.device, c.id) for c in put],
                                  [c.id for c in sub.first_deliveries()])


async def test_a_store_that_stays_busy_becomes_a_fault_and_clears_itself(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Busy past ``store_fault_after``: an operator should look (red LED, STATUS=FAULT)."""
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, store={"busy_timeout": BUSY})
    holder = sqlite3.connect(cfg.store.path, isolation_level=None, timeout=10,
                             check_same_thread=False)
    try:
        async with running_uplink(cfg) as run:
            run.uplink.store_fault_after = 1.0
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            run.uplink.pause()
            await run.store.put_many([NewCommand("pump", "step", {"n": n}) for n in range(5)])
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
            run.uplink.resume()
            assert await wait_until(lambda: (run.state.fault or "").startswith("store"), 10)
            assert "locked" in (run.state.fault or "")
            assert run.state.link == Link.ONLINE and not run.task.done()
            await asyncio.to_thread(holder.execute, "ROLLBACK")
            assert await drained(run.store, 10)
            assert await wait_until(lambda: run.state.fault is None, 5)
    finally:
        holder.close()


async def test_going_online_keeps_a_fault_the_store_watchdog_set(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A fault belongs to its source: the link coming up must not hide a wedged store writer
    (systemd's watchdog set it; only the watchdog clears it, once the writer answers)."""
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix)
    state = GatewayState()
    systemd._mark_fault(state, False)
    async with running_uplink(cfg, state=state) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await asyncio.sleep(0.1)
        assert state.fault == systemd.STORE_FAULT, "the uplink cleared the watchdog's fault"
        systemd._mark_fault(state, True)
        assert state.fault is None
