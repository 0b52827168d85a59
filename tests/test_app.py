"""The service as a whole: controls on the one state, and the bounded graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.netproxy import Proxy
from harness.service import running_gateway
from harness.uplink_helpers import (
    drained,
    make_config,
    start_service,
    subscribed,
    wait_until,
    write_service_config,
)
from pigateway.app import Gateway
from pigateway.state import Link
from pigateway.store import NewCommand, Store

pytestmark = pytest.mark.broker


async def test_gateway_pause_resume_and_flush(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, batch_delay=60.0)
    async with running_gateway(cfg) as gateway, subscribed(mosquitto.port, unique_prefix) as sub:
        assert await wait_until(lambda: gateway.state.link == Link.ONLINE, 10)
        gateway.pause()
        assert gateway.state.paused
        assert gateway.store is not None
        await gateway.store.put("heater", "on")
        gateway.flush()
        assert not await sub.wait_for(1, 0.5)  # paused: queued, not sent
        assert await wait_until(lambda: gateway.state.depth == 1, 5)  # the view sees it
        gateway.resume()
        assert not await sub.wait_for(1, 0.3)  # the 60 s window still holds it
        gateway.flush()
        assert await sub.wait_for(1, 5)
        assert await wait_until(lambda: gateway.state.depth == 0, 5)


async def test_gateway_starts_and_stops_while_the_broker_is_away(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    mosquitto.stop()
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, backoff_max=30.0,
                      backoff_initial=20.0)
    gateway = Gateway(cfg)
    task = asyncio.create_task(gateway.run())
    try:
        assert await wait_until(lambda: gateway.state.retry_at is not None, 10)
        assert gateway.store is not None
        await gateway.store.put("gate", "open")  # queueing works without a broker
        started = time.monotonic()
        gateway.stop()  # in the middle of a 20 s backoff wait
        async with asyncio.timeout(15):
            await task
        assert time.monotonic() - started < 10
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    async with await Store.open(cfg.store) as store:
        assert (await store.stats()).depth == 1


async def test_sigterm_waits_for_pubacks_then_nacks_the_rest(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """The link goes silent mid-drain, then SIGTERM: the stop is bounded and loses nothing."""
    proxy = await Proxy(mosquitto.port, delay=0.05).start()
    config_path = write_service_config(tmp_path, proxy.port, unique_prefix,
                                       publish_timeout=2.0, max_inflight=2)
    cfg = make_config(tmp_path, proxy.port, unique_prefix)
    total = 3000
    async with await Store.open(cfg.store, drainer=False) as producer:
        sent = await producer.put_many(
            [NewCommand(f"dev{n % 5}", "set", {"n": n, "pad": "z" * 60}) for n in range(total)])
    log = tmp_path / "service.log"
    service = start_service(config_path, log)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            assert await sub.wait_for(300, 20), log.read_text()[-3000:]
            proxy.blackhole()  # PUBACKs stop coming; batches stay in flight
            started = time.monotonic()
            service.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(service.wait, 20)
            took = time.monotonic() - started
    finally:
        if service.poll() is None:
            os.kill(service.pid, signal.SIGKILL)
            service.wait(10)
        await proxy.close()
    assert code == 0, log.read_text()[-3000:]
    assert took < 2.0 + 5 + 3, log.read_text()[-3000:]  # publish_timeout + the wind-down bounds
    async with await Store.open(cfg.store, drainer=False) as store:
        stats = await store.stats()
        queued = await store.list_queued(total)
    assert stats.in_flight == 0 and 0 < stats.depth < total
    # nothing was deleted without a PUBACK: every row gone from the queue was received
    gone = {c.id for c in sent} - {c.id for c in queued}
    assert gone <= sub.ids()
    assert queued[0].attempts == 1 and queued[0].last_error  # nacked, kept at the head
    assert "stopping" in log.read_text()


async def test_another_writer_holding_the_lock_past_busy_timeout_is_waited_out(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A second sqlite3 connection holds BEGIN IMMEDIATE for 6x busy_timeout while the
    service drains a backlog: it stays up, says why, and drains once the lock goes."""
    cfg = make_config(tmp_path, mosquitto.port, unique_prefix, max_batch_bytes=2048,
                      store={"busy_timeout": 0.5})
    gateway = Gateway(cfg)
    task = asyncio.create_task(gateway.run())
    holder = sqlite3.connect(cfg.store.path, isolation_level=None, timeout=10,
                             check_same_thread=False)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            assert await wait_until(lambda: gateway.state.link == Link.ONLINE, 10)
            assert gateway.store is not None
            gateway.pause()
            put = await gateway.store.put_many(
                [NewCommand(f"dev{n % 7}", "set", {"n": n, "pad": "q" * 40}) for n in range(300)])
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
            gateway.resume()  # the drain claims: the writer meets the lock
            await asyncio.sleep(6 * 0.5)
            assert not task.done(), task.exception() if task.done() else None
            assert "locked" in (gateway.state.last_error or "")
            assert gateway.state.link == Link.ONLINE  # the broker link was never the problem
            await asyncio.to_thread(holder.execute, "ROLLBACK")
            assert await sub.wait_for(len(put), 20)
            assert await drained(gateway.store, 10)
            assert (await gateway.store.stats()).dead_total == 0
        gateway.stop()
        async with asyncio.timeout(15):
            await task
    finally:
        holder.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)



async def test_the_service_process_outlives_a_lock_held_past_busy_timeout(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """`pigateway run` with a backlog, another process holding BEGIN
    IMMEDIATE for 6x busy_timeout; the service must not exit, and drains afterwards."""
    proxy = await Proxy(mosquitto.port).start()
    proxy.refuse()  # the gateway waits for the broker until the lock is in place
    config_path = write_service_config(tmp_path, proxy.port, unique_prefix)
    config_path.write_text(config_path.read_text().replace(
        "min_free_bytes = 0\n", "min_free_bytes = 0\nbusy_timeout = 0.5\n"))
    cfg = make_config(tmp_path, proxy.port, unique_prefix)
    total = 300
    async with await Store.open(cfg.store, drainer=False) as producer:
        await producer.put_many(
            [NewCommand(f"dev{n % 6}", "set", {"n": n}) for n in range(total)])
    log = tmp_path / "service.log"
    service = start_service(config_path, log)
    holder = sqlite3.connect(cfg.store.path, isolation_level=None, timeout=10,
                             check_same_thread=False)
    try:
        async with subscribed(mosquitto.port, unique_prefix) as sub:
            assert await wait_until(lambda: "open and recovered" in log.read_text(), 20)
            await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
            proxy.accept()
            await asyncio.sleep(6 * 0.5)
            assert service.poll() is None, log.read_text()[-3000:]
            assert "cannot claim the next batch" in log.read_text()
            await asyncio.to_thread(holder.execute, "ROLLBACK")
            assert await sub.wait_for(total, 20), log.read_text()[-3000:]
            service.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(service.wait, 20)
    finally:
        holder.close()
        if service.poll() is None:
            os.kill(service.pid, signal.SIGKILL)
            service.wait(10)
        await proxy.close()
    assert code == 0, log.read_text()[-3000:]
    async with await Store.open(cfg.store, drainer=False) as store:
        stats = await store.stats()
    assert stats.depth == 0 and stats.dead_total == 0
