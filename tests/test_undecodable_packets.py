"""One packet, one failure: a message the MQTT library cannot decode fails alone.

mosquitto 2.0 passes a user property or content type holding U+FEFF (MQTT 5 allows it);
paho's decoder refuses it (MalformedPacket). Such a message must be acknowledged and
recorded (a rejected result, or a dead letter keeping its raw bytes, bounded), and the link
goes on: on the uplink's commands topic and on local ingest. Here through a real mosquitto,
published byte by byte by the harness's raw client.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from harness import gateway
from harness import mqttwire as w
from harness.broker import Mosquitto
from harness.hostile import RawClient
from harness.uplink_helpers import RecordingState, drained, running_uplink
from harness.waits import until, wait_until
from pigateway.config import Config, from_dict
from pigateway.inbound import Inbound
from pigateway.ingest import Ingest
from pigateway.state import Link
from pigateway.store import Store
from pigateway.wire import topic

pytestmark = pytest.mark.broker

FEFF = w.user_property("note", "\ufeffhello")


def command(command_id: str) -> bytes:
    return json.dumps({"v": 1, "id": command_id, "device": "lamp", "name": "on",
                       "params": {}}).encode()


def uplink_config(tmp_path: Path, port: int, prefix: str) -> Config:
    return gateway.config(
        tmp_path, gateway_id="gw-test", port=port, prefix=prefix, mqtt={"keepalive": 5},
        uplink={"batch_delay": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4},
        gpio={"enabled": False}, devices={"lamp": {"handler": "log"}})


def links_dropped(state: RecordingState, field: str = "link") -> int:
    """How often the link went from online to offline."""
    history = state.history.get(field, [])
    return sum(1 for a, b in itertools.pairwise(history)
               if a == Link.ONLINE and b != Link.ONLINE)


async def test_a_command_paho_cannot_decode_is_rejected_and_the_link_stays(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    cfg = uplink_config(tmp_path, mosquitto.port, unique_prefix)
    state = RecordingState()
    inbound: list[Inbound] = []

    async def on_command(payload: bytes) -> None:
        await inbound[0].accept(payload)

    async with running_uplink(cfg, on_command=on_command, state=state) as run:
        inbound.append(Inbound(cfg, run.store))
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        where = topic(cfg, "commands")
        async with RawClient(mosquitto.port, "cloud") as cloud:
            assert await cloud.publish(where, command("c-feff"), props=FEFF) == 0
            assert await cloud.publish(where, command("c-after")) == 0

        async def both_there() -> bool:
            return (await run.store.inbox.find("c-feff") is not None
                    and await run.store.inbox.find("c-after") is not None)
        assert await until(both_there, 10), "the command after the undecodable one never came"
        odd = await run.store.inbox.find("c-feff")
        assert odd is not None and odd.status == "rejected"
        assert odd.result is not None and "decode" in odd.result.get("detail", "")
        await run.store.put("lamp", "on")  # the drain goes on too (it stopped: 0 batches)
        assert await drained(run.store, 10), "outbound delivery stopped"
        assert links_dropped(state) == 0
    assert await _redelivered(cfg) == [], "the undecodable message was never acknowledged"


async def _redelivered(cfg: Config, seconds: float = 1.5) -> list[bytes]:
    """What the broker sends to a fresh start of the gateway's session within ``seconds``."""
    again: list[bytes] = []

    async def on_command(payload: bytes) -> None:
        again.append(bytes(payload))

    async with running_uplink(cfg, on_command=on_command) as run:
        assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
        await wait_until(lambda: bool(again), seconds)
    return again


def ingest_config(tmp_path: Path, local: Mosquitto, **rule: Any) -> Config:
    data = gateway.settings(
        tmp_path, gateway_id="gw-test", port=1, prefix="pg", gpio={"enabled": False},
        uplink={"backoff_initial": 0.05, "backoff_max": 0.4},
        local={"host": local.host, "port": local.port})
    data["ingest"] = [{"topic": "dev/#", **rule}]
    return from_dict(data)


@pytest.mark.parametrize("mode", ["forward", "command"])
async def test_an_ingested_message_paho_cannot_decode_is_dead_lettered_and_ingest_goes_on(
        tmp_path: Path, mosquitto: Mosquitto, mode: str) -> None:
    rule = {"mode": mode} if mode == "forward" else {
        "mode": "command", "device": "{2}", "name": "{3}"}
    cfg = ingest_config(tmp_path, mosquitto, **rule)
    state = RecordingState()
    async with await Store.open(cfg.store) as store:
        ingest = Ingest(cfg, store, state)
        task = asyncio.create_task(ingest.run())
        try:
            assert await wait_until(lambda: state.local == Link.ONLINE, 10)
            async with RawClient(mosquitto.port, "device") as device:
                props = w.content_type("\ufefftext/plain") + FEFF
                assert await device.publish("dev/lamp/on", b'{"odd":1}', props=props) == 0
                assert await device.publish("dev/lamp/off", b'{"fine":1}') == 0
            assert await wait_until(lambda: ingest.taken >= 2, 10), \
                f"ingest took {ingest.taken} of 2: it stopped at the undecodable message"
            dead = await store.list_dead()
            assert len(dead) == 1 and "decode" in (dead[0].detail or "")
            assert "odd" in json.dumps(dead[0].command.params)  # its raw bytes, kept
            assert (await store.stats()).depth == 1
            assert links_dropped(state, "local") == 0
        finally:
            await ingest.stop(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

