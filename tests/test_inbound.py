"""Inbound commands against a real store on disk: accept -> inbox -> workers -> one result.

Handlers here are small test doubles injected through ``factories`` (the entry-point
registry is tested in test_handlers.py); everything else is the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness import gateway
from pigateway.config import Config, DeviceConfig
from pigateway.counters import COUNTERS
from pigateway.errors import HandlerError, InvalidCommand, RetryableHandlerError
from pigateway.handlers import Handler, HandlerFactory, Request
from pigateway.inbound import Inbound, list_inbox
from pigateway.store import Store

Behaviour = Callable[[Request], Any]


class Scripted:
    """A handler that records each call and does what the test's script says."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[float, Request]] = []
        self.closed = 0

    async def run(self, request: Request) -> Any:
        self.calls.append((time.monotonic(), request))
        result = self.behaviour(request)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def close(self) -> None:
        self.closed += 1


def factory(handlers: dict[str, Scripted]) -> dict[str, HandlerFactory]:
    def make(device: DeviceConfig, config: Config) -> Handler:
        return handlers[device.name]
    return {"scripted": make}


def make_config(tmp_path: Path, devices: list[str], **inbound: Any) -> Config:
    return gateway.config(tmp_path, gateway_id="gw",
                          inbound={"backoff_initial": 0.01, "backoff_max": 0.05, **inbound},
                          devices={name: {"handler": "scripted"} for name in devices})


def command(id_: str, device: str = "a", name: str = "go", **extra: Any) -> bytes:
    return json.dumps({"v": 1, "id": id_, "device": device, "name": name,
                       "params": extra.pop("params", {}), **extra}).encode()


@contextlib.asynccontextmanager
async def running(config: Config, handlers: dict[str, Scripted],
                  store: Store | None = None) -> AsyncIterator[tuple[Inbound, Store]]:
    """An open store, an Inbound and its worker pool running in the background."""
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await stack.enter_async_context(await Store.open(config.store))
        inbound = await stack.enter_async_context(Inbound(config, store,
                                                          factories=factory(handlers)))
        task = asyncio.create_task(inbound.run())
        try:
            yield inbound, store
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def results(store: Store, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait (bounded) until ``count`` results are in the outbox; return their documents."""
    deadline = time.monotonic() + timeout
    while True:
        found = [c.params for c in await store.list_queued(10_000) if c.kind == "result"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)


def by_id(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in documents}


# --------------------------------------------------------------------------- the happy path


async def test_a_command_runs_and_its_result_follows_the_contract(tmp_path: Path) -> None:
    lamp = Scripted(lambda r: {"done": r.name})
    config = make_config(tmp_path, ["a"])
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("c1", params={"level": 3}))
        [result] = await results(store, 1)
        [queued] = [c for c in await store.list_queued() if c.kind == "result"]
    assert set(result) == {"v", "id", "status", "detail", "finished_at"}
    assert (result["v"], result["id"], result["status"]) == (1, "c1", "ok")
    assert result["detail"] == {"done": "go"}
    assert abs(result["finished_at"] - time.time()) < 60
    assert (queued.device, queued.name) == ("a", "result")
    [(_, request)] = lamp.calls
    assert (request.id, request.params, request.attempt) == ("c1", {"level": 3}, 1)
    assert lamp.closed == 1
    [entry] = await list_inbox(config)
    assert (entry["state"], entry["status"], entry["attempts"]) == ("done", "ok", 1)


async def test_one_devices_commands_run_in_order(tmp_path: Path) -> None:
    lamp = Scripted(lambda r: None)
    async with running(make_config(tmp_path, ["a"], workers=4), {"a": lamp}) as (inbound, store):
        for i in range(30):
            await inbound.accept(command(f"c{i:02d}"))
        await results(store, 30)
    assert [r.id for _, r in lamp.calls] == [f"c{i:02d}" for i in range(30)]


async def test_commands_received_together_keep_each_devices_order(tmp_path: Path) -> None:
    """Concurrent receipts (as the uplink makes them) over idle and busy lanes alike: the
    first of an idle device is handed over at once, the rest queue behind it in order."""
    handlers = {name: Scripted(lambda r: None) for name in ("a", "b", "c")}
    config = make_config(tmp_path, list(handlers), workers=2)
    async with running(config, handlers) as (inbound, store):
        for wave in range(3):
            await asyncio.gather(*(inbound.accept(command(f"w{wave}-{i:02d}", "abc"[i % 3]))
                                   for i in range(30)))
            await asyncio.sleep(0.05 * wave)  # some lanes idle again, some not
        await results(store, 90)
    for index, name in enumerate("abc"):
        assert [r.id for _, r in handlers[name].calls] == [
            f"w{wave}-{i:02d}" for wave in range(3) for i in range(index, 30, 3)]


async def test_a_command_on_an_idle_lane_costs_two_commits(tmp_path: Path) -> None:
    """Received already running (attempt 1, durable before the handler runs) in its
    receipt's commit, then its result: no commit of its own for the running mark."""
    lamp = Scripted(lambda r: None)
    config = make_config(tmp_path, ["a"])
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("warm"))
        await results(store, 1)
        before = sum(COUNTERS.commit_seconds.counts)
        await inbound.accept(command("c1"))
        await results(store, 2)
        commits = sum(COUNTERS.commit_seconds.counts) - before
        entry = await store.inbox.find("c1")
    assert commits == 2
    assert entry is not None and (entry.state, entry.attempts) == ("done", 1)
    assert [r.attempt for _, r in lamp.calls] == [1, 1]


