"""Inbound messages at the edges of the input space: each is that message's failure, never
the service's. A real store on disk (and
a real tmpfs when root), the real ``accept`` path and worker pool."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pigateway.config import Config
from pigateway.errors import HandlerError, RetryableHandlerError, StoreFull
from pigateway.handlers import Request
from pigateway.inbound import Inbound
from pigateway.store import Store
from test_inbound import Scripted, by_id, make_config, results, running
from test_store_faults import tmpfs

GOOD: dict[str, Any] = {"v": 1, "id": "c-1", "device": "a", "name": "go", "params": {}}


def raw(document: str) -> bytes:
    """A payload written by hand, so escapes like ``\\ud800`` reach json.loads as they are."""
    return document.encode()


async def accepted(tmp_path: Path, payload: bytes) -> tuple[list[dict[str, Any]], int]:
    """Accept one message into a fresh store; (the result documents, dead letters)."""
    config = make_config(tmp_path, ["a"])
    async with await Store.open(config.store) as opened:
        await Inbound(config, opened).accept(payload)
        documents = [c.params for c in await opened.list_queued(100) if c.kind == "result"]
        return documents, (await opened.stats()).dead_total


UNSTORABLE = [
    ("huge float in params", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                 '"params":{"x":1e400}}'), "params.x"),
    ("huge negative float deep", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                     '"params":{"x":[{"y":-1e999}]}}'), "params.x[0].y"),
    ("surrogate in a params value", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                        '"params":{"x":"\\ud800"}}'), "params.x"),
    ("surrogate in a params key", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                      '"params":{"\\udfff":1}}'), "params"),
    ("surrogate in the device", raw('{"v":1,"id":"c-1","device":"\\udc80","name":"go",'
                                    '"params":{}}'), "device"),
    ("surrogate in the name", raw('{"v":1,"id":"c-1","device":"a","name":"\\ud83d",'
                                  '"params":{}}'), "name"),
    ("surrogate on a v2 document", raw('{"v":2,"id":"c-1","device":"\\ud800","name":"go",'
                                       '"params":{"k":"\\udbff"}}'), "device"),
    ("surrogate in an unknown key", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                        '"params":{},"\\ud800x":1}'), "a field name"),
    ("surrogate in the ttl", raw('{"v":1,"id":"c-1","device":"a","name":"go",'
                                 '"params":{},"ttl":"\\ud800"}'), "ttl"),
]


@pytest.mark.parametrize(("payload", "field"), [c[1:] for c in UNSTORABLE],
                         ids=[c[0] for c in UNSTORABLE])
async def test_unstorable_json_is_rejected_naming_the_field(tmp_path: Path, payload: bytes,
                                                           field: str) -> None:
    documents, dead = await accepted(tmp_path, payload)
    assert dead == 0
    assert [d["status"] for d in documents] == ["rejected"]
    assert field in documents[0]["detail"]
    json.dumps(documents[0], ensure_ascii=False).encode()  # the result itself is storable


@pytest.mark.parametrize("id_", ["\\ud800", "a\\udfffb", "\\u0000"])
async def test_an_id_with_a_lone_surrogate_is_dead_lettered(tmp_path: Path, id_: str) -> None:
    documents, dead = await accepted(
        tmp_path, raw(f'{{"v":1,"id":"{id_}","device":"a","name":"go","params":{{}}}}'))
    assert (documents, dead) == ([], 1)


async def test_a_huge_unknown_key_gets_a_shortened_reason(tmp_path: Path) -> None:
    key = "k" * 13_000
    payload = json.dumps({**GOOD, key: 1}).encode()
    config = make_config(tmp_path, ["a"])
    async with await Store.open(config.store) as store:
        await Inbound(config, store).accept(payload)
        documents = [c.params for c in await store.list_queued(10) if c.kind == "result"]
        entry = await store.inbox.find("c-1")
    assert [d["status"] for d in documents] == ["rejected"]
    assert "unknown field 'kkkk" in documents[0]["detail"]
    assert len(documents[0]["detail"]) <= 1000
    assert entry is not None and entry.state == "done"


async def test_a_huge_handler_error_is_shortened_and_the_lane_goes_on(tmp_path: Path) -> None:
    def fail(request: Request) -> None:
        raise HandlerError("bad keys: " + ", ".join(f"key{n}" for n in range(20_000)))

    config = make_config(tmp_path, ["a"])
    handler = Scripted(lambda r: fail(r) if r.id == "big" else "fine")
    async with running(config, {"a": handler}) as (inbound, store):
        await inbound.accept(json.dumps({**GOOD, "id": "big"}).encode())
        await inbound.accept(json.dumps({**GOOD, "id": "next"}).encode())
        found = by_id(await results(store, 2))
        big = await store.inbox.find("big")
    assert found["big"]["status"] == "error"
    assert found["big"]["detail"].startswith("bad keys: key0, key1")
    assert len(json.dumps(found["big"]).encode()) <= config.store.max_params_bytes
    assert found["next"]["status"] == "ok"
    assert big is not None and big.state == "done"
    assert big.last_error is not None and len(big.last_error) < 2000
    assert [r.id for _, r in handler.calls] == ["big", "next"]


async def test_under_the_disk_reserve_a_command_is_refused_not_run(tmp_path: Path) -> None:
    config = make_config(tmp_path, ["a"])
    reserve = replace(config, store=config.store.replace(min_free_bytes=1 << 62))
    handler = Scripted(lambda r: "ran")
    async with running(reserve, {"a": handler}) as (inbound, store):
        with pytest.raises(StoreFull):
            await inbound.accept(json.dumps(GOOD).encode())
        assert await store.inbox.find("c-1") is None
    assert handler.calls == []


async def test_a_store_error_marking_running_is_waited_out_not_a_result(
        tmp_path: Path) -> None:
    """The store refusing ``mark_running`` (here a real SQLite error from a trigger) is
    not the command's fault: no ``error`` result; it runs once the store takes the write."""
    config = make_config(tmp_path, ["a"])
    handler = Scripted(lambda r: "ran")
    async with running(config, {"a": handler}) as (inbound, store):
        with sqlite3.connect(config.store.path) as other:
            other.execute("CREATE TRIGGER refuse BEFORE UPDATE OF state ON inbox "
                          "WHEN NEW.state = 'running' "
                          "BEGIN SELECT RAISE(ABORT, 'simulated store error'); END")
        await inbound.accept(json.dumps(GOOD).encode())
        assert await results(store, 1, timeout=1.5) == []  # waiting, not answered "error"
        assert handler.calls == []
        with sqlite3.connect(config.store.path) as other:
            other.execute("DROP TRIGGER refuse")
        found = await results(store, 1)
    assert [(d["id"], d["status"]) for d in found] == [("c-1", "ok")]
    assert len(handler.calls) == 1


