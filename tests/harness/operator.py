"""The fleet operator's side of a running gateway service: an MQTT client of its own that
sends commands (``commands``) and management verbs (``manage``), and collects what the
gateway says back (results, actions, its state going online).

Shared by the tests that drive the real service over the broker (inbound commands, remote
management); :func:`operating` ends the service it was given when the test is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiomqtt
import pytest

from harness.service import Service
from harness.waits import wait_until

GATEWAY = "gw1"


class Operator:
    """Publishes commands and verbs to gateway :data:`GATEWAY`; collects its results,
    actions, state messages (``online`` counts those saying the link is up) and anything
    else subscribed to (``other``)."""

    def __init__(self, client: aiomqtt.Client, prefix: str) -> None:
        self.client = client
        self.base = f"{prefix}/{GATEWAY}"
        self.results: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.online = 0
        self.other: list[tuple[str, bytes]] = []

    async def collect(self) -> None:
        async for message in self.client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic == f"{self.base}/results":
                self.results.append(json.loads(payload))
            elif topic == f"{self.base}/actions":
                self.actions.append(json.loads(payload))
            elif topic == f"{self.base}/state":
                with contextlib.suppress(ValueError):
                    state = json.loads(payload)
                    if isinstance(state, dict) and state.get("link") == "online":
                        self.online += 1
            else:
                self.other.append((topic, payload))

    async def send(self, payload: bytes | dict[str, Any]) -> None:
        """A command (or any bytes) on the gateway's ``commands`` topic."""
        await self._publish("commands", payload)

    async def manage(self, payload: bytes | dict[str, Any]) -> None:
        """A management verb (or any bytes) on the gateway's ``manage`` topic."""
        await self._publish("manage", payload)

    async def ask(self, name: str, params: dict[str, Any] | None = None,
                  command_id: str | None = None) -> str:
        """Management verb ``name``; its command id."""
        command_id = command_id or f"{name}-{uuid.uuid4().hex[:8]}"
        await self.manage({"v": 1, "id": command_id, "name": name, "params": params or {}})
        return command_id

    def of(self, command_id: str) -> list[dict[str, Any]]:
        """The results for ``command_id``, in the order they came."""
        return [r for r in self.results if r.get("id") == command_id]

    def by_id(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for document in self.results:
            found.setdefault(document["id"], []).append(document)
        return found

    async def _publish(self, leaf: str, payload: bytes | dict[str, Any]) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(f"{self.base}/{leaf}", data, qos=1)


@contextlib.asynccontextmanager
async def operating(service: Service, port: int, prefix: str, leaves: Sequence[str],
                    also: Sequence[str] = (), *, username: str | None = None,
                    password: str | None = None) -> AsyncIterator[Operator]:
    """An :class:`Operator` on the broker at ``port`` (logged in as ``username`` where the
    broker asks), subscribed (QoS 1) to the gateway's ``leaves`` (``results``, ``state``,
    ...) and the topics ``also``, collecting; at the end it stops collecting and ``service``
    is killed."""
    topics = [*(f"{prefix}/{GATEWAY}/{leaf}" for leaf in leaves), *also]
    try:
        async with aiomqtt.Client("127.0.0.1", port, username=username, password=password,
                                  identifier=f"operator-{uuid.uuid4().hex[:8]}") as client:
            operator = Operator(client, prefix)
            for topic in topics:
                await client.subscribe(topic, qos=1)
            task = asyncio.create_task(operator.collect())
            try:
                yield operator
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        service.kill()


async def until(condition: Callable[[], bool], timeout: float, what: str,
                service: Service) -> None:
    """Wait, bounded in time, for ``condition``; fail with the service's log tail."""
    if not await wait_until(condition, timeout):
        pytest.fail(f"timed out waiting for {what}; service log:\n{service.tail(6000)}")
