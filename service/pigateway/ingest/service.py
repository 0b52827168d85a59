"""Ingest: the gateway's own MQTT broker into the durable queue, acknowledged after commit.

Devices and automations (zigbee2mqtt, Tasmota, Node-RED...) publish to the broker on the
gateway. For every ``[[ingest]]`` rule this module subscribes there, on one connection with
a persistent session (clean start off, ``local.session_expiry``) and manual acks, and turns
each message into a queue row:

- ``forward``: the message whole (:mod:`pigateway.mqtt.forwarded`), published by the uplink on
  ``remote_topic`` as it came (payload bytes, retain, MQTT 5 content type, user properties,
  expiry as its TTL), one message each, in order per local topic;
- ``command``: a command like ``pigateway send`` makes (device and name from topic levels,
  params from the JSON object payload); anything else is dead-lettered ``invalid``.

The local PUBACK goes out only after the row is committed: messages taken together share
one commit (group commit, up to ``local.window``), and are acknowledged in the order they
came. A crash between commit and PUBACK means the broker sends the message again: at least
once. When the queue refuses (full under ``reject``, the disk under ``store.min_free_bytes``)
nothing is acknowledged and nothing more is read: the local broker keeps the messages in
ingest's session (its own limits apply) and ingest tries again with capped backoff, by
itself. Messages pigateway itself published to the local broker (the ``mqtt`` handler)
carry the user property ``pigateway-origin`` and are never taken back in (no loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pigateway.aio import cancel_and_wait, first_of, reconnecting, wait_backoff
from pigateway.config import LEVEL_TEMPLATE, MODE_FORWARDS, Config, IngestRule
from pigateway.errors import (
    InvalidCommand,
    LinkFault,
    LoginRefused,
    QueueFull,
    StoreCorrupt,
    StoreError,
    UplinkError,
)
from pigateway.inputs import topic_problem
from pigateway.mqtt import Connection, Message, Settings, connect, forwarded, packet_limit
from pigateway.mqtt.credentials import local_password, tls_context
from pigateway.mqtt.packets import Undecodable
from pigateway.mqtt.topics import topic_matches
from pigateway.state import GatewayState, Link, Refusal, Refuser
from pigateway.store import NewCommand, Store, prepare
from pigateway.store.values import MAX_NAME, check_name
from pigateway.text import bounded, json_kind, plural
from pigateway.wire import profiles

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.ingest")

#: The reason of an ingested message that cannot be a command.
INVALID: Final = "invalid"
#: Backoff while the store refuses (full, disk full, busy): nothing acknowledged meanwhile.
REFUSED_BACKOFF: Final = wait_backoff(0.1, 2.0, jitter=0.1)
#: Bytes of a bad payload kept in its dead letter, at most.
KEPT_PAYLOAD: Final = 2048
#: Tries at cutting a dead letter's kept payload down to ``store.max_params_bytes``.
FIT_TRIES: Final = 16
#: Seconds a clean stop waits for taken messages to be committed and acknowledged.
STOP_GRACE: Final = 2.0
#: Local topics whose :class:`Route` is kept at most, and the longest topic kept (the
#: memory a burst of distinct topics can take stays under ~4 MiB).
ROUTES_KEPT: Final = 4096
ROUTE_TOPIC_KEPT: Final = 512
#: Messages classified between two turns of the event loop (the uplink's PUBACKs are read
#: meanwhile: a group of a whole window classified in one go held them ~25 ms here).
CLASSIFY_SLICE: Final = 64


def remote_topic(config: Config, rule: IngestRule, topic: str) -> str:
    """The uplink topic of a message that came on local ``topic``."""
    return rule.remote_topic.format(prefix=config.mqtt.topic_prefix, gateway=config.gateway_id,
                                    topic=topic)


def _level(template: str, topic: str) -> str | None:
    match = LEVEL_TEMPLATE.match(template)
    levels = topic.split("/")
    if match is None or int(match.group(1)) > len(levels):
        return None
    return levels[int(match.group(1)) - 1] or None


@dataclass(frozen=True)
class Taken:
    """What one message becomes: a row to queue, or a dead letter with its reason."""

    item: NewCommand
    refusal: str | None = None


def _kept_payload(payload: bytes) -> dict[str, Any]:
    text = payload[:KEPT_PAYLOAD].decode("utf-8", errors="replace")
    return {"payload": text, "bytes": len(payload)}


def storable(text: str) -> str:
    """``text`` (a local topic, a topic level) as a device or command name the store takes
    (:func:`~pigateway.store.values.check_name`), so that a row or a dead letter can always
    hold the message: at most ``MAX_NAME`` characters, and JSON-quoted when it is blank or
    holds what no name may (a topic of spaces is one MQTT and mosquitto take)."""
    for shown in (text, json.dumps(text)):
        kept = shown if len(shown) <= MAX_NAME else shown[:MAX_NAME - 1] + "…"
        try:
            check_name("device", kept)
        except InvalidCommand:
            continue
        return kept
    return "?"


def as_command(rule: IngestRule, message: Message) -> Taken:
    """A ``command`` rule's message as a command, or a dead letter saying why not."""
    device = _level(rule.device, message.topic)
    name = _level(rule.name, message.topic)
    item = NewCommand(device=storable(device or "?"), name=storable(name or "?"),
                      params=_kept_payload(message.payload), ttl=rule.ttl)
    if device is None or name is None:
        return Taken(item, f"topic {message.topic!r} has no level {rule.device} (device) or "
                           f"{rule.name} (name)")
    try:
        params = json.loads(message.payload)
    except (ValueError, RecursionError) as exc:
        return Taken(item, f"the payload is not JSON: {bounded(exc, 200)}")
    if not isinstance(params, dict):
        return Taken(item, f"the payload is {json_kind(params)} of JSON, not an object")
    return Taken(NewCommand(device=device, name=name, params=params, ttl=rule.ttl))