async def test_on_a_full_tmpfs_commands_are_refused_until_there_is_room(
        tmp_path: Path) -> None:
    """On a real size-limited disk: below the reserve nothing is accepted (so nothing
    runs without room for its result); once space is freed the command is taken and
    answered."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        config = make_config(disk, ["a"])
        config = replace(config, store=config.store.replace(min_free_bytes=2 << 20))
        handler = Scripted(lambda r: "ran")
        async with running(config, {"a": handler}) as (inbound, store):
            ballast = disk / "ballast"
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            ballast.write_bytes(b"\0" * (free - config.store.min_free_bytes + (64 << 10)))
            with pytest.raises(StoreFull):
                await inbound.accept(json.dumps(GOOD).encode())
            assert await store.inbox.find("c-1") is None
            ballast.unlink()
            await inbound.accept(json.dumps(GOOD).encode())
            found = await results(store, 1)
        assert [(d["id"], d["status"]) for d in found] == [("c-1", "ok")]
        assert len(handler.calls) == 1


def _finished_long_ago(config: Config, command_id: str, seconds: float) -> None:
    """Move a finished row's ``finished_at`` (wall) and ``done_on`` (the gateway clock the
    dedupe window is judged on) back, as if the gateway had been away."""
    with sqlite3.connect(config.store.path) as other:
        other.execute("UPDATE inbox SET finished_at = finished_at - ?, done_on = done_on - ? "
                      "WHERE id = ?", (seconds, seconds, command_id))


@pytest.mark.parametrize(("protocol", "runs"), [("5", 1), ("3.1.1", 2)])
async def test_a_redelivery_within_the_session_is_answered_not_run_again(
        tmp_path: Path, protocol: str, runs: int) -> None:
    """A message whose PUBACK was lost comes again when the session resumes, up to
    session_expiry later (MQTT 5): the id is remembered that long even with a shorter
    dedupe_window. Under 3.1.1 the broker decides, and the configured window holds."""
    config = make_config(tmp_path, ["a"], dedupe_window=60.0)
    config = replace(config, mqtt=replace(config.mqtt, protocol=protocol,
                                          session_expiry=7 * 86_400))
    handler = Scripted(lambda r: "ran")
    async with running(config, {"a": handler}) as (inbound, store):
        await inbound.accept(json.dumps(GOOD).encode())
        assert len(await results(store, 1)) == 1
    _finished_long_ago(config, "c-1", 2 * 86_400)  # two days away: past the window
    async with running(config, {"a": handler}) as (inbound, store):  # prunes at its start
        await asyncio.sleep(0.2)
        await inbound.accept(json.dumps(GOOD).encode())  # the broker delivers it again
        await results(store, 2, timeout=2.0)
    assert len(handler.calls) == runs


async def test_a_handler_value_that_cannot_be_stored_still_gives_a_result(
        tmp_path: Path) -> None:
    """For ``ok`` too: a handler returning a lone surrogate or an infinity."""
    values = {"sur": {"k": "\ud800"}, "inf": {"k": float("inf")}, "ctl": "a\x00b"}
    config = make_config(tmp_path, ["a"])
    handler = Scripted(lambda r: values[r.id])
    async with running(config, {"a": handler}) as (inbound, store):
        for command_id in values:
            await inbound.accept(json.dumps({**GOOD, "id": command_id}).encode())
        found = by_id(await results(store, 3))
    assert {d["status"] for d in found.values()} == {"ok"}
    assert "\\ud800" in found["sur"]["detail"]
    assert "inf" in found["inf"]["detail"]
    assert found["ctl"]["detail"] == "a\\x00b"


async def test_a_flood_without_usable_ids_is_said_once_with_its_count_not_per_message(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A message with no id cannot be answered: it is recorded (`pigateway inbox ls`) and
    counted (``pigateway_inbound_total{status="dropped"}``). A cloud app sending garbage
    put one warning per message in the journal: one now, then at most one a minute with
    how many since."""
    config = make_config(tmp_path, ["a"])
    async with running(config, {"a": Scripted(lambda r: "ran")}) as (inbound, _):
        for n in range(50):
            await inbound.accept(f"not json {n}".encode())
    said = [r.getMessage() for r in caplog.records
            if "dropped a message on the commands topic" in r.getMessage()]
    assert len(said) == 1, said[:3]


