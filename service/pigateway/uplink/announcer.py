"""The retained state message: what every view shows, for whoever watches the broker.

On connect and every ``uplink.state_interval`` the uplink's connection carries
:func:`pigateway.wire.state_document` of the one state object, retained on
``{prefix}/{gw}/state``; on a clean stop ``"offline"``, said by us (a clean DISCONNECT does
not fire the last will, which says the same when the link dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pigateway import __version__, wire
from pigateway.config import Config
from pigateway.counters import COUNTERS
from pigateway.errors import PacketTooLarge, UplinkError
from pigateway.mqtt import Connection, describe
from pigateway.state import GatewayState
from pigateway.text import bounded
from pigateway.uplink.pacing import Pacer

#: the uplink's own lines in the journal
log = logging.getLogger("pigateway.uplink")


class Announcer:
    """Publishes the state of ``state`` for the gateway of ``config``."""

    def __init__(self, config: Config, state: GatewayState, pacer: Pacer | None = None) -> None:
        self.config = config
        self.state = state
        self.pacer = pacer or Pacer(0, 0)
        self.topic = wire.topic(config, "state")
        #: the state document is not taken now (said once, at warning, until it is again:
        #: an ACL without the state topic refuses it at every state_interval)
        self._failing = False

    def document(self) -> dict[str, Any]:
        """The retained state now; its counters are what ``pigateway_*_total`` show."""
        return wire.state_document(self.config.gateway_id, __version__, self.state.as_dict(),
                                   COUNTERS.as_dict(), time.time())

    async def announce(self, client: Connection) -> bool:
        """The state document, retained; whether the broker took it."""
        return await self._publish(client, wire.encode(self.document()).encode())

    async def keep_announcing(self, client: Connection) -> None:
        while True:
            await asyncio.sleep(self.config.uplink.state_interval)
            await self.announce(client)

    async def say_offline(self, client: Connection) -> None:
        """A clean stop: say "offline" ourselves (a clean DISCONNECT sends no will)."""
        with contextlib.suppress(UplinkError):
            await self._publish(client, wire.OFFLINE)

    async def _publish(self, client: Connection, payload: bytes) -> bool:
        """One state message; one the broker cannot take is left out, never the link's end."""
        await self.pacer.publish_slot(len(payload))  # the state counts against the quota too
        try:
            code = await client.deliver(self.topic, payload, retain=True,
                                        timeout=self.config.uplink.publish_timeout)
        except UplinkError:
            raise  # the link's: it ends and comes back
        except PacketTooLarge as exc:
            return self._failed(f"the state document is not sent: {exc}")
        except Exception as exc:  # one packet, one failure: never the link's
            return self._failed(f"the state document is not sent: {type(exc).__name__}: "
                                f"{bounded(exc, 300)}")
        if code is not None:
            return self._failed(f"the broker refused a message on {self.topic}: "
                                f"{describe(code)}")
        if self._failing:
            self._failing = False
            log.info("uplink: the state document on %s is taken again", self.topic)
        return True

    def _failed(self, what: str) -> bool:
        """Said at warning when the state document stops being taken; its next tries the
        same way at debug, until one is taken (at info)."""
        if self._failing:
            log.debug("uplink: %s", what)
        else:
            self._failing = True
            log.warning("uplink: %s; tried again every %gs, said again once it is taken",
                        what, self.config.uplink.state_interval)
        return False