def forward_topic_problem(config: Config, topic: str) -> str | None:
    """What keeps the uplink from publishing on ``topic`` (None: nothing): MQTT's rule for a
    topic name (:func:`pigateway.inputs.topic_problem`: no wildcard, no control character,
    at most 65,535 bytes) and the cloud profile's own limits (bytes, slashes, reserved)."""
    problem = topic_problem(topic)
    if problem is not None:
        return problem
    profile = profiles.get(config.mqtt.profile)
    size = len(topic.encode())
    if profile.max_topic_bytes and size > profile.max_topic_bytes:
        return f"is {size} bytes, over {profile.max_topic_bytes}, the most {profile.name} allows"
    if profile.max_topic_slashes is not None and topic.count("/") > profile.max_topic_slashes:
        return (f"has {topic.count('/')} slashes, over {profile.max_topic_slashes}, the most "
                f"{profile.name} allows")
    if any(topic.lower().startswith(reserved) for reserved in profile.reserved_prefixes):
        return f"is under {', '.join(profile.reserved_prefixes)}, reserved by {profile.name}"
    return None


@dataclass(frozen=True)
class Route:
    """Where the messages of one local topic go: the first rule matching it, the row's
    device, and under a ``forward`` rule the uplink topic and what keeps the uplink from
    publishing there (None: nothing). The same for every message of the topic, so worked
    out once per topic (:meth:`Ingest._route`), not once per message."""

    rule: IngestRule
    device: str
    where: str = ""
    problem: str | None = None


def route(config: Config, rules: Sequence[IngestRule], topic: str) -> Route | None:
    """The :class:`Route` of local ``topic`` (None: no rule matches it)."""
    rule = next((r for r in rules if topic_matches(r.topic, topic)), None)
    if rule is None:
        return None
    if not MODE_FORWARDS[rule.mode]:
        return Route(rule, storable(topic))
    where = remote_topic(config, rule, topic)
    return Route(rule, storable(topic), where, forward_topic_problem(config, where))


