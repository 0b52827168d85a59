"""Input from people and clients, fuzzed over the whole space: only typed errors come out.

``json.loads`` accepts more than can be stored or sent on (``1e400``, ``NaN``, ``"\\ud800"``,
a 5,000-digit integer) and raises builtin exceptions on more still (4,000 nested ``[``).
These tests throw all of that, and arbitrary text with control characters and lone
surrogates, at the command line's ``parse_params`` (then the store's ``prepare`` and a
real store, as ``pigateway send`` does) and at the control socket's request parser.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import gateway
from pigateway import inputs
from pigateway.cli import main, parse_params
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand, PigatewayError
from pigateway.listeners import control
from pigateway.listeners.control import ControlServer
from pigateway.state import GatewayState
from pigateway.store import NewCommand, Store, prepare

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------- strategies

#: Characters with the troublesome ones made common: controls, NUL, lone surrogates.
CHARACTERS = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\n", "\r", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff"]),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.sampled_from(list('[]{}",:\\')),
)
TEXT = st.text(CHARACTERS, max_size=40)

#: Number tokens as they appear in JSON text, the ones Python cannot hold among them.
NUMBERS = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e400", "-1e999", "1.5e-400", "NaN", "Infinity", "-Infinity", "-0",
                     "9" * 1001, "-" + "9" * 5000, "1" + "0" * 4301, "1E+308", "2e308"]),
)

#: String tokens: well-formed, escaped lone surrogates, raw control characters.
STRINGS = st.one_of(
    TEXT.map(lambda t: json.dumps(t, ensure_ascii=False)),
    TEXT.map(json.dumps),
    st.integers(0xD800, 0xDFFF).map(lambda c: f'"x\\u{c:04x}"'),
    TEXT.map(lambda t: f'"{t}"'),
)

LEAVES = st.one_of(NUMBERS, STRINGS, st.sampled_from(["true", "false", "null"]))


def _compound(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    members = st.tuples(STRINGS, children).map(lambda kv: f"{kv[0]}:{kv[1]}")
    objects = st.lists(members, max_size=4).map(lambda items: "{" + ",".join(items) + "}")
    return st.one_of(arrays, objects)


#: Nesting of any depth up to far past Python's recursion limit, closed or not.
DEEP = st.tuples(st.integers(1, 6000), st.sampled_from(["[", "{\"a\":"]), st.booleans()).map(
    lambda t: t[1] * t[0] + ("1" + ("]" if t[1] == "[" else "}") * t[0] if t[2] else ""))

JSON_TEXT = st.one_of(st.recursive(LEAVES, _compound, max_leaves=12), DEEP, TEXT)
OBJECTS = st.one_of(
    st.lists(st.tuples(STRINGS, JSON_TEXT), max_size=4).map(
        lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"),
    DEEP.map(lambda deep: '{"a":' + deep + "}"),
    JSON_TEXT,
)
PAIRS = st.lists(st.tuples(TEXT, st.one_of(JSON_TEXT, TEXT)).map(lambda kv: f"{kv[0]}={kv[1]}")
                 | TEXT, max_size=4)


# --------------------------------------------------------------------------- the shared rule


@FUZZ
@given(text=st.one_of(JSON_TEXT, OBJECTS))
def test_loads_gives_json_that_can_be_sent_on_or_a_typed_error(text: str) -> None:
    try:
        value = inputs.loads(text)
    except InvalidCommand as exc:
        assert len(str(exc)) < 400
        return
    encoded = json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    assert json.loads(encoded) == value
    assert inputs.depth(text) <= inputs.MAX_DEPTH


# --------------------------------------------------------------------------- send


STORE = StoreConfig(path=Path("/nonexistent/queue.db"), min_free_bytes=0)  # prepare only


@FUZZ
@given(pairs=PAIRS, params_json=st.none() | OBJECTS)
def test_parse_params_then_prepare_raise_only_typed_errors(pairs: list[str],
                                                          params_json: str | None) -> None:
    try:
        params = parse_params(pairs, params_json)
        row = prepare(NewCommand("lamp-1", "on", params), STORE, time.time())
    except PigatewayError as exc:
        assert len(str(exc)) < 1000, "an error message is bounded"
        return
    text = row[4]
    assert json.loads(text.encode()) == json.loads(json.dumps(params, ensure_ascii=False))


@FUZZ
@given(device=TEXT, name=TEXT)
def test_prepare_takes_only_names_that_travel(device: str, name: str) -> None:
    """Device and command names: no control characters, no lone surrogates, 1-128 chars."""
    try:
        prepare(NewCommand(device, name, {}), STORE, time.time())
    except InvalidCommand as exc:
        assert len(str(exc)) < 1000
        return
    for value in (device, name):
        assert inputs.text_problem(value) is None and value.strip()
        value.encode()


@pytest.mark.parametrize(("device", "name", "words"), [
    ("lamp\n1", "on", "control character (U+000A at 4)"),
    ("lamp", "on\x00", "control character (U+0000 at 2)"),
    ("lamp\u009b", "on", "control character"),
    ("\ud800lamp", "on", "lone surrogate (U+D800 at 0)"),
    ("lamp", "o\udcffn", "lone surrogate"),
])
async def test_the_python_api_has_the_same_rule_as_send(tmp_path: Path, device: str, name: str,
                                                       words: str) -> None:
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    async with await Store.open(config, drainer=False) as store:
        with pytest.raises(InvalidCommand, match=re.escape(words)):
            await store.put(device, name, {})
        for params in ({"k": "\udcff"}, {"\ud800": 1}, _nested(5000)):
            with pytest.raises(InvalidCommand, match="params are not JSON"):
                await store.put("lamp", "on", params)
        assert await store.list_queued(10) == []


async def test_a_ttl_python_cannot_hold_as_seconds_is_bad_input(tmp_path: Path) -> None:
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    async with await Store.open(config, drainer=False) as store:
        for ttl in (10**400, -1, float("nan"), float("inf"), True, "5"):
            with pytest.raises(InvalidCommand, match="ttl must be"):
                await store.put("lamp", "on", {}, ttl=ttl)  # type: ignore[arg-type]
        assert await store.list_queued(10) == []


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(device=TEXT, pairs=PAIRS, params_json=st.none() | OBJECTS)
def test_send_through_a_real_store_exits_0_or_2(tmp_path: Path, device: str, pairs: list[str],
                                                params_json: str | None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The whole ``pigateway send`` in this process: exit 0 with a row that reads back, or
    exit 2 with one line; never a traceback."""
    config = gateway.write(tmp_path / "config.toml", gateway.settings(tmp_path, gateway_id="gw"))
    argv = ["send", "--config", str(config), "--device", device or "d", "--command", "on"]
    argv += [arg for pair in pairs for arg in ("--param", pair)]
    argv += [] if params_json is None else ["--params-json", params_json]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: a value that looks like an option
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 0:
        assert _read_back(tmp_path / "queue.db", out.strip())
    elif err.startswith("pigateway: "):
        assert err.count("\n") == 1 and len(err) < 1000


