"""Prometheus metrics: the state object, this process's counters and the queue's rows, rendered.

Three ways out, each optional (``[metrics]``, docs/operations.md), and all three render the
same :class:`Snapshot` with the same :func:`render`, so they cannot disagree:

1. ``pigateway metrics`` prints it: from the control socket while the service runs, else from
   the queue file opened read-only (:func:`read_file`; it never creates or changes a file);
2. :class:`Exporter` writes a node_exporter textfile every ``metrics.interval`` seconds
   (temp file + rename, so node_exporter never reads half a file);
3. :class:`Exporter` serves ``GET /metrics`` on ``metrics.listen`` (loopback unless
   ``metrics.allow_remote``), bounded as every listener is (:mod:`pigateway.listeners`,
   :data:`BOUNDS`): a scraper sends a few hundred bytes at once and reads a few KB.

Where a number comes from decides whether it survives a restart: the queue gauges and the dead
letters by reason are read from the store's rows (they survive); what only this process saw
(deliveries, batches, bytes, reconnects, refusals, inbound results, commit times) lives in
:data:`COUNTERS` and starts at zero with the process, which Prometheus' ``rate()`` and
``increase()`` take as a counter reset. The hot paths only bump plain integers here; the
prometheus-client library is imported by :func:`render` alone, so ``pigateway send`` never
pays for it (measured on x86 with bytecode: ~11 ms and ~1 MB on top of the service's own
imports, ~55 ms alone; a Pi Zero core is roughly ten times slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from urllib.parse import quote

from pigateway import __version__
from pigateway.config import Config, MetricsConfig, is_loopback, listen_address
from pigateway.counters import COUNTERS
from pigateway.errors import ConfigError, PigatewayError, ServiceNotRunning, StoreError
from pigateway.listeners import Bounds, Connection, Listener
from pigateway.state import Refusal

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pigateway.state import GatewayState
    from pigateway.store import Store

#: Named for the journal as operators know it, whichever package holds this module.
log = logging.getLogger("pigateway.metrics")

#: ``Content-Type`` of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Bytes of an HTTP request head at most, and seconds a client may take to send it.
MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
#: Scrapes answered at once; more get 503 (each one reads the store).
MAX_SCRAPES: Final = 4
#: Connections open at once (a scraper holds one); more are closed unread.
MAX_CONNECTIONS: Final = 8
#: Seconds one connection may take, its answer included (a scrape reads the store).
CONNECTION_TIMEOUT: Final = 30.0
#: The /metrics listener's bounds.
BOUNDS: Final = Bounds(connections=MAX_CONNECTIONS, request_bytes=MAX_REQUEST,
                       request_seconds=REQUEST_TIMEOUT, connection_seconds=CONNECTION_TIMEOUT,
                       busy=b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                            b"Connection: close\r\n\r\n")


# --------------------------------------------------------------------------- the queue's rows


class QueueReading(NamedTuple):
    """What the store's rows say (so it survives a restart)."""

    depth: int = 0
    bytes: int = 0
    oldest_age: float | None = None
    oldest_ttl: float | None = None  # the ttl the oldest queued command came with
    dead: Mapping[str, int] = MappingProxyType({})


async def read_store(store: Store) -> QueueReading:
    """The reading through the service's own (open) store."""
    stats = await store.stats()
    return QueueReading(depth=stats.depth, bytes=stats.bytes, oldest_age=stats.oldest_age,
                        oldest_ttl=await store.oldest_ttl(), dead=stats.dead)


def read_file(path: Path) -> QueueReading:
    """The reading of a queue file no service has open; it never creates or writes a file.

    No file is an empty queue. SQLite's ``mode=ro`` would still create the ``-wal`` and
    ``-shm`` files of a WAL database (owned by whoever runs this, maybe root, which the
    service could not open later), so a file without a ``-wal`` (closed cleanly) is read as
    ``immutable``; one with a ``-wal`` (in use, or a crash) has both, and is read ``mode=ro``.
    """
    if not path.exists():
        return QueueReading()
    for attempt in (1, 2):  # a producer may have checkpointed under an immutable read: again
        wal = Path(f"{path}-wal").exists()
        uri = f"file:{quote(str(path))}?" + ("mode=ro" if wal else "immutable=1")
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as conn:
                return _reading(conn)
        except sqlite3.Error as exc:
            if attempt == 2 or wal:
                raise StoreError(f"cannot read the queue {path} for metrics: {exc}") from exc
    raise AssertionError("unreachable")


def _reading(conn: sqlite3.Connection) -> QueueReading:
    from pigateway.store.reading import figures  # noqa: PLC0415

    return QueueReading(*figures(conn))


# --------------------------------------------------------------------------- one snapshot


class Snapshot(NamedTuple):
    """Everything one rendering shows. ``state`` and ``counters`` are ``None`` when the
    service is not running (``pigateway metrics`` read the file instead)."""

    queue: QueueReading
    state: Mapping[str, Any] | None = None
    counters: Mapping[str, Any] | None = None


