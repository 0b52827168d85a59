"""Two real brokers for ingest: the gateway's own (local) and the uplink, plus a collector.

The collector subscribes to the uplink broker on a persistent session at QoS 1 (MQTT 5, so
properties arrive) and records every message in arrival order; a publisher sends to the
local broker and counts what the broker accepted (PUBACK received).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness.broker import Mosquitto, mosquitto_binary
from pigateway.mqtt import Connection

V5 = aiomqtt.ProtocolVersion.V5


@dataclass(frozen=True)
class Got:
    """One message as the uplink subscriber got it."""

    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...]
    content_type: str | None
    expiry: int | None


@dataclass
class Collector:
    """Everything that arrived on the uplink broker under ``pattern``, in order."""

    got: list[Got] = field(default_factory=list)

    def payloads(self, topic: str) -> list[bytes]:
        return [g.payload for g in self.got if g.topic == topic]

    def first_order(self, topic: str) -> list[bytes]:
        """Payloads of ``topic`` in the order of their first delivery (duplicates dropped)."""
        seen: set[bytes] = set()
        out = []
        for payload in self.payloads(topic):
            if payload not in seen:
                seen.add(payload)
                out.append(payload)
        return out


def _got(message: aiomqtt.Message) -> Got:
    props = message.properties
    users = tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", []) or [])
    payload = message.payload if isinstance(message.payload, bytes) else str(
        message.payload).encode()
    content = getattr(props, "ContentType", None)
    expiry = getattr(props, "MessageExpiryInterval", None)
    return Got(str(message.topic), payload, bool(message.retain), users,
               None if content is None else str(content), None if expiry is None else int(expiry))


async def _collect_once(broker: Mosquitto, pattern: str, collector: Collector,
                        ready: asyncio.Event, client_id: str) -> None:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    async with aiomqtt.Client(broker.host, broker.port, identifier=client_id, protocol=V5,
                              clean_start=False, properties=properties) as client:
        await client.subscribe(pattern, qos=1)
        ready.set()
        async for message in client.messages:
            collector.got.append(_got(message))


async def _collect(broker: Mosquitto, pattern: str, collector: Collector,
                   ready: asyncio.Event, client_id: str) -> None:
    """Collect forever, reconnecting while the broker is down (bounded by cancellation)."""
    while True:
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            await _collect_once(broker, pattern, collector, ready, client_id)
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def collecting(broker: Mosquitto, pattern: str = "#",
                     client_id: str = "collector") -> AsyncIterator[Collector]:
    collector = Collector()
    ready = asyncio.Event()
    task = asyncio.create_task(_collect(broker, pattern, collector, ready, client_id))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield collector
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def publish(broker: Mosquitto, messages: list[tuple[str, bytes]], *,
                  properties: Properties | None = None, retain: bool = False,
                  window: int = 50) -> int:
    """Publish at QoS 1 (``window`` unacknowledged at once, in order per topic); return how
    many the broker accepted (PUBACK received)."""
    accepted = 0
    async with aiomqtt.Client(broker.host, broker.port, protocol=V5,
                              max_inflight_messages=window) as client:
        client.pending_calls_threshold = window + 10
        for start in range(0, len(messages), window):
            chunk = messages[start:start + window]
            results = await asyncio.gather(
                *(client.publish(t, p, qos=1, retain=retain, properties=properties)
                  for t, p in chunk), return_exceptions=True)
            accepted += sum(1 for r in results if not isinstance(r, BaseException))
    return accepted


def as_us() -> list[str]:
    """mosquitto started as root drops to the user ``mosquitto``, which cannot write its
    persistence file in a test's folder (then a restart loses every session): stay root."""
    return ["user root"] if os.geteuid() == 0 else []


def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    """A local and an uplink mosquitto on free loopback ports, both killed at the end."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    local = Mosquitto(tmp_path / "local", extra=as_us())
    uplink = Mosquitto(tmp_path / "uplink", extra=as_us())
    with local, uplink:
        yield local, uplink


def ingest_settings(local: Mosquitto, **rule: Any) -> dict[str, Any]:
    """``[local]`` on ``local`` with a fast reconnect, and one ``[[ingest]]`` rule."""
    return {"local": {"host": local.host, "port": local.port},
            "ingest": [{"topic": "z2m/+/state", **rule}]}


async def take_acked(client: Connection, got: list[bytes], until: int,
                     timeout: float) -> list[bytes]:
    """Messages from a pigateway connection into ``got``, each acknowledged, until it holds
    ``until`` (a manual-ack session: what is not acknowledged comes again)."""
    async with asyncio.timeout(timeout):
        async for message in client.messages():
            got.append(message.payload)
            client.ack(message)
            if len(got) >= until:
                break
    return got