async def test_a_device_that_fails_is_one_warning_its_retries_info_until_it_answers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device away (unplugged, its bridge down) fails every command it is sent, each
    tried ``inbound.max_attempts`` times: a warning per retry of every command put
    ``commands x (attempts - 1)`` warnings in the journal for one outage. One warning when
    the device first fails, its later retries at info (each still names its command), and
    one info line when it answers again; a command's final failure stays its own error."""
    config = make_config(tmp_path, ["a"], max_attempts=3)
    away = [True]

    def behaviour(request: Request) -> str:
        if away[0]:
            raise RetryableHandlerError("the device does not answer (simulated)")
        return "ran"

    caplog.set_level(logging.INFO)
    async with running(config, {"a": Scripted(behaviour)}) as (inbound, store):
        for n in range(8):
            await inbound.accept(json.dumps({**GOOD, "id": f"c-{n}"}).encode())
        await results(store, 8)
        away[0] = False
        await inbound.accept(json.dumps({**GOOD, "id": "back"}).encode())
        await results(store, 9)
    retried = [r for r in caplog.records if "trying again in" in r.getMessage()]
    assert len(retried) == 8 * 2
    assert [r.levelno for r in retried].count(logging.WARNING) == 1, \
        [r.getMessage() for r in retried if r.levelno >= logging.WARNING]
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO
