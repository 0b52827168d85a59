"""A publisher to a local broker (zigbee2mqtt's, the gateway's own) for the ``mqtt`` handler."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pigateway.errors import UplinkError
from pigateway.mqtt.client import Connection, Settings, connect
from pigateway.mqtt.codes import describe
from pigateway.mqtt.forwarded import ORIGIN_PROPERTY, Extras


class LocalPublisher:
    """Publishes to a local broker (e.g. zigbee2mqtt's) for the ``mqtt`` device handler."""

    def __init__(self, connection: Connection, timeout: float,
                 extras: Extras | None = None) -> None:
        self._connection = connection
        self._timeout = timeout
        self._extras = extras

    async def publish(self, topic: str, payload: bytes, qos: int = 1,
                      retain: bool = False) -> None:
        """Return after the PUBACK (QoS 1); raise :class:`UplinkError` on any failure."""
        try:
            code = await self._connection.deliver(topic, payload, qos=qos, retain=retain,
                                                  timeout=self._timeout, extras=self._extras)
        except UplinkError as exc:
            raise UplinkError(f"local broker: publish to {topic!r} failed: {exc}") from exc
        if code is not None:
            raise UplinkError(f"local broker refused the message on {topic!r}: "
                              f"{describe(code)}")


@asynccontextmanager
async def local_publisher(host: str, port: int, *, username: str | None = None,
                          password: str | None = None, client_id: str | None = None,
                          timeout: float = 10.0, origin: str | None = None
                          ) -> AsyncIterator[LocalPublisher]:
    """A connection to a local broker (MQTT 3.1.1, which every local broker speaks).

    With ``origin`` (the gateway id) it speaks MQTT 5 and marks each message with the user
    property ``pigateway-origin``: :mod:`pigateway.ingest` never takes those back in.
    """
    settings = Settings(host, port, client_id=client_id, username=username, password=password,
                        timeout=timeout, protocol="3.1.1" if origin is None else "5")
    extras = None if origin is None else Extras(user_properties=((ORIGIN_PROPERTY, origin),))
    stack = contextlib.AsyncExitStack()
    try:
        connection = await stack.enter_async_context(
            connect(settings, bound=timeout, leave_bound=timeout))
    except UplinkError as exc:
        raise UplinkError(f"local broker {host}:{port}: {exc}") from exc
    async with stack:
        yield LocalPublisher(connection, timeout, extras)