def as_forward(config: Config, way: Route, message: Message) -> Taken:
    """A ``forward`` rule's message as a row of kind ``forward``, or a dead letter when its
    uplink topic cannot be published: refused here, alone, it never reaches the drain."""
    extras = message.extras
    ttl = way.rule.ttl if way.rule.ttl is not None else extras.expiry
    if way.problem is not None:
        kept = {**_kept_payload(message.payload), "topic": bounded(way.where, 200)}
        return Taken(NewCommand(device=way.device, name="forward", params=kept, ttl=ttl),
                     f"the uplink topic {bounded(way.where, 80)} {way.problem}")
    params = forwarded.pack(way.where, message.payload, extras)
    return Taken(NewCommand(device=way.device, name="forward", params=params, ttl=ttl,
                            kind="forward"))


def _as_command(config: Config, way: Route, message: Message) -> Taken:
    return as_command(way.rule, message)


#: What a message becomes under a rule, by the rule's ``mode``: the one table of ingest
#: modes (a new mode is a row here, a literal of :attr:`IngestRule.mode` and a row of
#: :data:`pigateway.config.MODE_FORWARDS`, which says whether it publishes to an uplink topic).
MODES: Final[dict[str, Callable[[Config, Route, Message], Taken]]] = {
    "command": _as_command,
    "forward": as_forward,
}


def as_undecodable(message: Message, packet: Undecodable) -> Taken:
    """A message the MQTT library could not decode: a dead letter keeping its raw bytes."""
    return Taken(NewCommand(device=storable(message.topic or "?"), name="undecodable",
                            params=_kept_payload(packet)), packet.describe())