async def test_a_command_received_while_the_pool_stops_is_kept_for_the_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A command for an idle device received while the pool is stopping (a lane still
    winding down) is acknowledged and stays on disk to run after the restart, not
    reported as a failure to store it."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_to_stop(request: Request) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await release.wait()  # the pool's TaskGroup is shutting down meanwhile
            raise

    handlers = {"a": Scripted(slow_to_stop), "b": Scripted(lambda r: None)}
    config = make_config(tmp_path, ["a", "b"])
    async with await Store.open(config.store) as store:
        async with Inbound(config, store, factories=factory(handlers)) as inbound:
            pool = asyncio.create_task(inbound.run())
            await inbound.accept(command("busy", "a"))
            await asyncio.wait_for(started.wait(), 10)
            pool.cancel()
            await asyncio.sleep(0.05)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await inbound.accept(command("late", "b"))  # must not raise or reject
            release.set()
            with contextlib.suppress(asyncio.CancelledError):
                await pool
        late = await store.inbox.find("late")
        found = await results(store, 1, timeout=0.2)
    assert late is not None and late.state in ("pending", "running")
    assert found == []  # no result: neither rejected nor run
    assert handlers["b"].calls == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --------------------------------------------------------------------------- bad input


async def test_malformed_input_is_answered_and_disturbs_nothing(tmp_path: Path) -> None:
    lamp = Scripted(lambda r: None)
    config = make_config(tmp_path, ["a"])
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(b"\xff\xfe not utf-8")
        await inbound.accept(b"[1, 2, 3]")
        await inbound.accept(command("bad-device", device="toaster"))
        await inbound.accept(command("bad-v", v=3))
        await inbound.accept(b"{" * 10_000)
        await inbound.accept(command("fine"))
        answered = by_id(await results(store, 3))
        dead = await store.list_dead()
    assert answered["bad-device"]["status"] == "rejected"
    assert "unknown device 'toaster'" in answered["bad-device"]["detail"]
    assert answered["bad-v"]["status"] == "rejected"
    assert "unsupported version v=3" in answered["bad-v"]["detail"]
    assert answered["fine"]["status"] == "ok"
    assert [r.id for _, r in lamp.calls] == ["fine"]
    reasons = sorted(d.detail or "" for d in dead)
    assert len(reasons) == 3
    assert all(d.reason == "invalid" and d.command.kind == "inbound" for d in dead)
    assert any("not UTF-8" in r for r in reasons)
    assert any("JSON object" in r for r in reasons)
    assert any("limit" in r or "nested" in r or "JSON" in r for r in reasons)


# --------------------------------------------------------------------------- dedupe


async def test_a_command_whose_stored_params_do_not_read_is_rejected_and_the_next_runs(
        tmp_path: Path) -> None:
    """Bit rot in one inbox row (a flipped byte SQLite reads without complaint, a salvaged
    or hand-edited file) is that command's failure: it is answered ``rejected`` naming why,
    never run, and the device's next command runs."""
    lamp = Scripted(lambda r: None)
    config = make_config(tmp_path, ["a"])
    async with await Store.open(config.store) as store:
        now = store.clock.now()
        for command_id in ("c-bad", "c-fine"):
            await store.inbox.receive(command_id, "a", "go", {"v": 1}, expires_at=None,
                                      ttl=None, now=now, headroom=0)
    with sqlite3.connect(config.store.path) as conn:
        conn.execute("UPDATE inbox SET params = '{bad' WHERE id = 'c-bad'")
    async with running(config, {"a": lamp}) as (_, store):
        found = by_id(await results(store, 2))
    assert found["c-bad"]["status"] == "rejected"
    assert "cannot be read" in found["c-bad"]["detail"]
    assert found["c-fine"]["status"] == "ok"
    assert [request.id for _, request in lamp.calls] == ["c-fine"]


