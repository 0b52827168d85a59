"""Batching rules (pyoverkiz's action queue) as pure functions, checked against the contract."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigateway import wire
from pigateway.config import StoreConfig
from pigateway.errors import StoreError
from pigateway.store import Command, NewCommand, Store
from pigateway.store.ids import new_id
from pigateway.store.values import decode_params, row_to_command
from pigateway.uplink.batching import (
    Batcher,
    Rules,
    encode_command,
    fits_alone,
    plan,
    split,
    take_batch,
)


@dataclass(frozen=True)
class Row:
    """A claimed row with the fields batching reads (the store's Command has the same ones)."""

    id: str
    device: str
    name: str = "set"
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "action"
    queued_at: float = 1_700_000_000.0
    expires_at: float | None = None

    @property
    def size(self) -> int:
        return len(json.dumps(self.params))


def rows(spec: list[tuple[str, int]]) -> list[Row]:
    """Rows for (device, params size) pairs, ids in put order."""
    return [Row(id=f"c{i:05d}", device=dev, params={"pad": "x" * size})
            for i, (dev, size) in enumerate(spec)]


RULES = Rules(gateway="gw-1", max_actions=3, max_batch_bytes=2048)
NOW = 1_700_000_100.0


def test_one_action_per_device_in_put_order() -> None:
    pending = rows([("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3)])
    take = take_batch(pending, RULES, now=NOW, batch_id="B1")
    assert take.batch is not None and take.rest == []
    doc = json.loads(take.batch.payload)
    assert doc["v"] == 1 and doc["gateway"] == "gw-1" and doc["batch"] == "B1"
    assert doc["sent_at"] == NOW
    assert [a["device"] for a in doc["actions"]] == ["a", "b", "c"]
    assert [c["id"] for c in doc["actions"][0]["commands"]] == ["c00000", "c00002", "c00004"]
    first = doc["actions"][0]["commands"][0]
    assert set(first) == {"id", "name", "params", "queued_at"}
    assert take.batch.ids == [r.id for r in pending]


def test_max_actions_leaves_the_fourth_device_for_the_next_batch() -> None:
    pending = rows([("a", 1), ("b", 1), ("c", 1), ("d", 1), ("a", 1), ("d", 1)])
    take = take_batch(pending, RULES, now=NOW)
    assert take.batch is not None
    devices = [a["device"] for a in json.loads(take.batch.payload)["actions"]]
    assert devices == ["a", "b", "c"]
    assert [r.id for r in take.rest] == ["c00003", "c00005"]


def test_bytes_limit_is_exact_and_respected() -> None:
    pending = rows([("a", 300), ("b", 300), ("a", 300), ("b", 300), ("a", 300), ("c", 300)])
    result = plan(pending, RULES, now=NOW)
    assert len(result.batches) >= 2
    for batch in result.batches:
        assert len(batch.payload) <= RULES.max_batch_bytes
        json.loads(batch.payload)
    # packing is tight: the first batch could not take the next command of any device in it
    assert len(result.batches[0].payload) > RULES.max_batch_bytes - 400


def test_a_command_bigger_than_a_batch_is_too_large_and_others_still_go() -> None:
    pending = rows([("a", 10), ("b", 5000), ("b", 10)])
    result = plan(pending, RULES, now=NOW)
    assert [r.id for r in result.too_large] == ["c00001"]
    assert [i for b in result.batches for i in b.ids] == ["c00000", "c00002"]
    assert not fits_alone(pending[1], RULES)


def test_between_the_packing_and_the_hard_limit_a_command_travels_alone() -> None:
    rules = Rules(gateway="gw", max_actions=5, max_batch_bytes=1024, hard_bytes=4096)
    pending = rows([("a", 10), ("b", 2000), ("c", 10), ("d", 5000)])
    result = plan(pending, rules, now=NOW)
    assert [b.ids for b in result.batches] == [["c00000", "c00002"], ["c00001"]]
    assert [r.id for r in result.too_large] == ["c00003"]
    assert len(result.batches[1].payload) > 1024


def test_expired_rows_are_separated_at_send_time() -> None:
    fresh = Row(id="c1", device="a", expires_at=NOW + 10)
    stale = Row(id="c2", device="a", expires_at=NOW - 1)
    take = take_batch([stale, fresh], RULES, now=NOW)
    assert [r.id for r in take.expired] == ["c2"]
    assert take.batch is not None and take.batch.ids == ["c1"]


def test_results_travel_alone_and_keep_their_document() -> None:
    result_doc = {"v": 1, "id": "x1", "status": "ok", "finished_at": NOW}
    pending = [Row(id="r1", device="a", kind="result", params=result_doc),
               Row(id="c1", device="a"), Row(id="c2", device="b")]
    first = take_batch(pending, RULES, now=NOW)
    assert first.batch is not None and first.batch.kind == "results"
    assert json.loads(first.batch.payload) == result_doc
    second = take_batch(first.rest, RULES, now=NOW)
    assert second.batch is not None and second.batch.kind == "actions"
    assert second.batch.ids == ["c1", "c2"]


def test_result_rows_behind_actions_wait_for_the_next_take() -> None:
    pending = [Row(id="c1", device="a"), Row(id="r1", device="a", kind="result",
                                                params={"v": 1, "id": "z"})]
    take = take_batch(pending, RULES, now=NOW)
    assert take.batch is not None and take.batch.ids == ["c1"]
    assert [r.id for r in take.rest] == ["r1"]


def test_new_ids_are_sortable_and_unique() -> None:
    ids = [new_id(1_700_000_000.0 + i / 1000) for i in range(200)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 200 and all(len(i) == 26 for i in ids)
    assert new_id() > new_id(time.time() - 10)


def test_encode_command_is_compact_utf8_json() -> None:
    row = Row(id="c1", device="a", params={"name": "Küche"})
    text = encode_command(row)
    assert "Küche" in text and " " not in text
    assert json.loads(text) == {"id": "c1", "name": "set", "params": {"name": "Küche"},
                                "queued_at": row.queued_at}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
       name=st.text(min_size=1, max_size=6).filter(lambda n: n.strip()),
       queued_at=st.floats(0, 4e9, allow_nan=False))
def test_a_claimed_row_goes_on_the_wire_as_its_params_encoded_again_would(
        params: dict[str, Any], name: str, queued_at: float) -> None:
    """A row read from the queue carries its params as stored, and a batch splices that
    text: the bytes are the very ones decoding and encoding the params again gave (quotes,
    escapes, non-ASCII, big integers, floats)."""
    text = wire.encode(params)
    row = row_to_command((7, "c-\"1", "action", "dev", name, text, len(text.encode()),
                          queued_at, None, 0, None))
    assert row.params_json == text and row.params == json.loads(text)
    assert encode_command(row) == wire.batch_command(row.id, name, row.params, queued_at)
    assert encode_command(row._replace(params_json=None)) == encode_command(row)


@pytest.mark.parametrize("text", ['{"a":1}', ' {"a": 1} ', '{"a":1}x', '{bad', '', '"s"',
                                  'NaN', '{"a":"\\ud800"}', '{"a":"\x01"}'])
def test_stored_params_decode_as_json_loads_does(text: str) -> None:
    """The claim's decoder (json's scanner alone) gives what json.loads gives, value or
    error, for what the queue stores and for what it should never hold."""
    try:
        expected: Any = json.loads(text)
    except ValueError as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            decode_params(text)
        return
    assert repr(decode_params(text)) == repr(expected)


devices = st.sampled_from([f"dev{i}" for i in range(6)])


@settings(max_examples=150, deadline=None)
@given(spec=st.lists(st.tuples(devices, st.integers(0, 900)), max_size=60),
       max_actions=st.integers(1, 5), max_bytes=st.integers(600, 4000))
def test_any_backlog_keeps_every_rule(spec: list[tuple[str, int]], max_actions: int,
                                      max_bytes: int) -> None:
    rules = Rules(gateway="gw", max_actions=max_actions, max_batch_bytes=max_bytes)
    pending = rows(spec)
    result = plan(pending, rules, now=NOW)
    sent: list[str] = []
    for batch in result.batches:
        doc = json.loads(batch.payload)
        assert len(batch.payload) <= max_bytes
        assert len(doc["actions"]) <= max_actions
        assert len({a["device"] for a in doc["actions"]}) == len(doc["actions"])
        sent += [c["id"] for a in doc["actions"] for c in a["commands"]]
    too_large = {r.id for r in result.too_large}
    assert sorted(sent) == sorted(r.id for r in pending if r.id not in too_large)
    assert len(sent) == len(set(sent))
    for r in result.too_large:
        assert not fits_alone(r, rules)
    order = {i: n for n, i in enumerate(sent)}
    for dev in {d for d, _ in spec}:
        mine = [r.id for r in pending if r.device == dev and r.id in order]
        assert sorted(mine, key=order.__getitem__) == mine


# --------------------------------------------------------------------------- the driver


async def test_a_backlog_goes_at_once_whatever_the_window(store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        for n in range(5):
            await store.put(f"d{n % 2}", "set", {"n": n})
        await asyncio.sleep(0.05)
        batcher = Batcher(store, RULES, batch_delay=0.04)
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and len(batch.ids) == 5


async def test_the_window_starts_at_the_first_command_and_is_not_reset(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        batcher = Batcher(store, Rules("gw", max_actions=10, max_batch_bytes=64 * 1024),
                          batch_delay=0.5)
        nxt = asyncio.create_task(batcher.next_batch())
        first = await store.put("a", "one")
        for name in ("two", "three"):
            await asyncio.sleep(0.1)
            await store.put("a", name)
        async with asyncio.timeout(5):
            batch = await nxt
        late = await store.put("a", "late")  # after the window of "one" closed
        assert batch is not None and batch.ids[0] == first.id
        assert [c.name for c in batch.commands] == ["one", "two", "three"]
        assert late.id not in batch.ids


async def test_a_wall_clock_set_back_does_not_hold_the_batch(store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        batcher = Batcher(store, RULES, batch_delay=0.2,
                          clock=lambda: time.time() - 3600)  # the clock went back an hour
        await store.put("a", "go")
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and [c.name for c in batch.commands] == ["go"]


async def test_flush_ends_the_window_and_interrupt_returns_none(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        batcher = Batcher(store, RULES, batch_delay=60.0)
        nxt = asyncio.create_task(batcher.next_batch())
        await store.put("a", "go")
        await asyncio.sleep(0.1)
        assert not nxt.done()
        batcher.flush()
        async with asyncio.timeout(5):
            assert (await nxt) is not None
        batcher.interrupt()
        async with asyncio.timeout(5):
            assert await batcher.next_batch() is None
        batcher.proceed()


async def test_the_driver_buries_too_large_and_expired_rows(
        store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await Store.open(store_config) as store:
        await store.put("a", "huge", {"blob": "x" * 5000})
        await store.put("a", "fine")
        batcher = Batcher(store, RULES, batch_delay=0.0)
        short = await store.put("b", "stale", ttl=60)
        hour_later = store.clock.now() + 3600  # sends an hour later (on the TTLs' clock)
        monkeypatch.setattr(store.clock, "now", lambda: hour_later)
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and [c.name for c in batch.commands] == ["fine"]
        dead = {d.command.name: d.reason for d in await store.list_dead()}
        assert dead == {"huge": "too-large", "stale": "expired"}
        assert short.id not in batch.ids


async def test_a_claim_cut_off_by_cancellation_is_still_given_back(
        store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        await store.put_many([NewCommand("a", f"c{n}") for n in range(50)])
        batcher = Batcher(store, RULES, batch_delay=60.0, claim_limit=50)
        task = asyncio.create_task(batcher._claim())
        await asyncio.sleep(0)  # the claim is on its way to the writer
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ids = batcher.give_back()
        assert len(ids) == 50  # recorded although the caller was cancelled
        await store.release(ids)  # never sent: back at the head, no attempt counted
        assert (await store.stats()).in_flight == 0
        queued = await store.list_queued(50)
        assert [c.name for c in queued] == [f"c{n}" for n in range(50)]
        assert {c.attempts for c in queued} == {0}


async def test_cancelling_a_waiting_batcher_cancels_it(store_config: StoreConfig) -> None:
    async with await Store.open(store_config) as store:
        batcher = Batcher(store, RULES, batch_delay=0.04, idle_poll=30.0)
        waiting = asyncio.create_task(batcher.next_batch())
        await asyncio.sleep(0.1)  # idle: inside the wait for work
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 2)
        assert waiting.cancelled()


class GatedStore:
    """The real store, with its dead-letter writes held at a gate (or failing) on demand.

    Only the timing is the test's: every call still reaches the real store on disk.
    """

    def __init__(self, store: Store, *, fail: bool = False, ahead: float = 0.0) -> None:
        self.store = store
        self.fail = fail
        self.ahead = ahead
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    @property
    def clock(self) -> GatedStore:
        """The batcher sends ``ahead`` seconds later than the store claimed (a TTL runs out
        between the claim and the batch)."""
        return self

    def now(self) -> float:
        return self.store.clock.now() + self.ahead

    async def claim(self, limit: int) -> list[Command]:
        return await self.store.claim(limit)

    async def release(self, ids: Sequence[str]) -> None:
        await self.store.release(ids)

    async def wait_for_work(self, timeout: float) -> None:
        await self.store.wait_for_work(timeout)

    async def dead_letter(self, ids: Sequence[str], reason: str,
                          detail: str | None = None) -> None:
        self.reached.set()
        await self.gate.wait()
        if self.fail:
            raise StoreError("queue.db stayed locked by another process: database is locked")
        await self.store.dead_letter(ids, reason, detail)


async def stale_then_fresh(store: Store) -> list[str]:
    """Device a: a command stale by send time, then two live ones; b: one live one."""
    put = [await store.put("a", "stale", ttl=60), await store.put("a", "first"),
           await store.put("b", "other"), await store.put("a", "second")]
    return [c.id for c in put]


async def test_a_cancel_while_burying_keeps_the_batch_pending_in_order(
        store_config: StoreConfig) -> None:
    """The link drops while the batcher dead-letters an expired row."""
    async with await Store.open(store_config) as store:
        ids = await stale_then_fresh(store)
        gated = GatedStore(store, ahead=3600)
        batcher = Batcher(gated, RULES, batch_delay=0.0)
        task = asyncio.create_task(batcher.next_batch())
        async with asyncio.timeout(5):
            await gated.reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [c.id for c in batcher.pending] == ids  # the built batch was not dropped
        await store.release(batcher.give_back())  # what the uplink does when its link ends
        assert (await store.stats()).in_flight == 0
        assert [c.id for c in await store.list_queued()] == ids
        gated.gate.set()
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and batch.ids == ids[1:]
        assert [d.command.id for d in await store.list_dead()] == [ids[0]]


async def test_a_store_error_while_burying_keeps_every_row_pending(
        store_config: StoreConfig) -> None:
    """A busy store while dead-lettering loses nothing; the next call goes on."""
    async with await Store.open(store_config) as store:
        ids = await stale_then_fresh(store)
        gated = GatedStore(store, fail=True, ahead=3600)
        gated.gate.set()
        batcher = Batcher(gated, RULES, batch_delay=0.0)
        with pytest.raises(StoreError):
            async with asyncio.timeout(5):
                await batcher.next_batch()
        assert [c.id for c in batcher.pending] == ids
        gated.fail = False
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and batch.ids == ids[1:]
        assert batcher.pending == []
        assert [d.command.id for d in await store.list_dead()] == [ids[0]]


def test_split_halves_a_batch_in_order_and_keeps_every_command() -> None:
    """Even a command past its TTL stays in a part: a claimed row must never be dropped."""
    rules = Rules("gw", max_actions=50, max_batch_bytes=64 * 1024)
    claimed = [Row(f"c{n}", f"dev{n % 3}", params={"n": n},
                   expires_at=1_700_000_001.0 if n == 2 else None) for n in range(7)]
    whole = take_batch(claimed, rules, now=1_700_000_000.0).batch
    assert whole is not None and len(whole.commands) == 7
    later = 1_700_000_100.0  # c2 has expired by now
    parts = split(whole, rules, now=later)
    assert [p.ids for p in parts] == [["c0", "c1", "c2"], ["c3", "c4", "c5", "c6"]]
    assert [p.ids for p in split(parts[0], rules, now=later)] == [["c0"], ["c1", "c2"]]
    single = split(split(parts[0], rules, now=later)[0], rules, now=later)
    assert [p.ids for p in single] == [["c0"]]


def test_a_busy_devices_rows_wait_in_order_and_the_others_go() -> None:
    """A device in a batch not acknowledged yet is in no other batch: its rows stay
    pending, in put order, and the other devices' rows go (the in-flight ledger's rule)."""
    pending = rows([("a", 1), ("b", 1), ("a", 2), ("c", 1)])
    take = take_batch(pending, RULES, now=NOW, busy={"a"})
    assert take.batch is not None
    assert take.batch.ids == ["c00001", "c00003"]
    assert [r.id for r in take.rest] == ["c00000", "c00002"]
    assert take_batch(pending, RULES, now=NOW, busy={"a", "b", "c"}).batch is None


def test_a_busy_devices_result_waits_and_the_next_free_row_goes_alone() -> None:
    pending = [Row(id="r0", device="a", kind="result", params={"v": 1}),
               Row(id="r1", device="b", kind="result", params={"v": 1}),
               Row(id="c2", device="a")]
    take = take_batch(pending, RULES, now=NOW, busy={"a"})
    assert take.batch is not None and take.batch.ids == ["r1"]
    assert [r.id for r in take.rest] == ["r0", "c2"]


def test_an_action_behind_a_result_of_its_device_waits_for_it() -> None:
    """Rows that travel alone are skipped by an actions batch, and so is the rest of
    their device: a device's rows leave in put order whatever their kind."""
    pending = [Row(id="c0", device="b"), Row(id="r1", device="a", kind="result",
                                            params={"v": 1}), Row(id="c2", device="a")]
    take = take_batch(pending, RULES, now=NOW)
    assert take.batch is not None and take.batch.ids == ["c0"]
    assert [r.id for r in take.rest] == ["r1", "c2"]


@pytest.mark.parametrize("text", ['{"a":NaN}', '{"a":[1,Infinity]}', '{"a":{"b":-Infinity}}'])
def test_stored_params_our_encoder_refuses_are_never_spliced_onto_the_wire(text: str) -> None:
    """A row whose stored params json.loads takes but are not JSON (NaN, Infinity: written
    by no version of the put, but a salvaged or hand-edited file can hold them) goes the way
    its params encoded again go (refused: ValueError), never spliced into a batch that every
    other command of it then travels in as text a strict consumer cannot parse."""
    row = row_to_command((7, "c1", "action", "dev", "set", text, len(text), NOW, None, 0, None))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode_command(row._replace(params_json=None))
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode_command(row)


async def test_a_row_whose_params_cannot_be_sent_is_buried_alone(
        store_config: StoreConfig) -> None:
    """A stored row whose params are not JSON (NaN: a salvaged or hand-edited file) is
    dead-lettered on its own, and the others go: it neither ends every claim (the queue
    stalled behind it, claim after claim) nor travels in a batch."""
    async with await Store.open(store_config) as store:
        bad = await store.put("a", "bad", {"v": 1})
        await store.put("a", "fine")
        await store.put("b", "other")
        with sqlite3.connect(store_config.path) as conn:  # as a foreign writer would
            conn.execute("UPDATE outbox SET params = ? WHERE id = ?", ('{"v":NaN}', bad.id))
        batcher = Batcher(store, RULES, batch_delay=0.0)
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and sorted(c.name for c in batch.commands) == ["fine", "other"]
        json.loads(batch.payload, parse_constant=pytest.fail)
        dead = {d.command.name: d.reason for d in await store.list_dead()}
        assert list(dead) == ["bad"]


async def test_params_stored_as_a_blob_go_out_as_json_and_a_blob_name_alone_is_buried(
        store_config: StoreConfig) -> None:
    """SQLite keeps a BLOB in a TEXT column (a foreign writer, a salvaged file): params
    stored so go out as their JSON encoded again (json.loads read them; the scanner alone
    does not), and a row whose name is a BLOB, which no batch can carry, is dead-lettered
    alone: neither stalls every claim behind it."""
    async with await Store.open(store_config) as store:
        blob = await store.put("a", "blob", {"v": 1})
        named = await store.put("b", "named")
        await store.put("c", "fine")
        with sqlite3.connect(store_config.path) as conn:
            conn.execute("UPDATE outbox SET params = ? WHERE id = ?", (b'{"v":1}', blob.id))
            conn.execute("UPDATE outbox SET name = ? WHERE id = ?", (b"named", named.id))
        batcher = Batcher(store, RULES, batch_delay=0.0)
        async with asyncio.timeout(5):
            batch = await batcher.next_batch()
        assert batch is not None and sorted(batch.ids) == sorted([blob.id, *(
            c.id for c in batch.commands if c.name == "fine")])
        sent = json.loads(batch.payload)
        assert {"v": 1} in [command["params"] for action in sent["actions"]
                            for command in action["commands"]]
        assert [d.reason for d in await store.list_dead()] == ["invalid"]


def forward(n: int, topic: str, **extra: Any) -> Row:
    """A forwarded row of ``topic`` as ingest makes it (payload ``<topic>-<n>``)."""
    return Row(id=f"f{n:05d}", device=topic, name="forward", kind="forward",
               params={"t": f"up/{topic}", "p": f"{topic}-{n}"}, **extra)


def test_a_train_takes_a_topics_next_forwards_and_leaves_the_rest_in_order() -> None:
    """A forwarded row takes the next forwarded rows of its topic (at most ``train``), each
    its own message in order; other topics' rows, and the topic's rows past the train, stay
    pending in their order."""
    pending = [forward(0, "a"), forward(1, "b"), forward(2, "a"), forward(3, "a"),
               forward(4, "b"), forward(5, "a")]
    take = take_batch(pending, RULES, now=NOW, train=3)
    assert take.batch is not None and take.batch.train
    assert take.batch.ids == ["f00000", "f00002", "f00003"]
    assert [f.payload for f in take.batch.forwards] == [b"a-0", b"a-2", b"a-3"]
    assert [r.id for r in take.rest] == ["f00001", "f00004", "f00005"]
    assert take.batch.id not in take.batch.ids  # the ledger holds the topic by the train


@pytest.mark.parametrize("stop", ["an action of the topic", "an expired forward"])
def test_a_train_ends_before_a_row_that_must_be_judged_alone(stop: str) -> None:
    """A row of the topic that is no forward, or is expired, ends the train: it and the
    rows behind it stay pending, in order (the next take judges it)."""
    odd = Row(id="x", device="a") if stop == "an action of the topic" \
        else forward(9, "a", expires_at=NOW - 1)
    pending = [forward(0, "a"), forward(1, "a"), odd, forward(2, "a")]
    take = take_batch(pending, RULES, now=NOW, train=8)
    assert take.batch is not None and take.batch.ids == ["f00000", "f00001"]
    assert [r.id for r in take.rest] == [odd.id, "f00002"]


def test_a_train_of_one_is_a_plain_forward() -> None:
    take = take_batch([forward(0, "a"), forward(1, "b")], RULES, now=NOW, train=4)
    assert take.batch is not None and not take.batch.train and take.batch.id == "f00000"