class Ingest:
    """Takes the local broker's messages into the store. Run with :meth:`run`."""

    def __init__(self, config: Config, store: Store, state: GatewayState) -> None:
        self.config = config
        self.store = store
        self.state = state
        self.rules = tuple(config.ingest)
        up = config.uplink
        self.backoff = wait_backoff(up.backoff_initial, up.backoff_max,
                                    faults=(LinkFault, LoginRefused))
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()
        #: when the latest link got its CONNACK (``time.monotonic()``; the backoff's reset)
        self._up_since: float | None = None
        self.taken = 0  # messages committed and acknowledged since start
        self.looped = 0  # messages of our own that were not taken back in
        self.refusing = False  # the store refuses: nothing is acknowledged
        #: this refusal episode: when it began, and the tries the store refused
        self._refused_since = 0.0
        self._refused_tries = 0
        #: the local broker's going away was said at warning (once until ingest is back)
        self._said_away = False
        self._routes: dict[str, Route | None] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop reading; what was taken is committed and acknowledged within ``grace``."""
        self._stop.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()

    # ---- the reconnect loop

    async def run(self) -> None:
        """Connect, take, reconnect with backoff until :meth:`stop`; a corrupt store ends it."""
        self.state.set_local(Link.OFFLINE)
        await reconnecting(self._connect_once, stop=self._stop, backoff=self.backoff,
                           reset=self.config.uplink.backoff_reset,
                           up_since=lambda: self._up_since, catch=(UplinkError,),
                           waiting=self._waiting)

    async def _connect_once(self) -> bool:
        self.state.set_local(Link.CONNECTING)
        self._idle.clear()
        try:
            async with connect(self._settings(), bound=15.0, leave_bound=5.0) as client:
                self._up_since = time.monotonic()
                await self._serve(client)
        finally:
            self.state.set_local(Link.OFFLINE)
            self._idle.set()
        return False

    def _waiting(self, error: BaseException | None, wait: float) -> None:
        """Each retry said: a fault (login, TLS) at error, the first of an episode away from
        the local broker at warning (``journalctl -p warning`` shows it once), the rest at
        info."""
        if isinstance(error, self.backoff.faults):
            level, more = logging.ERROR, ""
        elif not self._said_away:
            level, more = logging.WARNING, (" (its messages wait there, in ingest's session; "
                                            "the next tries are said at info)")
        else:
            level, more = logging.INFO, ""
        self._said_away = True
        log.log(level, "ingest: local broker %s:%d: %s; retrying in %.1fs%s",
                self.config.local.host, self.config.local.port, error or "link ended", wait,
                more)

    def _settings(self) -> Settings:
        local = self.config.local
        return Settings(
            local.host, local.port, client_id=local.client_id or f"{self.config.gateway_id}-ingest",
            username=local.username, password=local_password(local),
            protocol="5" if local.protocol == "5" else "3.1.1", persistent=True,
            session_expiry=local.session_expiry, keepalive=local.keepalive, timeout=10.0,
            tls=tls_context(local.tls), receive_maximum=local.window,
            read_ahead=2 * local.window,
            # what the store takes of a message (a bigger one is dead-lettered), with margin
            max_packet_size=packet_limit(self.config.store.max_params_bytes))

    # ---- one connection

    async def _serve(self, client: Connection) -> None:
        """Subscribe and take messages at the same time, until the link drops or a stop.

        Not one after the other: a persistent session's broker sends the messages it still
        has in flight for us right after CONNACK, before the SUBACK, and ignores Receive
        Maximum for them (mosquitto 2.0 resends all of them). More than the inbox's bound
        pauses reading the socket, so a subscribe waiting for its SUBACK first would wait
        behind messages nobody takes: it timed out at every reconnect, for good.
        """
        client.when_lost(lambda: self.state.set_local(Link.OFFLINE))
        subscribed = asyncio.ensure_future(self._subscribe(client))
        try:
            while not self._stop.is_set():
                if subscribed.done():
                    subscribed.result()  # its failure ends this connection
                group = client.take(self.config.local.window)  # raises once the link dropped
                if group:
                    await self._take(client, group)
                    continue
                waits: list[Awaitable[object]] = [client.incoming(), self._stop.wait()]
                if not subscribed.done():
                    waits.append(asyncio.shield(subscribed))
                await first_of(*waits)
        finally:
            await cancel_and_wait(subscribed)
            if not subscribed.cancelled():
                subscribed.exception()  # seen: the link's end is what this connection reports

    async def _subscribe(self, client: Connection) -> None:
        for rule in self.rules:
            await client.subscribe(rule.topic, qos=rule.qos, as_published=True)
        log.info("ingest: online at local broker %s:%d (session present: %s), %s",
                 self.config.local.host, self.config.local.port, client.session_present,
                 plural(len(self.rules), "rule"))
        if not client.lost:
            self.state.set_local(Link.ONLINE)
            self._said_away = False

    async def _take(self, client: Connection, group: Sequence[Message]) -> None:
        """Commit ``group`` and acknowledge it, in order, waiting out a store that refuses.

        A full queue may take part of a group: the part that fits goes first (halving), so
        the order holds and nothing waits behind a group too big for the room left.
        """
        pending = list(group)
        size = len(pending)
        attempt = 0
        while pending:
            if attempt and (self._stop.is_set() or client.lost):
                return  # refused until the end: unacknowledged, the broker sends them again
            part = pending[:size]
            try:
                await self._write(part)
            except StoreCorrupt:
                raise
            except QueueFull as exc:
                if size > 1:
                    size = max(1, size // 2)
                    continue
                attempt += 1
                await self._refused(len(pending), exc, attempt)
                continue
            except StoreError as exc:
                attempt += 1
                await self._refused(len(pending), exc, attempt)
                continue
            for message in part:
                client.ack(message)
            self.taken += len(part)
            pending = pending[len(part):]
            size = min(len(group), size * 2)
            attempt = 0
        if self.refusing:  # all it held back is taken: the episode ends (one part is not)
            self.refusing = False
            self.state.clear_refusing(Refuser.INGEST, summary=(
                f"refused {plural(self._refused_tries, 'time')} over "
                f"{time.monotonic() - self._refused_since:.1f}s; the local broker kept the "
                "messages meanwhile"))

    async def _refused(self, count: int, error: StoreError, attempt: int) -> None:
        """Back-pressure: nothing acknowledged, nothing more read, tried again by itself.
        Said once per episode, by the state (at warning), with what ingest does meanwhile."""
        note = ""
        if not self.refusing:
            self.refusing = True
            self._refused_since, self._refused_tries = time.monotonic(), 0
            note = (f"ingest holds {plural(count, 'message')}: nothing is acknowledged and "
                    "nothing read until the queue takes them, the local broker keeps them")
        self._refused_tries += 1
        self.state.set_refusing(Refuser.INGEST, Refusal.of(error), str(error),  # every view
                                note=note)
        await first_of(asyncio.sleep(REFUSED_BACKOFF.delay(attempt)), self._stop.wait())

    async def _write(self, part: Sequence[Message]) -> None:
        """One commit for all ``part`` makes: its rows and its dead letters together, so
        a store that refuses (locked, full) refuses the lot and nothing is acknowledged;
        a dead letter is never acknowledged and then dropped, nor a row written twice.

        Each row is checked once, by the put; when one is bad (refused before anything is
        written) every row is checked alone, and the bad ones become dead letters."""
        try:
            await self._put(*await self._classify(part, check=False))
        except InvalidCommand:
            await self._put(*await self._classify(part, check=True))

    async def _put(self, rows: list[NewCommand], dead: list[Taken]) -> None:
        buried: list[tuple[NewCommand, str, str]] = []
        for taken in dead:
            item = self._fitting(taken.item)
            if item is not None:
                buried.append((item, INVALID, taken.refusal or INVALID))
        await self.store.put_many(rows, buried=buried)
        for item, reason, detail in buried:
            log.warning("ingest: a message on %s is dead-lettered %s: %s",
                        bounded(item.device, 200), reason, detail)

    def _fitting(self, item: NewCommand) -> NewCommand | None:
        """A dead letter the store takes: what it keeps of the payload cut (halved, at most
        :data:`FIT_TRIES` times, then left out) until it fits ``store.max_params_bytes``.
        ``None`` only if even that fails (said, acknowledged, never stored): its device and
        name are :func:`storable`, its params ``{"bytes": n}`` at the least."""
        params = dict(item.params)
        for _ in range(FIT_TRIES):
            candidate = item._replace(params=params)
            try:
                prepare(candidate, self.store.config, time.time())
            except InvalidCommand as exc:
                problem = exc
            else:
                return candidate
            text = params.get("payload")
            if isinstance(text, str) and text:
                params["payload"] = text[:len(text) // 2]
            else:
                params = {"bytes": params.get("bytes", 0)}
        log.error("ingest: a message on %s is dropped: %s", bounded(item.device, 200), problem)
        return None

    async def _classify(self, group: Sequence[Message], *, check: bool
                        ) -> tuple[list[NewCommand], list[Taken]]:
        """Each message as a row or a dead letter; our own messages as nothing. ``check``:
        each row is checked as the store will (a bad one alone becomes a dead letter)."""
        rows: list[NewCommand] = []
        dead: list[Taken] = []
        now = time.time()
        for n, message in enumerate(group):
            if n and not n % CLASSIFY_SLICE:
                await asyncio.sleep(0)
            taken = self._taken(message)
            if taken is None:
                continue
            if check and taken.refusal is None:
                try:  # a bad row alone must not refuse the whole group
                    prepare(taken.item, self.store.config, now)
                except InvalidCommand as exc:
                    taken = Taken(NewCommand(device=storable(taken.item.device),
                                             name=storable(taken.item.name),
                                             params=_kept_payload(message.payload)), str(exc))
            if taken.refusal is None:
                rows.append(taken.item)
            else:
                dead.append(taken)
        return rows, dead

    def _taken(self, message: Message) -> Taken | None:
        """What ``message`` becomes under the first rule matching its topic (None: nothing)."""
        users = message.extras.user_properties
        if users and dict(users).get(forwarded.ORIGIN_PROPERTY) == self.config.gateway_id:
            self.looped += 1
            return None
        way = self._route(message.topic)
        if way is None:
            return None  # an old subscription the persistent session kept: acknowledged
        if message.undecodable is not None:
            return as_undecodable(message, message.undecodable)
        return MODES[way.rule.mode](self.config, way, message)

    def _route(self, topic: str) -> Route | None:
        """:func:`route`, remembered for up to :data:`ROUTES_KEPT` topics."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        found = route(self.config, self.rules, topic)
        if len(topic) <= ROUTE_TOPIC_KEPT:
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            self._routes[topic] = found
        return found
