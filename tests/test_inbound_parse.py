"""The commands-topic parser: every way a message can miss the contract gets a clear reason."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import gateway
from pigateway.errors import RejectedCommand
from pigateway.inbound import Inbound, Limits, parse_command, readable_id
from pigateway.store import Store

LIMITS = Limits(max_bytes=4096, max_depth=8, devices=frozenset({"lamp", "relay"}))
GOOD: dict[str, Any] = {"v": 1, "id": "c-1", "device": "lamp", "name": "on", "params": {"x": 1}}


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def rejected(payload: bytes) -> RejectedCommand:
    with pytest.raises(RejectedCommand) as caught:
        parse_command(payload, LIMITS)
    return caught.value


def test_a_good_command_is_parsed() -> None:
    command = parse_command(encode({**GOOD, "ttl": 30}), LIMITS)
    assert (command.id, command.device, command.name) == ("c-1", "lamp", "on")
    assert command.params == {"x": 1}
    assert command.ttl == 30.0
    assert parse_command(encode({**GOOD, "ttl": None}), LIMITS).ttl is None


# (what is wrong, payload, words the reason must contain, whether the id is readable)
CASES: list[tuple[str, bytes, str, bool]] = [
    ("not json", b"{nope", "not JSON", False),
    ("empty", b"", "not JSON", False),
    ("array", b"[1, 2]", "must be a JSON object, got an array", False),
    ("string", b'"on"', "must be a JSON object, got a string", False),
    ("invalid utf-8", b'{"id": "\xff\xfe"}', "not UTF-8", False),
    ("oversize", encode({**GOOD, "params": {"x": "y" * 5000}}), "limit is 4096", False),
    ("nan", b'{"v": 1, "id": "c-1", "params": {"x": NaN}}', "not JSON", False),
    ("deep nesting", encode({**GOOD, "params": {"a": [[[[[[[[1]]]]]]]]}}), "nested more than 8",
     False),
    ("very deep nesting", b"[" * 2000 + b"]" * 2000, "nested more than 8", False),
    ("missing id", encode({k: v for k, v in GOOD.items() if k != "id"}), "'id' is missing",
     False),
    ("numeric id", encode({**GOOD, "id": 7}), "'id' must be a string", False),
    ("control char id", encode({**GOOD, "id": "a\nb"}), "'id' must be a string", False),
    ("missing v", encode({k: v for k, v in GOOD.items() if k != "v"}), "'v' is missing", True),
    ("v as string", encode({**GOOD, "v": "1"}), "'v' must be the number 1", True),
    ("v true", encode({**GOOD, "v": True}), "'v' must be the number 1", True),
    ("unknown v", encode({**GOOD, "v": 2}), "unsupported version v=2", True),
    ("unknown field", encode({**GOOD, "extra": 1}), "unknown field 'extra'", True),
    ("missing device", encode({k: v for k, v in GOOD.items() if k != "device"}),
     "'device' is missing", True),
    ("device not a string", encode({**GOOD, "device": ["lamp"]}), "'device' must be a string",
     True),
    ("unknown device", encode({**GOOD, "device": "toaster"}), "unknown device 'toaster'", True),
    ("missing name", encode({k: v for k, v in GOOD.items() if k != "name"}), "'name' is missing",
     True),
    ("bad name", encode({**GOOD, "name": "turn on!"}), "'name' must be", True),
    ("missing params", encode({k: v for k, v in GOOD.items() if k != "params"}),
     "'params' is missing", True),
    ("params a list", encode({**GOOD, "params": [1]}), "'params' must be a JSON object", True),
    ("negative ttl", encode({**GOOD, "ttl": -1}), "'ttl' must be seconds > 0", True),
    ("ttl as string", encode({**GOOD, "ttl": "5"}), "'ttl' must be seconds > 0", True),
    ("ttl bool", encode({**GOOD, "ttl": True}), "'ttl' must be seconds > 0", True),
]


@pytest.mark.parametrize(("payload", "words", "has_id"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed_input_is_rejected_with_a_reason(payload: bytes, words: str,
                                                   has_id: bool) -> None:
    error = rejected(payload)
    assert words in error.reason
    assert (error.command_id == "c-1") is has_id


def test_the_device_is_kept_for_the_answer_when_readable() -> None:
    error = rejected(encode({**GOOD, "name": 5}))
    assert (error.command_id, error.device) == ("c-1", "lamp")


def test_huge_integers_are_rejected_not_crashing() -> None:
    error = rejected(b'{"v": 1, "id": "c-1", "params": {"n": ' + b"9" * 5000 + b"}}")
    assert "JSON" in error.reason or "limit" in error.reason


# --------------------------------------------------------------------------- fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                        children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_never_escape_as_another_error(payload: bytes) -> None:
    try:
        command = parse_command(payload, LIMITS)
    except RejectedCommand as exc:
        assert exc.reason
    else:
        assert command.device in LIMITS.devices


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "id", "device", "name", "params", "ttl", "x"]),
                       json_values, max_size=7))
def test_fuzz_documents_either_fit_the_contract_or_are_rejected(document: dict[str, Any]) -> None:
    try:
        command = parse_command(encode(document), LIMITS)
    except RejectedCommand as exc:
        assert exc.reason
        if exc.command_id is not None:
            assert exc.command_id == document["id"]
    else:
        assert document["v"] == 1 and document["v"] is not True
        assert command.device in LIMITS.devices
        assert isinstance(command.params, dict)
        assert set(document) <= {"v", "id", "device", "name", "params", "ttl"}


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_fuzz_any_params_inside_a_good_envelope(params: Any) -> None:
    payload = encode({**GOOD, "params": params})
    try:
        command = parse_command(payload, LIMITS)
    except RejectedCommand as exc:
        assert exc.command_id == "c-1"
        assert not isinstance(params, dict) or "nested" in exc.reason or "limit" in exc.reason
    else:
        assert command.params == params


# --------------------------------------------------------------------------- fuzz accept


def _readable(payload: bytes) -> str | None:
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return readable_id(document) if isinstance(document, dict) else None


async def _accept_all(folder: Path, payloads: list[bytes]) -> None:
    config = gateway.config(folder, gateway_id="gw", devices={"lamp": {"handler": "log"}})
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store)
        for payload in payloads:
            dead_before = (await store.stats()).dead_total
            await inbound.accept(payload)  # never raises for bad input
            command_id = _readable(payload)
            recorded = command_id is not None and await store.inbox.find(command_id)
            dead_after = (await store.stats()).dead_total
            assert recorded or dead_after == dead_before + 1, payload
        for entry in await store.inbox.listing(1000):
            if entry.state == "done":
                assert entry.status == "rejected" and entry.result is not None


envelopes = st.fixed_dictionaries(
    {}, optional={"v": st.sampled_from([1, 2, "1", None]), "id": st.text(max_size=4),
                  "device": st.sampled_from(["lamp", "toaster", 3]),
                  "name": st.sampled_from(["on", "", "a b"]), "params": json_values,
                  "ttl": st.sampled_from([1, -1, "x", None])})


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64) | envelopes.map(encode), max_size=25))
def test_fuzz_accept_persists_or_dead_letters_every_message(tmp_path_factory: Any,
                                                            payloads: list[bytes]) -> None:
    asyncio.run(_accept_all(tmp_path_factory.mktemp("fuzz"), payloads))


# --------------------------------------------------------------------------- the whole input space
# What json.loads accepts but no store or encoder takes: numbers beyond a double (1e400 is
# infinity once parsed), lone surrogate escapes, control characters, very long keys. The
# payloads are rendered by hand so these reach json.loads exactly as a client can send them.


class Huge(float):
    """A number json.loads turns into +-infinity; rendered as ``1e400`` / ``-1e999``."""


def render(value: Any) -> str:
    """JSON text of ``value``; strings ASCII-escaped, so lone surrogates become ``\\udXXX``."""
    if isinstance(value, Huge):
        return "1e400" if value > 0 else "-1e999"
    if isinstance(value, dict):
        return "{" + ",".join(f"{render(k)}:{render(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=True)


any_char = st.characters(blacklist_categories=())  # surrogates (Cs) and controls (Cc) too
edge_text = (st.text(any_char, max_size=6)
             | st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\x00", "\x1b[31m", "\n"])
             | st.integers(1000, 60_000).map(lambda n: "k" * n))
edge_scalars = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | edge_text
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.sampled_from([Huge(1.0), Huge(-1.0)]))
edge_values = st.recursive(
    edge_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(edge_text, children, max_size=3),
    max_leaves=8,
)
edge_documents = st.fixed_dictionaries(
    {}, optional={"v": st.sampled_from([1, 2]) | edge_values,
                  "id": st.sampled_from(["c-1", "c-2"]) | edge_text,
                  "device": st.sampled_from(["lamp", "relay"]) | edge_values,
                  "name": st.sampled_from(["on", "set"]) | edge_values,
                  "params": st.dictionaries(edge_text, edge_values, max_size=3) | edge_values,
                  "ttl": st.sampled_from([30, Huge(1.0), Huge(-1.0)]) | edge_values}
).flatmap(lambda document: st.dictionaries(edge_text, edge_values, max_size=1).map(
    lambda extra: {**document, **extra}))


def storable(value: Any) -> bool:
    """Whether the store can hold ``value`` as JSON text: finite numbers, UTF-8 strings."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        return False
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.data_too_large])
@given(edge_documents)
def test_fuzz_the_parser_over_what_json_loads_accepts(document: dict[str, Any]) -> None:
    limits = Limits(max_bytes=256 * 1024, max_depth=8, devices=LIMITS.devices)
    try:
        command = parse_command(render(document).encode(), limits)
    except RejectedCommand as exc:
        assert storable(exc.reason) and len(exc.reason) <= 500
        assert exc.command_id is None or storable(exc.command_id)
    else:
        assert storable(command.params) and storable([command.id, command.name])
        assert command.ttl is None or math.isfinite(command.ttl)