async def test_duplicate_ids_run_once_and_a_finished_one_is_answered_again(
        tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def slow(request: Request) -> str:
        await gate.wait()
        return "once"

    lamp = Scripted(slow)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("dup"))
        await inbound.accept(command("dup"))  # while pending or running: dropped
        gate.set()
        await results(store, 1)
        await inbound.accept(command("dup"))  # after: the stored result again
        await inbound.accept(command("dup", name="other"))  # same id, other body: still a dup
        documents = await results(store, 3)
    assert len(lamp.calls) == 1
    assert len(documents) == 3
    assert {json.dumps(d, sort_keys=True) for d in documents} == {
        json.dumps(documents[0], sort_keys=True)}


async def test_an_id_past_the_dedupe_window_runs_again(tmp_path: Path) -> None:
    lamp = Scripted(lambda r: None)
    config = make_config(tmp_path, ["a"], dedupe_window=0.0)
    config = replace(config, mqtt=replace(config.mqtt, session_expiry=0))  # nothing to redeliver
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("again"))
        await results(store, 1)
        await inbound.accept(command("again"))
        await results(store, 2)
    assert len(lamp.calls) == 2


# --------------------------------------------------------------------------- parallelism


async def test_a_slow_device_does_not_delay_another(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def stuck(request: Request) -> None:
        await gate.wait()

    slow, fast = Scripted(stuck), Scripted(lambda r: None)
    config = make_config(tmp_path, ["slow", "fast"], workers=2)
    async with running(config, {"slow": slow, "fast": fast}) as (inbound, store):
        await inbound.accept(command("s1", device="slow"))
        await inbound.accept(command("s2", device="slow"))
        for i in range(5):
            await inbound.accept(command(f"f{i}", device="fast"))
        done = by_id(await results(store, 5))
        assert set(done) == {f"f{i}" for i in range(5)}  # all fast ones while slow is stuck
        assert [r.id for _, r in slow.calls] == ["s1"]  # the slow lane keeps its order
        gate.set()
        done = by_id(await results(store, 7))
    assert done["s2"]["status"] == "ok"


# --------------------------------------------------------------------------- failures


async def test_retryable_errors_back_off_and_stop_at_max_attempts(tmp_path: Path) -> None:
    def busy(request: Request) -> None:
        raise RetryableHandlerError(f"busy on attempt {request.attempt}")

    lamp = Scripted(busy)
    config = make_config(tmp_path, ["a"], max_attempts=4, backoff_initial=0.05,
                         backoff_max=0.2)
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("r1"))
        [result] = await results(store, 1)
        await asyncio.sleep(0.3)  # nothing more runs after the last attempt
    assert [r.attempt for _, r in lamp.calls] == [1, 2, 3, 4]
    gaps = [b - a for (a, _), (b, _) in zip(lamp.calls, lamp.calls[1:], strict=False)]
    assert all(gap >= 0.05 for gap in gaps)
    assert result["status"] == "error"
    assert result["detail"] == "gave up after 4 attempts: busy on attempt 4"
    [entry] = await list_inbox(config)
    assert entry["attempts"] == 4


async def test_a_retry_that_succeeds_is_ok(tmp_path: Path) -> None:
    def flaky(request: Request) -> str:
        if request.attempt < 3:
            raise RetryableHandlerError("not yet")
        return "third time"

    lamp = Scripted(flaky)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("r2"))
        [result] = await results(store, 1)
    assert (result["status"], result["detail"]) == ("ok", "third time")
    assert len(lamp.calls) == 3


def _raise(error: Exception) -> Behaviour:
    def behaviour(request: Request) -> None:
        raise error
    return behaviour


@pytest.mark.parametrize(("error", "status", "detail"), [
    (HandlerError("relay welded"), "error", "relay welded"),
    (InvalidCommand("no such colour"), "rejected", "no such colour"),
    (ZeroDivisionError("oops"), "error", "the handler failed: ZeroDivisionError: oops"),
])
async def test_final_failures_are_not_retried(tmp_path: Path, error: Exception, status: str,
                                              detail: str) -> None:
    lamp = Scripted(_raise(error))
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("f1"))
        await inbound.accept(command("f2"))  # the lane goes on after a failure
        documents = by_id(await results(store, 2))
    assert (documents["f1"]["status"], documents["f1"]["detail"]) == (status, detail)
    assert len(lamp.calls) == 2


