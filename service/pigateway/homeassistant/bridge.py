"""The gateway as a Home Assistant device: discovery, state and commands over MQTT.

``[homeassistant]`` (docs/homeassistant.md). A link of its own (client id
``{gateway_id}-homeassistant``) to the broker HA listens to: the uplink's (``link =
"uplink"``) or the gateway's own (``"local"``). Its own connection, task and pacing: a slow
or absent HA broker never blocks or delays the drain, and the drain never delays HA.

- **Discovery** (:mod:`~pigateway.homeassistant.discovery`) is published retained at every
  connect and again when HA says ``online`` on ``{discovery_prefix}/status`` (a restarted HA
  has lost what it was told); such requests are coalesced, one republish per
  :data:`ANNOUNCE_GAP`. Which topics were announced is kept beside the queue
  (:data:`MARKER`), so a later run with ``enabled = false`` removes them (empty retained
  payloads), and a run that announces fewer entities removes the rest.
- **State**: the flat state document, retained, when the state object changes (at most one
  per :data:`STATE_GAP` seconds) and every ``uplink.state_interval``.
- **Commands** from HA (the paused switch, the flush and requeue-dead buttons) act through
  the control socket's own verbs (:data:`pigateway.listeners.control.VERBS`) and the store's
  ``requeue_dead`` (``pigateway queue requeue-dead``'s). Anyone who may publish on the
  broker may publish there: a message is taken only on one of our command topics, at most
  :data:`MAX_COMMAND_BYTES` bytes, one of the payloads its entity takes, not retained, and
  within :data:`COMMAND_RATE` per second; anything else is that message's failure, said
  once a minute, never the link's or the service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, Protocol

from pigateway import __version__, wire
from pigateway.aio import reconnecting, wait_backoff
from pigateway.config import Config
from pigateway.counters import COUNTERS
from pigateway.errors import PigatewayError
from pigateway.homeassistant import discovery as hadiscovery
from pigateway.homeassistant.discovery import Entity, Topics
from pigateway.inputs import shown
from pigateway.listeners import Throttled, control
from pigateway.mqtt import Connection, Message, Settings, Will, connect, describe
from pigateway.mqtt.credentials import broker_password, local_password, tls_context
from pigateway.state import GatewayState
from pigateway.text import bounded

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.homeassistant")

#: Bytes of a command payload at most ("ON", "OFF", "PRESS" and some blanks).
MAX_COMMAND_BYTES: Final = 16
#: Commands taken per second on average, and at once (a token bucket); the rest are dropped.
COMMAND_RATE: Final = 2.0
COMMAND_BURST: Final = 5
#: Seconds between two state messages at least (the state changes twice a second at most).
STATE_GAP: Final = 1.0
#: Seconds between two discovery republishes at least, however often HA says "online".
ANNOUNCE_GAP: Final = 5.0
#: Seconds a publish may wait for its PUBACK.
PUBLISH_TIMEOUT: Final = 10.0
#: The file beside the queue that remembers what was announced, and where.
MARKER: Final = "homeassistant.json"
#: Topics a marker may name at most (ours are fewer; a bigger file is not ours).
MAX_MARKER_TOPICS: Final = 64
#: Where a Raspberry Pi says what it is (the device's model in HA).
DEVICE_MODEL: Final = Path("/proc/device-tree/model")


class Controls(Protocol):
    """What HA may do to the service (the control socket's verbs, and requeue-dead)."""

    state: GatewayState

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def flush(self) -> None: ...

    async def requeue_dead(self) -> int: ...


class Bucket:
    """A token bucket: ``rate`` a second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def model() -> str:
    """The board's model (a Pi's device tree), else "pigateway"."""
    try:
        with DEVICE_MODEL.open("rb") as file:
            text = file.read(128).rstrip(b"\x00\n").decode("ascii", "replace")
    except OSError:
        return "pigateway"
    return bounded(text, 64) or "pigateway"


def marker_path(config: Config) -> Path:
    return config.store.path.parent / MARKER


def read_marker(path: Path) -> list[str]:
    """The topics an earlier run announced (none when there is no marker, or it is not
    ours: a warning, never a failure of the service)."""
    try:
        data = json.loads(path.read_bytes()[:64 * 1024])
        topics = data["topics"]
        if not (isinstance(topics, list) and len(topics) <= MAX_MARKER_TOPICS
                and all(isinstance(t, str) and 0 < len(t) <= 512 for t in topics)):
            raise ValueError("topics is not a short list of topics")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("homeassistant: %s is not a list of announced topics (%s); nothing is "
                    "removed from Home Assistant by it", path, shown(str(exc)))
        return []
    return topics


def write_marker(path: Path, topics: list[str]) -> None:
    """Remember the announced topics (atomically: a crash leaves the old file or the new)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps({"topics": topics}) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("homeassistant: cannot remember the announced topics in %s (%s): a "
                    "later enabled = false cannot remove them from Home Assistant", path, exc)