def _read_back(path: Path, command_id: str) -> bool:
    async def read() -> bool:
        config = StoreConfig(path=path, min_free_bytes=0)
        async with await Store.open(config, drainer=False) as store:
            return command_id in [c.id for c in await store.list_queued(10_000)]
    return asyncio.run(read())


# --------------------------------------------------------------------------- control


class _Controls:
    """The smallest real controls: a state, and verbs that change it."""

    def __init__(self) -> None:
        self.state = GatewayState()

    def pause(self) -> None:
        self.state.update(paused=True)

    def resume(self) -> None:
        self.state.update(paused=False)

    def flush(self) -> None:
        """Nothing to send."""


REQUEST_LINES = st.one_of(
    st.binary(max_size=200),
    JSON_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(st.sampled_from(["status", "pause", "resume", "flush", "reboot"]), JSON_TEXT).map(
        lambda t: f'{{"cmd": "{t[0]}", "x": {t[1]}}}'.encode("utf-8", "surrogatepass")),
    JSON_TEXT.map(lambda t: f'{{"cmd": {t}}}'.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(line=REQUEST_LINES)
def test_the_control_parser_answers_everything_without_an_error_log(line: bytes) -> None:
    server = ControlServer(Path("/nonexistent/control.sock"), _Controls(),
                           bounds=dataclasses.replace(control.BOUNDS, request_bytes=1 << 20))
    logger = logging.getLogger("pigateway.control")
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    logger.addHandler(handler)
    try:
        reply = server.handle(line + b"\n")
    finally:
        logger.removeHandler(handler)
    assert set(reply) in ({"ok", "state"}, {"ok", "error"})
    json.dumps(reply).encode()  # the reply can be sent
    assert [r for r in records if r.levelno >= logging.ERROR] == []
    if not reply["ok"]:
        assert len(reply["error"]) < 400
        assert [len(r.getMessage()) < 600 for r in records] == [True]


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --------------------------------------------------------------------------- the inbound side


@pytest.mark.parametrize("device", ["lamp\n1", "lamp\x00", "lamp\x1b[2J", "x" * 100])
async def test_a_command_for_a_device_with_control_characters_is_still_answered(
        tmp_path: Path, device: str) -> None:
    """Results are filed under the command's device; a device the names rule refuses must
    not make the rejection unrecordable (it is filed under the placeholder instead)."""
    from pigateway.inbound import Inbound  # noqa: PLC0415

    config = gateway.config(tmp_path, gateway_id="gw", gpio={"enabled": False},
                            devices={"lamp": {"handler": "log"}})
    message = json.dumps({"v": 1, "id": "c1", "device": device, "name": "on", "params": {}})
    async with await Store.open(config.store) as store, Inbound(config, store) as inbound:
        await inbound.accept(message.encode())
        [result] = [c for c in await store.list_queued(100) if c.kind == "result"]
    assert (result.params["id"], result.params["status"]) == ("c1", "rejected")
    assert inputs.text_problem(result.device) is None
