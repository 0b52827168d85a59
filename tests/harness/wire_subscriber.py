"""A receiver built only from the wire contract in design.md (it never imports pigateway).

It subscribes to ``{prefix}/{gateway}/#`` on a persistent session (QoS 1), reconnects by
itself when the broker goes away, and decodes every message strictly: a batch or result
that does not fit the contract is recorded in :attr:`WireSubscriber.errors`, never
skipped in silence. Tests read what arrived; ``python tests/harness/wire_subscriber.py --port N
--prefix P --gateway G`` prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

BATCH_KEYS = {"v", "gateway", "batch", "sent_at", "actions"}
ACTION_KEYS = {"device", "commands"}
COMMAND_KEYS = {"id", "name", "params", "queued_at"}
RESULT_KEYS = {"v", "id", "status", "finished_at"}
RESULT_OPTIONAL = {"detail"}
RESULT_STATUSES = {"ok", "error", "rejected", "expired"}


class ContractViolation(ValueError):
    """A message on a gateway topic that does not fit the wire contract."""


@dataclass(frozen=True)
class Received:
    """One command as it arrived inside a batch."""

    batch: str
    device: str
    id: str
    name: str
    params: dict[str, Any]
    queued_at: float


def decode_batch(payload: bytes, gateway: str) -> tuple[dict[str, Any], list[Received]]:
    """Check one actions message against the contract; return it and its commands."""
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractViolation(f"not UTF-8 JSON: {exc}") from exc
    _expect(isinstance(doc, dict) and set(doc) == BATCH_KEYS, f"batch keys {sorted(doc)}")
    _expect(doc["v"] == 1 and doc["gateway"] == gateway, "v must be 1 and gateway ours")
    _expect(isinstance(doc["batch"], str) and doc["batch"] != "", "batch id is a string")
    _expect(_number(doc["sent_at"]), "sent_at is a number")
    _expect(isinstance(doc["actions"], list) and doc["actions"] != [], "actions: a list")
    devices = [action.get("device") for action in doc["actions"] if isinstance(action, dict)]
    _expect(len(devices) == len(set(devices)) == len(doc["actions"]),
            "one action per device per batch")
    commands: list[Received] = []
    for action in doc["actions"]:
        _expect(set(action) == ACTION_KEYS and isinstance(action["device"], str),
                f"action keys {sorted(action)}")
        _expect(isinstance(action["commands"], list) and action["commands"] != [],
                "commands: a non-empty list")
        for command in action["commands"]:
            _expect(isinstance(command, dict) and set(command) == COMMAND_KEYS,
                    f"command keys {sorted(command)}")
            _expect(isinstance(command["params"], dict) and _number(command["queued_at"]),
                    "params is an object, queued_at a number")
            commands.append(Received(doc["batch"], action["device"], command["id"],
                                     command["name"], command["params"], command["queued_at"]))
    return doc, commands


def decode_result(payload: bytes) -> dict[str, Any]:
    doc = json.loads(payload.decode("utf-8"))
    _expect(isinstance(doc, dict) and RESULT_KEYS <= set(doc) <= RESULT_KEYS | RESULT_OPTIONAL,
            f"result keys {sorted(doc)}")
    _expect(doc["v"] == 1 and doc["status"] in RESULT_STATUSES, "v 1 and a known status")
    return dict(doc)


def decode_state(payload: bytes) -> dict[str, Any] | str:
    """``"offline"`` (the will, a JSON string) or the JSON state document."""
    doc = json.loads(payload.decode("utf-8"))
    _expect(doc == "offline" or (isinstance(doc, dict) and doc.get("v") == 1),
            f"state is 'offline' or a v1 document, got {doc!r}")
    return doc  # type: ignore[no-any-return]


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ContractViolation(what)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class WireSubscriber:
    """Everything that arrived on one gateway's topics, decoded per the contract."""

    host: str
    port: int
    prefix: str
    gateway: str
    client_id: str = "wire-subscriber"
    batches: list[dict[str, Any]] = field(default_factory=list)
    commands: list[Received] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    states: list[dict[str, Any] | str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connects: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, retry: float = 0.02) -> None:
        """Stay subscribed (persistent session) until cancelled."""
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(retry)

    async def _session(self) -> None:
        async with aiomqtt.Client(self.host, self.port, identifier=self.client_id,
                                  clean_session=False, keepalive=5) as client:
            await client.subscribe(f"{self.prefix}/{self.gateway}/#", qos=1)
            self.connects += 1
            self.connected.set()
            async for message in client.messages:
                payload = message.payload
                self.take(str(message.topic),
                          payload if isinstance(payload, bytes) else str(payload).encode())

    def take(self, topic: str, payload: bytes) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        try:
            if leaf == "actions":
                doc, commands = decode_batch(payload, self.gateway)
                self.batches.append(doc)
                self.commands.extend(commands)
            elif leaf == "results":
                self.results.append(decode_result(payload))
            elif leaf == "state":
                self.states.append(decode_state(payload))
        except (ContractViolation, ValueError) as exc:
            self.errors.append(f"{topic}: {exc}")
        self.arrived.set()

    def ids(self) -> set[str]:
        return {command.id for command in self.commands}

    def first_deliveries(self) -> list[Received]:
        """Each command's first arrival, in arrival order (redeliveries dropped by id)."""
        seen: set[str] = set()
        first = []
        for command in self.commands:
            if command.id not in seen:
                seen.add(command.id)
                first.append(command)
        return first

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Until ``count`` distinct commands arrived, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.ids()) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.5))
        return True


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default="pigateway")
    parser.add_argument("--gateway", required=True)
    args = parser.parse_args()
    sub = WireSubscriber(args.host, args.port, args.prefix, args.gateway)
    task = asyncio.create_task(sub.run())
    shown = 0
    while not task.done():
        await sub.arrived.wait()
        sub.arrived.clear()
        for doc in sub.batches[shown:]:
            sizes = {a["device"]: len(a["commands"]) for a in doc["actions"]}
            print(f"batch {doc['batch']}: {sizes}", flush=True)
        shown = len(sub.batches)
        for error in sub.errors:
            print(f"CONTRACT VIOLATION {error}", flush=True)
        sub.errors.clear()


if __name__ == "__main__":
    asyncio.run(_main())
