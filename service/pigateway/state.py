"""The one observable state of a running gateway.

LEDs, systemd's ``STATUS=`` line, the retained state message, the control socket and
``pigateway status`` all read this object; nothing computes its own copy. Writers call
:meth:`GatewayState.update`, readers await :meth:`GatewayState.changed`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field, fields
from typing import Any


class Link(enum.StrEnum):
    """Where the MQTT uplink stands."""

    OFFLINE = "offline"
    CONNECTING = "connecting"
    ONLINE = "online"


@dataclass
class GatewayState:
    """What the gateway is doing now. Mutate only through :meth:`update`."""

    link: Link = Link.OFFLINE
    paused: bool = False
    draining: bool = False
    depth: int = 0
    oldest_age: float | None = None
    in_flight: int = 0
    dead_letters: int = 0
    last_error: str | None = None
    fault: str | None = None
    retry_at: float | None = None
    link_since: float = field(default_factory=time.time)
    started_at: float = field(default_factory=time.time)
    version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def update(self, **changes: Any) -> bool:
        """Set fields; wake the readers when anything really changed. Returns whether it did."""
        dirty = False
        for name, value in changes.items():
            if name.startswith("_") or not hasattr(self, name):
                raise AttributeError(f"GatewayState has no field {name!r}")
            if getattr(self, name) != value:
                setattr(self, name, value)
                dirty = True
                if name == "link":
                    self.link_since = time.time()
        if dirty:
            self.version += 1
            self._changed.set()
        return dirty

    async def changed(self, since: int | None = None) -> int:
        """Wait for a change; return the new :attr:`version`.

        With ``since`` (a version the reader has already shown), return at once when a
        change happened meanwhile, so a reader that was busy misses nothing.
        """
        while since is None or self.version <= since:
            self._changed.clear()
            await self._changed.wait()
            since = since if since is not None else self.version - 1
        return self.version

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready snapshot (for the control socket, the retained message, the CLI)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        data["link"] = str(self.link)
        data["retry_in"] = (
            max(0.0, round(self.retry_at - time.time(), 1)) if self.retry_at is not None else None
        )
        data["uptime"] = round(time.time() - self.started_at, 1)
        return data