async def test_a_handler_that_hangs_times_out_and_is_retried(tmp_path: Path) -> None:
    async def hang(request: Request) -> None:
        await asyncio.sleep(3600)

    lamp = Scripted(hang)
    config = make_config(tmp_path, ["a"], handler_timeout=0.05, max_attempts=2)
    async with running(config, {"a": lamp}) as (inbound, store):
        await inbound.accept(command("t1"))
        [result] = await results(store, 1)
    assert result["status"] == "error"
    assert "gave up after 2 attempts: no answer within 0.05s" in result["detail"]


async def test_a_command_past_its_ttl_is_expired_not_run(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def stuck(request: Request) -> None:
        await gate.wait()

    lamp = Scripted(stuck)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        await inbound.accept(command("first"))
        await inbound.accept(command("late", ttl=0.05))
        await asyncio.sleep(0.1)
        gate.set()
        documents = by_id(await results(store, 2))
    assert documents["late"]["status"] == "expired"
    assert "ttl of 0.05s" in documents["late"]["detail"]
    assert [r.id for _, r in lamp.calls] == ["first"]


# --------------------------------------------------------------------------- restarts


async def test_an_interrupted_command_runs_again_after_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"], max_attempts=3)
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store, factories=factory({"a": Scripted(lambda r: None)}))
        await inbound.accept(command("x1"))
        await inbound.accept(command("x2"))
        await store.inbox.mark_running("x1", 1, time.time())  # died while running
        await store.inbox.mark_running("x2", 3, time.time())  # died 3 times
    lamp = Scripted(lambda r: "again")
    async with running(config, {"a": lamp}) as (_, store):
        documents = by_id(await results(store, 2))
    assert documents["x1"]["status"] == "ok"
    assert [(r.id, r.attempt) for _, r in lamp.calls] == [("x1", 2)]
    assert documents["x2"]["status"] == "error"
    assert "interrupted 3 times" in documents["x2"]["detail"]


async def test_a_device_removed_from_the_config_is_rejected_at_run(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a", "gone"])
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store, factories=factory({}))
        await inbound.accept(command("g1", device="gone"))
    async with running(make_config(tmp_path, ["a"]), {"a": Scripted(lambda r: None)}) as (
            _, store):
        [result] = await results(store, 1)
    assert result["status"] == "rejected"
    assert "no longer in the config" in result["detail"]


async def test_finished_commands_are_pruned_after_the_window(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"], dedupe_window=0.0)
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store, factories=factory({}))
        await inbound.accept(command("old", device="nope"))  # rejected: done at once
        assert len(await list_inbox(config)) == 1
        await store.inbox.prune(time.time() + 1, chunks=1)
        assert await list_inbox(config) == []


async def test_concurrent_accepts_keep_their_order_and_dedupe(tmp_path: Path) -> None:
    lamp = Scripted(lambda r: None)
    async with running(make_config(tmp_path, ["a"]), {"a": lamp}) as (inbound, store):
        payloads = [command(f"p{i:03d}") for i in range(200)]
        await asyncio.gather(*(inbound.accept(p) for p in payloads + payloads[:50]))
        documents = await results(store, 200)
        await asyncio.sleep(0.1)
    assert [r.id for _, r in lamp.calls] == [f"p{i:03d}" for i in range(200)]
    assert len({d["id"] for d in documents}) == 200


async def test_inbox_ls_shows_pending_and_finished_commands(tmp_path: Path) -> None:
    import sys  # noqa: PLC0415

    config = make_config(tmp_path, ["a"])
    async with running(config, {"a": Scripted(lambda r: {"n": 1})}) as (inbound, store):
        await inbound.accept(command("done1"))
        await results(store, 1)
    async with await Store.open(config.store) as store:
        await Inbound(config, store, factories=factory({})).accept(command("waiting"))
    path = gateway.write(tmp_path / "config.toml", gateway.settings(
        tmp_path, gateway_id="gw", devices={"a": {"handler": "log"}}))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pigateway", "inbox", "ls", "--json", "--config", str(path),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    rows = json.loads(out)
    assert [(r["id"], r["state"], r["status"]) for r in rows] == [
        ("waiting", "pending", None), ("done1", "done", "ok")]
    assert rows[1]["result"]["detail"] == {"n": 1}


async def test_requeueing_dead_letters_never_sends_an_unreadable_message(
        tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"])
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store, factories=factory({}))
        await inbound.accept(b"garbage")
        [dead] = await store.list_dead()
        assert dead.command.kind == "inbound" and dead.detail and "not JSON" in dead.detail
        await store.requeue_dead()
        assert await store.list_queued() == []
        assert [d.command.kind for d in await store.list_dead()] == ["inbound"]
