"""A list put is checked by the same rule as one put, and its cheaper parts make what the
general ones make: ``prepare_many`` against ``prepare`` item by item (rows, and the first
error word for word), a batch of ids against the 130-bit encoding, the put path's JSON
encoder against the standard library's."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigateway import wire
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand
from pigateway.store import NewCommand, ids, prepare
from pigateway.store.values import prepare_many

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STORE = StoreConfig(path=Path("/nonexistent/queue.db"), min_free_bytes=0, max_params_bytes=200)

#: Names: good ones (repeated, so a list meets a name twice), and every kind of bad one.
NAMES = st.one_of(
    st.sampled_from(["lamp", "set", "dev-1", "é", " x ", "a" * 128]),
    st.sampled_from(["", " ", "\u2003", "a" * 129, "la\nmp", "\x9b", "x\ud800", "\x00"]),
    st.text(max_size=6),
    st.sampled_from([None, 5, b"lamp"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=8)
ITEMS = st.builds(
    NewCommand, device=NAMES, name=NAMES,
    params=st.one_of(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3),
                     st.sampled_from([[], "x", {"big": "x" * 300}, {1: 2}])),
    ttl=st.one_of(st.none(), st.floats(), st.integers(-2, 10**400), st.sampled_from([True])),
    kind=st.sampled_from(["action", "result", "forward", "other"]),
    id=st.one_of(st.none(), NAMES),
    priority=st.one_of(st.none(), st.sampled_from(["high", "normal", "low", "urgent"])))


def _outcome(make: Any) -> tuple[str, Any]:
    try:
        rows = make()
    except InvalidCommand as exc:
        return "error", str(exc)
    # generated ids differ; everything else is the same
    return "rows", [(None if item_id is None else row[0], *row[1:])
                    for row, item_id in rows]


@FUZZ
@given(items=st.lists(ITEMS, max_size=6))
def test_a_list_is_checked_as_its_items_one_by_one(items: list[NewCommand]) -> None:
    now = time.time()
    together = _outcome(lambda: list(zip(prepare_many(items, STORE, now, now - 5),
                                         [i.id for i in items], strict=True)))
    alone = _outcome(lambda: [(prepare(i, STORE, now, now - 5), i.id) for i in items])
    assert together == alone


class _Lookalike(str):
    """A str that equals any other, and hashes as the name it is told to pass for."""

    def __new__(cls, text: str, passes_for: str) -> _Lookalike:
        made = super().__new__(cls, text)
        made.passes_for = passes_for
        return made

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash(self.passes_for)


@pytest.mark.parametrize("field", ["device", "name"])
def test_a_name_that_only_looks_like_one_already_passed_is_checked_itself(field: str) -> None:
    label = "device" if field == "device" else "command name"
    first, bad = NewCommand("lamp", "on"), {field: _Lookalike("la\nmp", "lamp")}
    with pytest.raises(InvalidCommand, match=rf"{label} .* control character"):
        prepare_many([first, first._replace(**bad)], STORE, time.time())
    # nor does a good lookalike vouch for a bad name that hashes as it does
    good, bad = {field: _Lookalike("lamp", "la\x00mp")}, {field: "la\x00mp"}
    with pytest.raises(InvalidCommand, match=rf"{label} .* control character"):
        prepare_many([first._replace(**good), first._replace(**bad)],
                     STORE, time.time())


def test_the_ids_of_a_list_are_fresh_sorted_and_follow_the_last_one() -> None:
    before = ids.new_id()
    batch = ids.new_ids(3000)
    after = ids.new_id()
    everything = [before, *batch, after]
    assert everything == sorted(everything) and len(set(everything)) == 3002
    rows = prepare_many([NewCommand("d", "n")] * 2000, STORE, time.time())
    assert len({row[0] for row in rows}) == 2000 and ids.new_ids(0) == []


def _reference(ms: int, rand: int) -> str:
    value = (ms << 80) | rand
    return "".join(ids._PAIRS[(value >> shift) & 1023] for shift in range(120, -10, -10))


def test_an_id_is_the_ulid_encoding_of_its_millisecond_and_random_part() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        ms, rand = rng.getrandbits(48), rng.getrandbits(80)
        assert ids._encode(ms, rand) == _reference(ms, rand)


@pytest.mark.parametrize("rand", [1020, (1 << 40) - 3, (1 << 80) - 3])
def test_a_list_of_ids_counts_across_every_carry(monkeypatch: pytest.MonkeyPatch,
                                                 rand: int) -> None:
    ms = time.time_ns() // 1_000_000 + 60_000  # ahead of the clock: the count goes on
    monkeypatch.setattr(ids, "_last_id", [ms, rand - 1])
    assert ids.new_ids(6) == [_reference(ms, (rand + n) & ids._RANDOM_MASK) for n in range(6)]


@FUZZ
@given(value=st.one_of(JSON_VALUES, st.dictionaries(st.integers(), st.integers(), max_size=2)))
def test_the_put_paths_json_is_the_standard_encoders(value: Any) -> None:
    standard = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        expected = standard.encode(value)
    except ValueError as exc:
        with pytest.raises(ValueError, match=str(exc)):
            wire.encode(value)
        return
    assert wire.encode(value) == expected


def test_what_the_json_refuses_is_said_in_the_standard_encoders_words() -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    for value, error in ((circular, "Circular reference detected"), ({"x": math.inf},
                         "Out of range float"), ({"x": object()}, "not JSON serializable")):
        with pytest.raises((ValueError, TypeError), match=error):
            wire.encode(value)
