"""The store's seams: callers use verbs, never SQL, and the inbox's verbs keep their promises
(a repeat is told apart from a new command by the store; a result and its ``done`` commit
together)."""

from __future__ import annotations

import re
import time
from pathlib import Path

from pigateway import wire
from pigateway.config import StoreConfig
from pigateway.store import Store
from pigateway.store.inbox import Entry

SERVICE = Path(__file__).resolve().parents[1] / "service" / "pigateway"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b")


def test_no_module_outside_the_store_speaks_sql() -> None:
    speaking = [f"{path.name}:{number}" for path in sorted(SERVICE.glob("*.py"))
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if SQL.search(line)]
    assert speaking == [], "SQL belongs in pigateway/store/; use or add a verb there"


async def test_receive_tells_a_new_command_from_one_received_before(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        async def receive(name: str, *, replace: bool = False) -> Entry | None:
            return await store.inbox.receive("c-1", "lamp", name, {}, expires_at=None, ttl=None,
                                       now=time.time(), headroom=0, replace=replace)
        assert await receive("on") is None
        before = await receive("off")
        assert before is not None and before.name == "on"  # untouched by the repeat
        assert await receive("off", replace=True) is None
        entry = await store.inbox.find("c-1")
        assert entry is not None and entry.name == "off"


async def test_finish_queues_the_result_marks_done_and_the_next_running_at_once(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        for command_id in ("c-1", "c-2"):
            await store.inbox.receive(command_id, "lamp", "on", {}, expires_at=None, ttl=None,
                                      now=time.time(), headroom=0)
        document = wire.result_document("c-1", "ok", max_bytes=1024)
        await store.inbox.finish("c-1", "lamp", document, done_on=store.clock.now(),
                                 then_running=("c-2", 1, time.time()))
        first, second = await store.inbox.find("c-1"), await store.inbox.find("c-2")
        assert first is not None and first.state == "done" and first.result == document
        assert second is not None and second.state == "running" and second.attempts == 1
        [result] = await store.list_queued()
        assert (result.kind, result.device, result.params) == ("result", "lamp", document)
