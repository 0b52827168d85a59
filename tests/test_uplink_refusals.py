"""MQTT 5 PUBACK refusals, through an MQTT-aware proxy in front of a real mosquitto.

mosquitto never answers with quota exceeded, server busy and most other refusals, so
:class:`mqttproxy.RefusingProxy` answers the publishes a test picks with the code it picks
(and does not deliver them, as a refusing broker would not). Transient codes must lose
nothing, dead-letter nothing and keep each device's order; permanent ones dead-letter
exactly the refused batch, with its code and name; 0x10 means delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Mosquitto
from harness.mqttproxy import Decide, RefusingProxy
from harness.uplink_helpers import (
    RecordingState,
    drained,
    make_config,
    per_device_order_holds,
    running_uplink,
    subscribed,
    wait_until,
)
from pigateway.mqtt import PUBACK_REFUSALS
from pigateway.state import Link
from pigateway.store import NewCommand

pytestmark = pytest.mark.broker

TRANSIENT = [0x80, 0x83, 0x89, 0x96, 0x97]
PERMANENT = [0x87, 0x90, 0x95, 0x99]


def batch_ids(payload: bytes) -> list[str]:
    """The command ids in a batch, from the wire contract alone."""
    document = json.loads(payload)
    return [command["id"] for action in document["actions"] for command in action["commands"]]


def commands(count: int, devices: int = 4) -> list[NewCommand]:
    return [NewCommand(f"dev{n % devices}", "set", {"n": n, "pad": "p" * 60})
            for n in range(count)]


@asynccontextmanager
async def refusing(port: int, decide: Decide, *,
                   disconnect: bool = False) -> AsyncIterator[RefusingProxy]:
    proxy = await RefusingProxy(port, decide, disconnect=disconnect).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def on_actions(decide: Decide) -> Decide:
    """Only batches are refused; the state document always goes through."""
    def on(connection: int, where: str, payload: bytes) -> int | None:
        return decide(connection, where, payload) if where.endswith("/actions") else None
    return on


def test_the_table_names_every_code_the_issue_lists() -> None:
    for code in TRANSIENT:
        assert PUBACK_REFUSALS[code][1] == "retry"
    for code in PERMANENT:
        assert PUBACK_REFUSALS[code][1] == "dead-letter"


@pytest.mark.parametrize("code", TRANSIENT)
async def test_a_transient_refusal_loses_nothing_and_keeps_order(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, code: int) -> None:
    seen: dict[int, int] = {}

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        """The first two connections: two batches through, then the broker says "not now"."""
        seen[connection] = seen.get(connection, 0) + 1
        return code if connection <= 2 and seen[connection] > 2 else None

    total = 60
    async with refusing(mosquitto.port, on_actions(decide)) as proxy, \
            subscribed(mosquitto.port, unique_prefix) as sub:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=1024,
                          max_inflight=4)
        state = RecordingState()
        async with running_uplink(cfg, state=state) as run:
            sent = [(c.device, c.id) for c in await run.store.put_many(commands(total))]
            assert await sub.wait_for(total, 20)
            assert await drained(run.store, 10)
            stats = await run.store.stats()
    assert proxy.refused and {r.code for r in proxy.refused} == {code}
    assert proxy.connections >= 3  # the link ended at each refusal and came back
    assert stats.dead_total == 0 and stats.in_flight == 0
    assert {command_id for _, command_id in sent} <= sub.ids()
    assert per_device_order_holds(sent, [c.id for c in sub.first_deliveries()])
    name = PUBACK_REFUSALS[code][0]
    assert any(name in (error or "") for error in state.history.get("last_error", []))


@pytest.mark.parametrize("code", [0x96, 0x89])
async def test_a_disconnect_to_slow_down_loses_nothing_and_the_backoff_grows(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, code: int) -> None:
    """DISCONNECT 0x96 (message rate too high) / 0x89 (server busy) on five links in a row:
    nothing lost or dead, each device in order, the waits between links grow while the
    refusals continue, and last_error names the code."""
    seen: dict[int, int] = {}
    refusing_links = 5

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        seen[connection] = seen.get(connection, 0) + 1
        return code if connection <= refusing_links and seen[connection] > 1 else None

    total = 40
    async with refusing(mosquitto.port, on_actions(decide), disconnect=True) as proxy, \
            subscribed(mosquitto.port, unique_prefix) as sub:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=1024,
                          max_inflight=1, backoff_initial=0.1, backoff_max=3.2,
                          backoff_reset=5.0)
        state = RecordingState()
        async with running_uplink(cfg, state=state) as run:
            sent = [(c.device, c.id) for c in await run.store.put_many(commands(total))]
            assert await sub.wait_for(total, 30)
            assert await drained(run.store, 10)
            stats = await run.store.stats()
    assert len(proxy.refused) == refusing_links
    assert stats.dead_total == 0
    assert per_device_order_holds(sent, [c.id for c in sub.first_deliveries()])
    starts = proxy.connected_at[:refusing_links + 1]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert gaps[-1] > 4 * gaps[0]
    name = "message rate too high" if code == 0x96 else "server busy"
    assert any(name in (error or "") for error in state.history.get("last_error", []))


async def test_a_transient_refusal_counts_attempts_up_to_max_attempts(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """Refused for now, for ever: the attempts are counted, and max_attempts bounds them."""
    def decide(connection: int, where: str, payload: bytes) -> int | None:
        return 0x97 if b'"device":"stuck"' in payload else None

    async with refusing(mosquitto.port, on_actions(decide)) as proxy:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, store={"max_attempts": 3})
        async with running_uplink(cfg) as run:
            await run.store.put("stuck", "on")
            assert await drained(run.store, 20)
            dead = await run.store.list_dead()
    assert [d.reason for d in dead] == ["max-attempts"]
    assert dead[0].command.attempts == 3
    assert "quota exceeded" in (dead[0].detail or "")
    assert len(proxy.refused) == 3


@pytest.mark.parametrize("code", PERMANENT)
async def test_a_permanent_refusal_buries_exactly_the_refused_command(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, code: int) -> None:
    """The whole batch is refused for one bad command: it is split down to that command,
    which alone is dead-lettered with the code; every other command is delivered."""
    def decide(connection: int, where: str, payload: bytes) -> int | None:
        return code if b'"device":"vault"' in payload else None

    async with refusing(mosquitto.port, on_actions(decide)) as proxy, \
            subscribed(mosquitto.port, unique_prefix) as sub:
        # about one batch's worth: it goes as one message, the vault's command among others
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=4096)
        async with running_uplink(cfg) as run:
            put = await run.store.put_many(
                [*commands(12), NewCommand("vault", "open"), *commands(12)])
            assert await drained(run.store, 20)
            dead = await run.store.list_dead(100)
            assert run.state.link == Link.ONLINE
    vault = next(c.id for c in put if c.device == "vault")
    assert proxy.connections == 1  # the link stayed up
    assert len(batch_ids(proxy.refused[0].payload)) > 1  # a batch of several was refused
    assert batch_ids(proxy.refused[-1].payload) == [vault]  # ... and split down to the one
    assert len(proxy.refused) <= 2 * len(batch_ids(proxy.refused[0].payload)).bit_length()
    assert [d.command.id for d in dead] == [vault]
    assert {d.reason for d in dead} == {"rejected-by-broker"}
    name = PUBACK_REFUSALS[code][0]
    assert f"0x{code:02X}" in (dead[0].detail or "") and name in (dead[0].detail or "")
    others = {c.id for c in put} - {vault}
    assert await wait_until(lambda: others <= sub.ids(), 10)


async def test_later_commands_of_a_device_refused_for_good_are_delivered_in_order(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """The documented choice: a command refused for good is dead-lettered alone; the
    device's commands before and after it are delivered, in the order they were put."""
    def decide(connection: int, where: str, payload: bytes) -> int | None:
        return 0x99 if b'"poison"' in payload else None

    batch = [NewCommand("lamp", "set", {"n": n, "pad": "p" * 40}) for n in range(10)]
    batch[4] = NewCommand("lamp", "set", {"n": 4, "poison": True})
    async with refusing(mosquitto.port, on_actions(decide)) as proxy, \
            subscribed(mosquitto.port, unique_prefix) as sub:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_batch_bytes=4096,
                          max_inflight=1, batch_delay=0.5)
        async with running_uplink(cfg) as run:
            put = await run.store.put_many(batch)
            assert await drained(run.store, 20)
            dead = await run.store.list_dead(100)
    assert [d.command.id for d in dead] == [put[4].id]
    assert len(batch_ids(proxy.refused[0].payload)) == 10  # they had travelled together
    wanted = [c.id for c in put if c.id != put[4].id]
    assert await wait_until(lambda: set(wanted) <= sub.ids(), 10)
    assert [i for i in (c.id for c in sub.first_deliveries()) if i in wanted] == wanted


