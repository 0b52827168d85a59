"""What the Home Assistant tests share: a gateway config with ``[homeassistant]``, and an
MQTT client standing where Home Assistant stands (it never imports pigateway's MQTT code)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from harness import gateway
from harness.waits import wait_until
from pigateway import config

DISCOVERY = "homeassistant"


def ha_config(tmp_path: Path, port: int, prefix: str, *, ha: dict[str, Any] | None = None,
              **tables: Any) -> config.Config:
    return gateway.config(tmp_path, port=port, prefix=prefix, **ha_tables(ha, **tables))


def ha_tables(ha: dict[str, Any] | None = None, **tables: Any) -> dict[str, Any]:
    """The tables of a test gateway with Home Assistant on (``ha`` over the defaults)."""
    uplink = {"batch_delay": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4,
              "backoff_reset": 1.0, "publish_timeout": 3.0, "state_interval": 2.0,
              **tables.pop("uplink", {})}
    return {"mqtt": {"keepalive": 5}, "uplink": uplink, "gpio": {"enabled": False},
            "inbound": {"enabled": False},
            "homeassistant": {"enabled": True, **(ha or {})}, **tables}


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Watcher:
    """A client on the broker: what arrived under its filters, and a way to publish."""

    client: aiomqtt.Client
    messages: list[Seen] = field(default_factory=list)

    def on(self, topic: str) -> list[Seen]:
        return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> bytes | None:
        mine = self.on(topic)
        return mine[-1].payload if mine else None

    def last_json(self, topic: str) -> Any:
        payload = self.last(topic)
        return None if not payload else json.loads(payload)

    def configs(self) -> dict[str, Any]:
        """The last discovery config per topic (None: removed)."""
        out: dict[str, Any] = {}
        for m in self.messages:
            if m.topic.startswith(f"{DISCOVERY}/") and m.topic.endswith("/config"):
                out[m.topic] = json.loads(m.payload) if m.payload else None
        return out

    async def until(self, check: Any, timeout: float) -> bool:
        """Until ``check()`` is true (True), or ``timeout`` seconds (False)."""
        return await wait_until(lambda: bool(check()), timeout)

    async def publish(self, topic: str, payload: bytes | str, *, retain: bool = False,
                      qos: int = 0) -> None:
        await self.client.publish(topic, payload, qos=qos, retain=retain)


@contextlib.asynccontextmanager
async def watching(port: int, *filters: str, client_id: str = "ha-side") -> AsyncIterator[Watcher]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=client_id) as client:
        watcher = Watcher(client)
        for topic in filters:
            await client.subscribe(topic, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                watcher.messages.append(Seen(str(message.topic), bytes(message.payload),
                                             bool(message.retain)))

        task = asyncio.create_task(collect())
        try:
            yield watcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