async def snapshot(state: GatewayState, store: Store) -> Snapshot:
    """The running service's snapshot: its state object, its counters, its store's rows."""
    return Snapshot(queue=await read_store(store), state=state.as_dict(),
                    counters=COUNTERS.as_dict())


async def cli_snapshot(config: Config) -> Snapshot:
    """``pigateway metrics``: the running service's state and counters over the control
    socket, else the file alone; the dead letters and the oldest ttl from the file read-only
    either way (the service's own connection is not reachable from here)."""
    from pigateway.listeners import control  # noqa: PLC0415 - not needed by the service

    queue = await asyncio.to_thread(read_file, config.store.path)
    try:
        reply = await control.request(config.control.socket, "metrics")
    except ServiceNotRunning:
        return Snapshot(queue=queue)
    return Snapshot(queue=queue, state=reply.get("state", {}), counters=reply.get("counters"))


def render(snap: Snapshot) -> bytes:
    """The text exposition format (prometheus-client writes it, escaping included)."""
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    return generate_latest(registry)


class _Collector:
    """Hands one :class:`Snapshot` to prometheus-client as metric families."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        yield from _families(self.snap)


def _families(snap: Snapshot) -> Iterator[Metric]:
    import platform  # noqa: PLC0415 - see render()

    from prometheus_client.core import (  # noqa: PLC0415
        GaugeMetricFamily as Gauge,
    )

    info = Gauge("pigateway_build_info", "pigateway's version (always 1)",
                 labels=["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    yield info
    yield Gauge("pigateway_running", "1 when these numbers come from the running service, "
                "0 when pigateway metrics read the queue file", value=snap.state is not None)
    yield from _queue_families(snap)
    if snap.state is not None:
        yield from _state_families(snap.state)
    if snap.counters is not None:
        yield from _counter_families(snap.counters)


def _queue_families(snap: Snapshot) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415 - see render()
        CounterMetricFamily as Counter,
    )
    from prometheus_client.core import (  # noqa: PLC0415
        GaugeMetricFamily as Gauge,
    )

    # one reading of the rows that the state object's depth and oldest_age mirror (every
    # 0.5 s), so depth, bytes, age, ttl and dead letters of one scrape agree with each other
    queue = snap.queue
    yield Gauge("pigateway_queue_depth", "commands queued on disk", value=queue.depth)
    yield Gauge("pigateway_queue_bytes", "params bytes queued on disk", value=queue.bytes)
    yield Gauge("pigateway_queue_oldest_age_seconds",
                "age of the oldest queued command (0: the queue is empty)",
                value=queue.oldest_age or 0.0)
    yield Gauge("pigateway_queue_oldest_ttl_seconds",
                "the ttl the oldest queued command came with (0: none, or it lives forever)",
                value=queue.oldest_ttl or 0.0)
    commands = Counter("pigateway_commands", "commands that left the queue, by outcome: "
                       "dead (rows in dead_letters, by reason) or delivered (since start)",
                       labels=["outcome", "reason"])
    for reason, count in sorted(queue.dead.items()):
        commands.add_metric(["dead", reason], count)
    if snap.counters is not None:
        commands.add_metric(["delivered", "acked"], snap.counters["delivered"])
    yield commands


def _state_families(state: Mapping[str, Any]) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415 - see render()
        GaugeMetricFamily as Gauge,
    )

    link = Gauge("pigateway_link_up", "1 while the link is online", labels=["link"])
    link.add_metric(["uplink"], state.get("link") == "online")
    yield link
    yield Gauge("pigateway_fault", "1 while a fault an operator must fix is set (see "
                "pigateway status)", value=state.get("fault") is not None)
    yield Gauge("pigateway_paused", "1 while draining is paused", value=bool(state.get("paused")))
    refusing = Gauge("pigateway_refusing", "1 while work is turned away for this reason "
                     "(pigateway status says by whom and why)", labels=["reason"])
    active = {refusal.get("reason") for refusal in state.get("refusals") or []}
    for reason in Refusal:
        refusing.add_metric([str(reason)], reason in active)
    yield refusing
    yield Gauge("pigateway_in_flight_batches", "batches published and not yet acknowledged",
                value=state.get("in_flight") or 0)
    yield Gauge("pigateway_start_time_seconds", "when the service started (unix time)",
                value=state.get("started_at") or 0.0)


def _counter_families(counters: Mapping[str, Any]) -> Iterator[Metric]:
    from prometheus_client.core import (  # noqa: PLC0415 - see render()
        CounterMetricFamily as Counter,
    )
    from prometheus_client.core import (  # noqa: PLC0415
        HistogramMetricFamily,
    )

    for name, key, text in (
            ("pigateway_batches", "batches", "batches acknowledged by the broker"),
            ("pigateway_bytes_published", "bytes_published", "payload bytes acknowledged"),
            ("pigateway_reconnects", "reconnects", "times the uplink came online again"),
            ("pigateway_forwarded", "forwarded", "forwarded messages acknowledged (ingest)")):
        yield Counter(name, f"{text} (since the service started)", value=counters[key])
    for name, key, label, text in (
            ("pigateway_publish_refusals", "refusals", "code",
             "batches the broker refused, by MQTT 5 reason code (their rows are dead)"),
            ("pigateway_inbound", "inbound", "status", "inbound commands answered, by status")):
        family = Counter(name, f"{text} (since the service started)", labels=[label])
        for value, count in sorted(counters[key].items()):
            family.add_metric([value], count)
        yield family
    commit = counters["commit_seconds"]
    yield HistogramMetricFamily(
        "pigateway_store_commit_seconds", "seconds one group commit of the store took",
        buckets=list(commit["buckets"].items()), sum_value=commit["sum"])


# --------------------------------------------------------------------------- the service's part


class Exporter:
    """The service's metrics task: the textfile and/or ``/metrics``, as configured."""

    def __init__(self, config: MetricsConfig, state: GatewayState, store: Store, *,
                 bounds: Bounds = BOUNDS) -> None:
        self.config = config
        self.state = state
        self.store = store
        self.listener = Listener("metrics", self._serve, bounds)
        self._scrapes = asyncio.Semaphore(MAX_SCRAPES)
        #: the textfile's writes, and the scrapes, failing now: said once when they start
        #: (at warning) and once when they work again (at info), not at every try (a full
        #: disk fails a write every interval for as long as it lasts)
        self._writes_failing = False
        self._scrapes_failing = False

    @property
    def enabled(self) -> bool:
        return self.config.textfile is not None or self.config.listen is not None

    async def render(self) -> bytes:
        return render(await snapshot(self.state, self.store))

    async def run(self) -> None:
        """Serve and write until cancelled; errors of one write are logged, not fatal."""
        if self.config.listen is not None:
            await self.bind()
        try:
            while self.config.textfile is not None:
                await self.write_textfile(self.config.textfile)
                await asyncio.sleep(self.config.interval)
            await asyncio.Future()  # serve only
        finally:
            await self.listener.aclose()

    async def write_textfile(self, path: Path) -> None:
        """Write the exposition to ``path`` atomically (temp file in its folder + rename)."""
        try:
            text = await self.render()
            await asyncio.to_thread(write_atomically, path, text)
        except (OSError, PigatewayError) as exc:
            log.log(logging.DEBUG if self._writes_failing else logging.WARNING,
                    "metrics: cannot write %s: %s; tried again every %gs, said again once "
                    "it is written", path, exc, self.config.interval)
            self._writes_failing = True
            return
        if self._writes_failing:
            self._writes_failing = False
            log.info("metrics: %s is written again", path)

    async def bind(self) -> Listener:
        """Bind ``metrics.listen``; :class:`ConfigError` for a non-loopback address unless
        ``allow_remote`` (checked again here: the config is not the only caller)."""
        assert self.config.listen is not None
        host, port = listen_address(self.config.listen)
        if not self.config.allow_remote and not is_loopback(host):
            raise ConfigError("metrics.listen", f"{self.config.listen!r} is not loopback; "
                              "set metrics.allow_remote = true to expose /metrics")
        try:
            await self.listener.serve_tcp(host, port)
        except OSError as exc:
            await self.listener.aclose()
            raise ConfigError("metrics.listen", f"cannot listen on {self.config.listen}: "
                              f"{exc}") from exc
        log.info("metrics: serving /metrics on %s", self.config.listen)
        return self.listener

    async def _serve(self, conn: Connection) -> None:
        """One request, one answer, then close (the listener bounds the rest)."""
        status, body = await self._answer(await conn.request(b"\r\n\r\n"))
        await conn.reply(f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)

    async def _answer(self, head: bytes) -> tuple[str, bytes]:
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return "405 Method Not Allowed", b"only GET\n"
        if target != b"/metrics":
            return "404 Not Found", b"see /metrics\n"
        if self._scrapes.locked():
            return "503 Service Unavailable", b"too many scrapes at once\n"
        try:
            async with self._scrapes:
                text = await self.render()
        except PigatewayError as exc:
            log.log(logging.DEBUG if self._scrapes_failing else logging.WARNING,
                    "metrics: a scrape is answered 503: %s; said again once one is answered",
                    exc)
            self._scrapes_failing = True
            return "503 Service Unavailable", f"{exc}\n".encode()
        if self._scrapes_failing:
            self._scrapes_failing = False
            log.info("metrics: scrapes are answered again")
        return "200 OK", text


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds either its old or its new content, never half of it; mode 0644."""
    import tempfile  # noqa: PLC0415 - only the service's textfile writer needs it

    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