async def test_no_matching_subscribers_is_delivered(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """0x10 is a success code: the rows are deleted, nothing is dead or sent again."""
    answered: list[Any] = []

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        answered.append(payload)
        return 0x10

    async with refusing(mosquitto.port, on_actions(decide)) as proxy:
        cfg = make_config(tmp_path, proxy.port, unique_prefix)
        async with running_uplink(cfg) as run:
            await run.store.put_many(commands(5))
            assert await drained(run.store, 10)
            stats = await run.store.stats()
    assert stats.dead_total == 0
    assert len(answered) == len(proxy.refused) >= 1 and proxy.connections == 1
    assert sum(len(batch_ids(p)) for p in answered) == 5  # each command went once


async def test_a_state_document_the_broker_refuses_is_one_warning_not_one_per_interval(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """An ACL without the state topic refuses the state document at every
    ``uplink.state_interval`` for as long as the gateway runs: a warning each time (2,880 a
    day at the default 30 s). One warning while it lasts, one info line once it is taken."""
    refusing_now = [True]

    def decide(connection: int, where: str, payload: bytes) -> int | None:
        return 0x87 if where.endswith("/state") and refusing_now[0] else None

    caplog.set_level(logging.INFO)
    async with refusing(mosquitto.port, decide) as proxy:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, state_interval=1.0)
        async with running_uplink(cfg) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            assert await wait_until(lambda: len(proxy.refused) >= 4, 10)
            refusing_now[0] = False
            taken = len(proxy.refused)
            await asyncio.sleep(1.5)  # the next state document goes through
            assert len(proxy.refused) == taken
    said = [r for r in caplog.records if r.name == "pigateway.uplink"
            and r.levelno >= logging.WARNING and "/state" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert any(r.levelno == logging.INFO and "taken again" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records][-5:]