class HomeAssistant:
    """The Home Assistant link of one gateway: :meth:`run` until :meth:`stop`."""

    def __init__(self, config: Config, controls: Controls) -> None:
        self.config = config
        self.controls = controls
        self.state = controls.state
        self.topics = Topics(config)
        self.entities = hadiscovery.announced(config)
        self.model = model()
        self.marker = marker_path(config)
        self.bucket = Bucket(COMMAND_RATE, COMMAND_BURST)
        self.refused = Throttled(log, "homeassistant: a message on %s is not taken: %s")
        self._failures = Throttled(log, "homeassistant: the link to the broker failed: %s")
        self._announce = asyncio.Event()
        self._stopping = asyncio.Event()
        self._requeue: asyncio.Task[None] | None = None
        self._disk_free: int | None = None
        self._wait = wait_backoff(config.uplink.backoff_initial, config.uplink.backoff_max)
        #: when the latest link got its CONNACK (``time.monotonic()``; the backoff's reset)
        self._up_since: float | None = None
        #: the broker refuses our messages now (an ACL without our topics refuses every
        #: entity's discovery and every state refresh): said once, until one is taken
        self._publish_refused = False

    @property
    def enabled(self) -> bool:
        return self.config.homeassistant.enabled

    @property
    def retiring(self) -> bool:
        """Disabled, with topics an earlier run announced still to remove."""
        return not self.enabled and bool(read_marker(self.marker))

    # ---- lifetime

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff, until :meth:`stop`. Never raises for the
        link's sake: HA is a view, the drain does not depend on it."""
        await reconnecting(self._connect_once, stop=self._stopping, backoff=self._wait,
                           reset=self.config.uplink.backoff_reset,
                           up_since=lambda: self._up_since)

    async def _connect_once(self) -> bool:
        """One connection, served until it ends; True once the topics are retired."""
        try:
            async with connect(self._settings(), bound=15.0, leave_bound=5.0) as client:
                self._up_since = time.monotonic()
                if not self.enabled:
                    await self._retire(client)
                    return True
                await self._serve(client)
        except (PigatewayError, OSError) as exc:
            self._failures.note(exc)
        except Exception as exc:  # a bug here must not stop the drain: said, and retried
            self._failures.note(repr(exc), exc=exc)
        return False

    def stop(self) -> None:
        """Say ``offline`` (a clean DISCONNECT fires no will) and end :meth:`run`."""
        self._stopping.set()

    def _settings(self) -> Settings:
        """The broker HA listens to, as the uplink or ingest reach it."""
        will = Will(self.topics.availability, hadiscovery.OFFLINE, retain=True)
        client_id = f"{self.config.gateway_id}-homeassistant"
        if self.config.homeassistant.link == "uplink":
            mqtt = self.config.mqtt
            return Settings(mqtt.host, mqtt.port, client_id=client_id, username=mqtt.username,
                            password=broker_password(mqtt) if mqtt.username else None,
                            protocol="5" if mqtt.protocol == "5" else "3.1.1", will=will,
                            keepalive=mqtt.keepalive, timeout=PUBLISH_TIMEOUT,
                            tls=tls_context(mqtt.tls))
        local = self.config.local
        return Settings(local.host, local.port, client_id=client_id, username=local.username,
                        password=local_password(local),
                        protocol="5" if local.protocol == "5" else "3.1.1", will=will,
                        keepalive=local.keepalive, timeout=PUBLISH_TIMEOUT,
                        tls=tls_context(local.tls))

    # ---- one connection

    async def _serve(self, client: Connection) -> None:
        await client.subscribe(self.topics.status, qos=1)
        await client.subscribe(self.topics.commands, qos=0)  # a flood is the broker's to drop
        await self._publish(client, self.topics.availability, hadiscovery.ONLINE)
        self._announce.set()
        log.info("homeassistant: connected; announcing %d entities under %s/",
                 len(self.entities), self.topics.prefix)
        parts = [asyncio.ensure_future(part) for part in (
            self._announcing(client), self._reporting(client), self._listening(client),
            self._stopping.wait())]
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)
        for part in done:
            if not part.cancelled() and part.exception() is not None:
                raise part.exception()  # type: ignore[misc]
        if self._stopping.is_set():
            with contextlib.suppress(PigatewayError):
                await self._publish(client, self.topics.availability, hadiscovery.OFFLINE)

    async def _publish(self, client: Connection, topic: str, payload: bytes) -> None:
        """One retained message; one the broker refuses is said, never the link's end."""
        code = await client.deliver(topic, payload, retain=True, timeout=PUBLISH_TIMEOUT)
        if code is None:
            if self._publish_refused:
                self._publish_refused = False
                log.info("homeassistant: the broker takes our messages again (%s)", topic)
        elif self._publish_refused:
            log.debug("homeassistant: the broker refused a message on %s: %s", topic,
                      describe(code))
        else:
            self._publish_refused = True
            log.warning("homeassistant: the broker refused a message on %s: %s; its further "
                        "refusals are not said until it takes one again (its ACL?)", topic,
                        describe(code))

    async def _announcing(self, client: Connection) -> None:
        """Discovery now, and again when HA asks, one republish per ANNOUNCE_GAP at most."""
        while True:
            await self._announce.wait()
            self._announce.clear()
            await self._announce_all(client)
            await asyncio.sleep(ANNOUNCE_GAP)

    async def _announce_all(self, client: Connection) -> None:
        """Every entity's config; then the ones an earlier run announced and this one does
        not are removed. Remembered before it is published: a stop in between forgets none."""
        ours = [self.topics.discovery(entity) for entity in self.entities]
        before = await asyncio.to_thread(read_marker, self.marker)
        if not set(ours) <= set(before):
            await asyncio.to_thread(write_marker, self.marker, [*before, *(
                topic for topic in ours if topic not in before)])
        for entity, topic in zip(self.entities, ours, strict=True):
            document = hadiscovery.discovery_document(self.config, entity, self.topics,
                                                      __version__, self.model)
            await self._publish(client, topic, wire.encode(document).encode())
        stale = [topic for topic in before if topic not in ours]
        for topic in stale:
            await self._publish(client, topic, b"")
        if stale:
            await asyncio.to_thread(write_marker, self.marker, ours)
        await self._publish(client, self.topics.state, self._state_payload())

    async def _reporting(self, client: Connection) -> None:
        """The state on every change (one per STATE_GAP at most), and every state_interval."""
        interval = self.config.uplink.state_interval
        last: bytes | None = None
        refreshed = 0.0
        while True:
            if time.monotonic() - refreshed >= interval:
                self._disk_free = await asyncio.to_thread(self._read_disk_free)
                refreshed, last = time.monotonic(), None
            seen = self.state.version  # a change while this one is published is not missed
            payload = self._state_payload()
            if payload != last:
                await self._publish(client, self.topics.state, payload)
                last = payload
            await asyncio.sleep(STATE_GAP)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.changed(since=seen), interval)

    def _state_payload(self) -> bytes:
        document = hadiscovery.state_document(self.state.as_dict(), COUNTERS.as_dict(),
                                              version=__version__, disk_free=self._disk_free)
        return wire.encode(document).encode()

    def _read_disk_free(self) -> int | None:
        try:
            stat = os.statvfs(self.config.store.path.parent)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    # ---- what HA (or anyone on the broker) sends

    async def _listening(self, client: Connection) -> None:
        async for message in client.messages():
            try:
                self.take(message)
            except Exception as exc:  # one message's failure, never the link's
                self.refused.note(shown(message.topic), f"failed: {exc!r}", exc=exc)

    def take(self, message: Message) -> None:
        """One inbound message: HA's status, or a command, or refused."""
        topic, payload = message.topic, message.payload
        if not isinstance(payload, bytes) or len(payload) > MAX_COMMAND_BYTES:
            self.refused.note(shown(topic), f"not a payload of at most {MAX_COMMAND_BYTES} "
                                            "bytes")
            return
        if topic == self.topics.status:
            if payload.strip() == hadiscovery.ONLINE:
                self._announce.set()  # coalesced: at most one republish per ANNOUNCE_GAP
            return
        entity = self.topics.entity_of(topic)
        if entity is None:
            self.refused.note(shown(topic), "not a command topic of this gateway")
            return
        if message.extras.retain:
            self.refused.note(shown(topic), "a retained command (it would act again at "
                                            "every reconnect)")
            return
        word = payload.strip().decode("ascii", "replace").upper()
        if word not in entity.commands:
            self.refused.note(shown(topic), f"{shown(payload)} is not one of "
                                            f"{sorted(entity.commands)}")
            return
        if not self.bucket.take():
            self.refused.note(shown(topic), f"more than {COMMAND_RATE:g} commands a second")
            return
        self._act(entity, word)

    def _act(self, entity: Entity, word: str) -> None:
        verb = {("paused", "ON"): "pause", ("paused", "OFF"): "resume",
                ("flush", "PRESS"): "flush"}.get((entity.key, word))
        log.info("homeassistant: %s %s", entity.key, word)
        if verb is not None:
            action = control.VERBS[verb]
            assert action is not None
            action(self.controls)
        elif entity.key == "requeue_dead":
            self._start_requeue()

    def _start_requeue(self) -> None:
        """Requeue every dead letter (but the expired) once; a press while one runs is one."""
        if self._requeue is not None and not self._requeue.done():
            self.refused.note("requeue_dead", "a requeue is already running")
            return
        self._requeue = asyncio.get_running_loop().create_task(
            _logged(self.controls.requeue_dead, "requeue dead letters"))

    # ---- enabled = false

    async def _retire(self, client: Connection) -> None:
        """Remove what an earlier run announced (empty retained messages), then the marker."""
        topics = await asyncio.to_thread(read_marker, self.marker)
        for topic in [*topics, self.topics.state, self.topics.availability]:
            await self._publish(client, topic, b"")
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()
        log.info("homeassistant: disabled; removed %d entities from Home Assistant",
                 len(topics))


async def _logged(call: Callable[[], Awaitable[int]], what: str) -> None:
    try:
        count = await call()
    except PigatewayError as exc:
        log.warning("homeassistant: %s failed: %s", what, exc)
    else:
        log.info("homeassistant: %s: %d", what, count)


__all__ = ["Controls", "HomeAssistant", "marker_path", "read_marker"]