async def _accept_edges(folder: Path, payloads: list[bytes]) -> None:
    """Every payload through the real accept into a real store: nothing escapes, each is
    recorded, answered or dead-lettered, and every stored result fits and re-encodes."""
    config = gateway.config(folder, gateway_id="gw", devices={"lamp": {"handler": "log"}},
                            store={"max_params_bytes": 4096},
                            inbound={"max_payload_bytes": 256 * 1024})
    async with await Store.open(config.store) as store:
        inbound = Inbound(config, store)
        for payload in payloads:
            dead_before = (await store.stats()).dead_total
            await inbound.accept(payload)  # raises only StoreError, and the store is fine
            command_id = _readable(payload)
            recorded = command_id is not None and await store.inbox.find(command_id)
            assert recorded or (await store.stats()).dead_total == dead_before + 1
        for command in await store.list_queued(1000):
            assert command.kind == "result"
            encoded = json.dumps(command.params, ensure_ascii=False, allow_nan=False)
            assert len(encoded.encode("utf-8")) <= config.store.max_params_bytes
        for entry in await store.inbox.listing(1000):
            assert entry.last_error is None or storable(entry.last_error)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(st.lists(edge_documents.map(lambda d: render(d).encode()), min_size=1, max_size=8))
def test_fuzz_accept_over_what_json_loads_accepts(tmp_path_factory: Any,
                                                 payloads: list[bytes]) -> None:
    asyncio.run(_accept_edges(tmp_path_factory.mktemp("edges"), payloads))
