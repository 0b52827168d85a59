"""Shared pieces of the uplink tests: a config for a test broker, a running uplink, waiting
(the config writer, the launcher and the waits are the harness's)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from harness import gateway, service
from harness.gateway import GATEWAY
from harness.waits import until, wait_until  # noqa: F401 -- re-exported: many tests import it from here
from harness.wire_subscriber import WireSubscriber
from pigateway import config
from pigateway.state import GatewayState
from pigateway.store import Store
from pigateway.uplink import OnCommand, Uplink

#: A subscriber kind: the contract-only WireSubscriber or one that records more.
S = TypeVar("S", bound=WireSubscriber)


def make_config(tmp_path: Path, port: int, prefix: str, *, mqtt: dict[str, Any] | None = None,
                store: dict[str, Any] | None = None, **uplink: Any) -> config.Config:
    """A config for a broker on 127.0.0.1:``port`` with short waits (tests never idle)."""
    return gateway.config(
        tmp_path, port=port, prefix=prefix, store=store, mqtt={"keepalive": 5, **(mqtt or {})},
        uplink={"batch_delay": 0.05, "backoff_initial": 0.05, "backoff_max": 0.4,
                "backoff_reset": 1.0, "publish_timeout": 3.0, **uplink},
        gpio={"enabled": False})


@dataclass
class RecordingState(GatewayState):
    """The real state object, keeping every value each field took (for back-pressure checks)."""

    history: dict[str, list[Any]] = field(default_factory=dict, repr=False, compare=False)

    def update(self, **changes: Any) -> bool:
        for name, value in changes.items():
            self.history.setdefault(name, []).append(value)
        return super().update(**changes)


@dataclass
class Running:
    uplink: Uplink
    store: Store
    state: GatewayState
    task: asyncio.Task[None]


@asynccontextmanager
async def running_uplink(cfg: config.Config, *, policy: tenacity.AsyncRetrying | None = None,
                         on_command: OnCommand | None = None,
                         state: GatewayState | None = None) -> AsyncIterator[Running]:
    """An :class:`Uplink` draining a real store, stopped the way the service stops it."""
    async with await Store.open(cfg.store) as store:
        state = state if state is not None else GatewayState()
        uplink = Uplink(cfg, store, state, policy=policy, on_command=on_command)
        task = asyncio.create_task(uplink.run(), name="test-uplink")
        try:
            yield Running(uplink, store, state, task)
        finally:
            await uplink.stop(1.0)
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def subscribed(port: int, prefix: str, client_id: str = "wire-sub", *,
                     kind: type[S] = WireSubscriber) -> AsyncIterator[S]:
    """A contract-only subscriber (``kind``: WireSubscriber or a subclass) with a persistent
    session, connected before it is yielded."""
    sub = kind("127.0.0.1", port, prefix, GATEWAY, client_id=client_id)
    task = asyncio.create_task(sub.run())
    try:
        async with asyncio.timeout(10):
            await sub.connected.wait()
        yield sub
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def drained(store: Store, timeout: float) -> bool:
    """Until the queue is empty (every row acknowledged), or ``timeout`` seconds."""
    async def empty() -> bool:
        return not (await store.stats()).depth
    return await until(empty, timeout, step=0.05)


def per_device_order_holds(sent: list[tuple[str, str]], first_ids: list[str]) -> bool:
    """Whether each device's ids arrived (first deliveries) in the order they were put."""
    position = {command_id: n for n, command_id in enumerate(first_ids)}
    for device in {device for device, _ in sent}:
        mine = [command_id for dev, command_id in sent if dev == device]
        if sorted(mine, key=lambda i: position.get(i, -1)) != mine:
            return False
    return True


def write_service_config(tmp_path: Path, port: int, prefix: str, **uplink: float) -> Path:
    """A TOML config for ``pigateway run`` against 127.0.0.1:``port``, all in ``tmp_path``."""
    return gateway.write(tmp_path / "config.toml", gateway.settings(
        tmp_path, port=port, prefix=prefix, mqtt={"keepalive": 5},
        uplink={"batch_delay": 0.02, "max_batch_bytes": 4096, "max_inflight": 4,
                "backoff_initial": 0.05, "backoff_max": 0.3, "publish_timeout": 3.0, **uplink},
        inbound={"enabled": False}, gpio={"enabled": False}, log={"level": "info"}))


def start_service(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``pigateway run`` as a child process (outside systemd), its output appended to ``log``."""
    return service.spawn(config, log)
