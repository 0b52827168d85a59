"""The service's sections of the config, as frozen dataclasses, and the whole :class:`Config`.

Every section is a dataclass below; its fields, types, defaults and bounds *are* the schema
(the reference in ``docs/config.md`` mirrors them), checked by the one validator of
:mod:`~pigateway.config.schema` (which holds ``[store]``, the section ``pigateway send``
reads alone). Unknown keys are errors, and every error names the key, the bad value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pigateway.config.schema import (
    Section,
    StoreConfig,
    build,
    config_path,
    is_section,
    options,
    plain,
    read,
    toml,
)
from pigateway.config.schema import rule as option_rule
from pigateway.errors import ConfigError
from pigateway.inputs import shown, text_problem
from pigateway.wire import profiles

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A topic prefix: no wildcards, no NUL or other control characters (brokers refuse them).
TOPIC_PATTERN = re.compile(r"^[^#+\x00-\x1f\x7f-\x9f]+$")
#: A host name or an IPv4/IPv6 address: no scheme, no port, no spaces.
HOST_PATTERN = re.compile(r"^[A-Za-z0-9_.:%-]{1,253}$")
#: MQTT's Session Expiry Interval is four bytes; 4294967295 means the session never expires
SESSION_EXPIRY_MAX = 4_294_967_295
#: The most bytes an MQTT string (a user name, a topic) carries
MQTT_STRING_MAX = 65_535
#: A topic prefix leaves room in a topic for "/{gateway_id}/" and the longest leaf
TOPIC_PREFIX_MAX = MQTT_STRING_MAX - 128


def _opt(default: Any, *, min: float | None = None, max: float | None = None,
         pattern: re.Pattern[str] | None = None, allowed: str = "", doc: str = "") -> Any:
    """A config field with its :func:`~pigateway.config.schema.rule`."""
    meta = option_rule(min=min, max=max, pattern=pattern, allowed=allowed, doc=doc)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TlsConfig(Section, section="mqtt.tls"):
    """``[mqtt.tls]``: TLS to the broker (hostname always checked)."""

    enabled: bool = _opt(False, doc="connect with TLS; the host name is always checked")
    ca_file: Path | None = _opt(None, doc="CA bundle; None uses the system's")
    cert_file: Path | None = _opt(None, doc="client certificate")
    key_file: Path | None = _opt(None, doc="client key (or credential 'mqtt-key')")


@dataclass(frozen=True)
class MqttConfig(Section, section="mqtt"):
    """``[mqtt]``: the broker connection."""

    host: str = _opt("localhost", pattern=HOST_PATTERN, allowed="a host name or an IP address",
                     doc="broker host name or address")
    port: int = _opt(1883, min=1, max=65535, doc="broker port (8883 is usual with TLS)")
    protocol: Literal["5", "3.1.1"] = _opt("5", doc="MQTT protocol version")
    profile: Literal["generic", "aws-iot", "azure-iot-hub", "hivemq-cloud"] = _opt(
        "generic", doc=("the cloud broker: its defaults, topics and limits (docs/config.md, "
                        "Cloud profiles); generic: any broker"))
    topic_prefix: str = _opt("pigateway", pattern=TOPIC_PATTERN, max=TOPIC_PREFIX_MAX,
                             doc="topics are {topic_prefix}/{gateway_id}/...")
    keepalive: int = _opt(15, min=5, max=3600, doc="seconds between pings")
    username: str | None = _opt(None, max=MQTT_STRING_MAX,
                                doc="broker user name; none: anonymous")
    password_file: Path | None = _opt(
        None, doc="file with the password, or the systemd credential 'mqtt-password'")
    session_expiry: int = _opt(86_400, min=0, max=SESSION_EXPIRY_MAX,
                               doc="seconds the broker keeps our session")
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class LocalTlsConfig(TlsConfig, section="local.tls"):
    """``[local.tls]``: TLS to the local broker, like ``[mqtt.tls]``."""


@dataclass(frozen=True)
class LocalConfig(Section, section="local"):
    """``[local]``: the broker on the gateway that ``[[ingest]]`` rules read from."""

    host: str = _opt("127.0.0.1", pattern=HOST_PATTERN, allowed="a host name or an IP address",
                     doc="local broker host name or address")
    port: int = _opt(1883, min=1, max=65535, doc="local broker port")
    protocol: Literal["5", "3.1.1"] = _opt(
        "5", doc="MQTT protocol version (5 keeps content type, user properties, expiry)")
    username: str | None = _opt(None, max=MQTT_STRING_MAX,
                                doc="local broker user name; none: anonymous")
    password_file: Path | None = _opt(
        None, doc="file with the password, or the systemd credential 'local-password'")
    client_id: str | None = _opt(None, pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,128}$"),
                                 allowed="1-128 of letters, digits, '_', '.', ':', '-'",
                                 doc="client id of ingest's session; none: {gateway_id}-ingest")
    session_expiry: int = _opt(7 * 86_400, min=60, max=SESSION_EXPIRY_MAX,
                               doc="seconds the local broker keeps ingest's session (and "
                                   "the messages queued for it) while pigateway is down")
    keepalive: int = _opt(15, min=5, max=3600, doc="seconds between pings")
    window: int = _opt(256, min=1, max=65535,
                       doc="messages taken but not yet acknowledged at most (Receive "
                           "Maximum); twice that many are read ahead at most, then the socket "
                           "waits")
    tls: LocalTlsConfig = field(default_factory=LocalTlsConfig)


#: ``{1}``, ``{2}``...: a 1-based level of the local topic.
LEVEL_TEMPLATE = re.compile(r"^\{([1-9][0-9]?)\}$")
#: What a ``remote_topic`` template may name.
REMOTE_FIELDS = frozenset({"prefix", "gateway", "topic"})
#: What each ingest mode makes of a message: True, the message whole to the uplink topic
#: its rule's ``remote_topic`` names (checked as a template); False, a queued command whose
#: ``device`` and ``name`` are levels of the local topic. Config check and ingest's routing
#: both read this row, so a new mode is a row here, a literal of :attr:`IngestRule.mode` and
#: a row of ``ingest.MODES``, and never a branch to find.
MODE_FORWARDS: Final[dict[str, bool]] = {"forward": True, "command": False}


@dataclass(frozen=True)
class IngestRule(Section, section="ingest"):
    """``[[ingest]]``: what to take from the local broker, and as what."""

    topic: str = _opt("", doc="MQTT topic filter on the local broker ('+' and '#' allowed)")
    mode: Literal["forward", "command"] = _opt(
        "forward", doc="forward: the message whole to remote_topic; command: a queued command")
    qos: int = _opt(1, min=0, max=2, doc="subscription QoS, 1 or 2: each message is "
                    "acknowledged to the local broker after its commit (PUBACK, PUBREC); 0 is "
                    "refused (never acknowledged: a stop would lose what ingest held)")
    remote_topic: str = _opt("{prefix}/{gateway}/forward/{topic}",
                             doc="forward: uplink topic; {prefix}, {gateway}, {topic} (local)")
    device: str = _opt("{2}", doc="command: the device, a 1-based level of the local topic")
    name: str = _opt("{3}", doc="command: the command name, a 1-based level of the topic")
    ttl: float | None = _opt(None, min=0, doc="seconds a message lives in the queue; none: "
                                               "its MQTT 5 expiry, else store.default_ttl")


@dataclass(frozen=True)
class UplinkConfig(Section, section="uplink"):
    """``[uplink]``: batching, back-pressure and reconnect backoff."""

    batch_delay: float = _opt(0.1, min=0, max=60, doc="seconds a batch waits for company")
    max_actions: int = _opt(50, min=1, doc="devices per batch at most")
    max_batch_bytes: int = _opt(256 * 1024, min=1024, doc="JSON bytes per batch at most")
    max_inflight: int = _opt(8, min=1, max=1024, doc="unacknowledged batches at most")
    backoff_initial: float = _opt(1.0, min=0.01, doc="first reconnect wait, seconds")
    backoff_max: float = _opt(120.0, min=0.01, doc="longest reconnect wait, seconds")
    backoff_reset: float = _opt(30.0, min=0, doc=(
        "seconds a link holds after its CONNACK for the backoff to start over (uplink, "
        "ingest, Home Assistant; a link that drops sooner counts as a failed attempt)"))
    # At most 20: a stop takes publish_timeout + app.WIND_DOWN + app.STOP_SLACK (27 s), and
    # the unit's TimeoutStopSec=30s must stay above it (tests/test_config.py checks both).
    publish_timeout: float = _opt(10.0, min=0.1, max=20, doc=(
        "seconds to wait for a PUBACK (at most 20, so a stop fits TimeoutStopSec=30s)"))
    state_interval: float = _opt(30.0, min=1, doc="seconds between retained state refreshes")
    max_messages_per_second: float = _opt(0.0, min=0, doc=(
        "publishes per second at most, a burst of one second's worth (0: no limit; a cloud "
        "broker's publish quota, e.g. 100 for AWS IoT Core)"))
    max_bytes_per_second: int = _opt(0, min=0, doc=(
        "payload bytes per second at most, a burst of one second's worth (0: no limit)"))


@dataclass(frozen=True)
class InboundConfig(Section, section="inbound"):
    """``[inbound]``: commands from the broker to local devices."""

    enabled: bool = _opt(True, doc="take commands from the broker")
    workers: int = _opt(4, min=1, max=256, doc="commands run at once (one per device)")
    handler_timeout: float = _opt(30.0, min=0.01, doc="seconds one run of a handler may take")
    max_attempts: int = _opt(3, min=1, doc="runs of a command that fails retryably")
    backoff_initial: float = _opt(0.5, min=0, doc="first wait between runs, seconds")
    backoff_max: float = _opt(30.0, min=0, doc="longest wait between runs, seconds")
    max_payload_bytes: int = _opt(64 * 1024, min=64, doc="size limit of one command message")
    max_depth: int = _opt(16, min=1, max=256, doc="JSON nesting depth at most")
    dedupe_window: float = _opt(86_400.0, min=0, doc="seconds a finished id is remembered")


@dataclass(frozen=True)
class DeviceConfig:
    """``[devices.NAME]``: a local device, run by one handler with its own options."""

    name: str
    handler: str
    options: dict[str, Any]


@dataclass(frozen=True)
class GpioConfig(Section, section="gpio"):
    """``[gpio]``: status LEDs and buttons (BCM pin numbers)."""

    enabled: bool = _opt(True, doc="drive the status LEDs and read the buttons")
    pin_factory: Literal["auto", "lgpio", "mock"] = _opt(
        "auto", doc="auto: lgpio on a Pi, mock pins elsewhere (with a warning)")
    green_led: int | None = _opt(17, min=0, max=53, doc="BCM pin of the green LED")
    red_led: int | None = _opt(27, min=0, max=53, doc="BCM pin of the red LED")
    amber_led: int | None = _opt(None, min=0, max=53, doc="BCM pin of an optional amber LED")
    bargraph: list[int] = _opt([], doc="pins of an optional LED bar graph of queue fill")
    pause_button: int | None = _opt(5, min=0, max=53, doc="press: pause/resume; hold: flush")
    flush_button: int | None = _opt(6, min=0, max=53, doc="press: flush and reconnect now")
    active_high: bool = _opt(True, doc="LEDs light when the pin is high")
    hold_time: float = _opt(2.0, min=0.1, doc="seconds held = flush")
    bounce_time: float | None = _opt(0.05, min=0, doc="button debounce, seconds")


#: Bytes of a unix socket's path at most (``sun_path`` holds 108 with its NUL).
MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True)
class ControlConfig(Section, section="control"):
    """``[control]``: the local control socket."""

    socket: Path = _opt(Path("/run/pigateway/control.sock"),
                        doc="unix socket for pigateway status/pause/resume/flush")

    def __post_init__(self) -> None:
        super().__post_init__()
        size = len(os.fsencode(str(self.socket)))
        if size > MAX_SOCKET_PATH:  # bind() refuses it: a start failing with exit 1, forever
            raise ConfigError("control.socket", f"{str(self.socket)!r} is {size} bytes, over "
                              f"the {MAX_SOCKET_PATH} a unix socket's path may have")


@dataclass(frozen=True)
class LogConfig(Section, section="log"):
    """``[log]``: logging."""

    level: Literal["debug", "info", "warning", "error"] = _opt("info", doc="least level logged")


def listen_address(value: str, *, key: str = "metrics.listen") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) split and checked; :class:`ConfigError` if not."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not HOST:PORT (like '127.0.0.1:9108')")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (a loopback address, or ``localhost``)."""
    import ipaddress  # noqa: PLC0415 - only a config with [metrics] listen needs it

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class MetricsConfig(Section, section="metrics"):
    """``[metrics]``: Prometheus metrics (docs/operations.md); each way out is optional."""

    textfile: Path | None = _opt(
        None, doc="node_exporter textfile to write (atomically) every interval; none: off")
    interval: float = _opt(15.0, min=1, max=3600, doc="seconds between textfile writes")
    listen: str | None = _opt(
        None, doc="HOST:PORT of an HTTP /metrics endpoint (e.g. '127.0.0.1:9108'); none: off")
    allow_remote: bool = _opt(
        False, doc="let listen be a non-loopback address (the operator's exposure)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.listen is None:
            return
        host, _ = listen_address(self.listen)
        if not self.allow_remote and not is_loopback(host):
            raise ConfigError("metrics.listen", f"{self.listen!r} is not a loopback address; "
                              "/metrics has no authentication, so serving it to the network "
                              "needs metrics.allow_remote = true (your exposure: firewall it)")


#: The manage verbs (docs/operations.md, Remote management); the read-only ones by default.
MANAGE_VERBS: Final = ("status", "queue-stats", "logs", "config-get", "pause", "resume", "flush",
                       "requeue-dead", "restart", "config-set")


@dataclass(frozen=True)
class ManageConfig(Section, section="manage"):
    """``[manage]``: commands to the gateway itself on ``{prefix}/{gateway}/manage``."""

    enabled: bool = _opt(False, doc="take management commands from the broker")
    allow: list[str] = _opt(["status", "queue-stats", "logs", "config-get"],
                            doc="the verbs permitted (read-only by default): " +
                                ", ".join(MANAGE_VERBS))
    overlay: Path = _opt(Path("/var/lib/pigateway/remote.toml"),
                         doc="what config-set writes; its keys override the config file's")
    rollback_after: float = _opt(120.0, min=5, max=3600,
                                 doc="seconds a config-set has to bring the gateway back "
                                     "online before it is rolled back")
    log_lines: int = _opt(200, min=1, max=5000, doc="journal lines 'logs' returns at most")

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [verb for verb in self.allow if verb not in MANAGE_VERBS]
        if unknown:
            raise ConfigError("manage.allow", f"unknown verb {unknown[0]!r}; the verbs are "
                              + ", ".join(MANAGE_VERBS))


@dataclass(frozen=True)
class HomeAssistantConfig(Section, section="homeassistant"):
    """``[homeassistant]``: the gateway as a Home Assistant device (docs/homeassistant.md)."""

    enabled: bool = _opt(False, doc="announce the gateway to Home Assistant by MQTT discovery; "
                         "false removes what an earlier run announced")
    discovery_prefix: str = _opt("homeassistant", pattern=re.compile(r"^[A-Za-z0-9_-]{1,64}$"),
                                 allowed="1-64 of letters, digits, '_', '-'",
                                 doc="Home Assistant's MQTT discovery prefix")
    link: Literal["local", "uplink"] = _opt(
        "uplink", doc="the broker Home Assistant listens to: the uplink's ([mqtt]) or the "
        "gateway's own ([local], which must be set)")


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    gateway_id: str
    store: StoreConfig = field(default_factory=StoreConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    gpio: GpioConfig = field(default_factory=GpioConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    manage: ManageConfig = field(default_factory=ManageConfig)
    ingest: list[IngestRule] = field(default_factory=list)
    devices: dict[str, DeviceConfig] = field(default_factory=dict)
    source: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The effective config as plain JSON-ready data."""
        data: dict[str, Any] = plain(self)
        return data


# --------------------------------------------------------------------------- loading


def load(path: str | os.PathLike[str] | None = None, *,
         overlays: Sequence[Path] | None = None) -> Config:
    """Read and validate the config file; raise :class:`ConfigError` naming the problem.

    With ``[manage] enabled``, the keys of the remote overlay (``manage.overlay``, written
    by a remote ``config-set``, left alone by Ansible) override the file's; ``overlays``
    replaces the overlay files looked at (the service's start tries a pending one so).
    """
    where = config_path(path)
    data = toml(read(where), str(where))
    config = from_dict(data)
    if config.manage.enabled:
        for extra in (config.manage.overlay,) if overlays is None else overlays:
            if extra.exists():
                data = merged(data, toml(read(extra), str(extra)))
        config = from_dict(data)
    config = dataclasses.replace(config, source=where)
    _check_files(config)  # again, with the config file itself among the files read
    return config


def merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay``'s keys in place, table by table (arrays are replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def parse(text: str, *, origin: str = "<string>") -> Config:
    """Validate TOML text into a :class:`Config`."""
    return from_dict(toml(text, origin))


def from_dict(data: dict[str, Any]) -> Config:
    """Validate an already parsed mapping into a :class:`Config`."""
    data = profiles.with_defaults(dict(data))
    devices = _devices(data.pop("devices", {}))
    config = build(Config, data, prefix="", skip=frozenset({"devices", "source"}))
    config = dataclasses.replace(config, devices=devices)
    _check_cross_fields(config)
    if config.homeassistant.enabled and config.homeassistant.link == "local" \
            and "local" not in data:
        raise ConfigError("homeassistant.link", "'local' needs a [local] section (the "
                          "gateway's own broker, where Home Assistant listens)")
    if config.homeassistant.enabled and config.homeassistant.link == "uplink" \
            and config.mqtt.profile == "azure-iot-hub":
        raise ConfigError("homeassistant.link", "'uplink' is an Azure IoT Hub, which takes "
                          "only its own topics (no discovery, no retained messages); use "
                          "'local' (Home Assistant on the gateway's own broker)")
    return config


def _check_cross_fields(config: Config) -> None:
    _check_manage(config)
    if not NAME_PATTERN.match(config.gateway_id):
        raise ConfigError(
            "gateway_id",
            f"{config.gateway_id!r} is not allowed: use 1-64 of letters, digits, '_', '-', '.'",
        )
    for section in ("uplink", "inbound"):
        backoff = getattr(config, section)
        if backoff.backoff_max < backoff.backoff_initial:
            raise ConfigError(f"{section}.backoff_max",
                              f"{backoff.backoff_max} is not allowed: it must be >= "
                              f"{section}.backoff_initial ({backoff.backoff_initial})")
    if config.mqtt.tls.key_file and not config.mqtt.tls.cert_file:
        raise ConfigError("mqtt.tls.key_file",
                          f"'{config.mqtt.tls.key_file}' needs mqtt.tls.cert_file too")
    if config.local.tls.key_file and not config.local.tls.cert_file:
        raise ConfigError("local.tls.key_file",
                          f"'{config.local.tls.key_file}' needs local.tls.cert_file too")
    for index, rule in enumerate(config.ingest):
        _check_rule(config, f"ingest[{index}]", rule)
    pins = [p for p in _gpio_pins(config.gpio) if p is not None]
    if config.gpio.enabled and len(pins) != len(set(pins)):
        raise ConfigError("gpio", f"a pin is used twice: {sorted(pins)}")
    _check_files(config)
    profiles.check(config)


def _check_files(config: Config) -> None:
    """No file the service writes may be one it keeps or reads: a ``metrics.textfile`` set
    to the queue's path was renamed over ``queue.db`` every interval (the commands gone),
    one set to the config replaced the config; a queue over the config file would be moved
    aside as corrupt, the config with it. Compared as written (no look at the disk)."""
    store = Path(os.path.normpath(config.store.path))
    written = [(key, Path(os.path.normpath(path))) for key, path in (
        ("metrics.textfile", config.metrics.textfile), ("control.socket", config.control.socket),
        ("manage.overlay", config.manage.overlay if config.manage.enabled else None))
        if path is not None]
    read = [(key, Path(os.path.normpath(path))) for key, path in (
        ("the config file", config.source and os.path.abspath(config.source)),
        ("mqtt.password_file", config.mqtt.password_file),
        ("local.password_file", config.local.password_file),
        *((f"{side}.tls.{name}", getattr(getattr(config, side).tls, name))
          for side in ("mqtt", "local") for name in ("ca_file", "cert_file", "key_file")))
        if path is not None]
    for key, path in written:
        if path.parent == store.parent and path.name.startswith(store.name):
            raise ConfigError(key, f"{str(path)!r} is one of the queue's files (store.path "
                              f"{str(store)!r}, its -wal, -shm, lock and marks): the service "
                              "writes it, which would destroy the queue")
        other = next((k for k, p in written + read if p == path and k != key), None)
        if other is not None:
            raise ConfigError(key, f"{str(path)!r} is {other} too: the service writes it, "
                              "which would replace that one")
    other = next((k for k, p in read if p == store), None)
    if other is not None:
        raise ConfigError("store.path", f"{str(store)!r} is {other} too: a file that is no "
                          "queue is moved aside as corrupt at the service's start")


#: The nesting depth and bytes a config-set needs (a list value, a few keys).
MANAGE_ROOM: Final = (4, 1024)


def _check_manage(config: Config) -> None:
    """Manage commands take the inbound path, and a config-set runs up to three times
    (staged, tried, answered) across its restarts."""
    if not config.manage.enabled:
        return
    if not config.inbound.enabled:
        raise ConfigError("manage.enabled", "remote management takes the inbound path: it "
                          "needs inbound.enabled = true")
    if "config-set" in config.manage.allow and config.inbound.max_attempts < 3:
        raise ConfigError("manage.allow", "config-set runs up to 3 times across its restarts: "
                          "it needs inbound.max_attempts >= 3")
    # limits under which no config-set arrives would shut the operator out for good
    depth, size = (MANAGE_ROOM if "config-set" in config.manage.allow else (2, 64))
    if config.inbound.max_depth < depth:
        raise ConfigError("inbound.max_depth", f"the manage commands of manage.allow nest "
                          f"up to {depth} levels: it needs {depth} at least")
    if config.inbound.max_payload_bytes < size:
        raise ConfigError("inbound.max_payload_bytes", f"a config-set takes up to {size} bytes: "
                          f"it needs {size} at least while config-set is allowed")


def filter_problem(value: str) -> str | None:
    """What keeps ``value`` from being an MQTT topic filter (None: nothing)."""
    problem = text_problem(value)
    if problem is not None:
        return problem
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "uses '#' other than as the whole last level"
        if "+" in level and level != "+":
            return "uses '+' other than as a whole level"
    return None


def _check_rule(config: Config, key: str, rule: IngestRule) -> None:
    """One ``[[ingest]]`` rule: a filter, templates that name only what exists, no loop."""
    if not rule.topic:
        raise ConfigError(f"{key}.topic", "is required (an MQTT topic filter)")
    problem = filter_problem(rule.topic)
    if problem is not None:
        raise ConfigError(f"{key}.topic", f"{shown(rule.topic)} {problem}")
    if rule.topic.startswith("$"):
        raise ConfigError(f"{key}.topic", f"{shown(rule.topic)}: '$' topics are the broker's")
    if rule.qos == 0:
        raise ConfigError(f"{key}.qos", "0 is not allowed: a QoS 0 message is never "
                          "acknowledged, so the local broker keeps no copy of it and a stop or "
                          "a crash loses what ingest held; use 1 (or 2)")
    if MODE_FORWARDS[rule.mode]:
        _check_remote(f"{key}.remote_topic", rule.remote_topic)
    else:
        for part in ("device", "name"):
            if not LEVEL_TEMPLATE.match(getattr(rule, part)):
                raise ConfigError(f"{key}.{part}", f"{shown(getattr(rule, part))} is not a "
                                  "topic level like '{2}' (1-based)")
    def where(host: str, port: int) -> tuple[str, int]:
        return ("127.0.0.1" if host == "localhost" else host, port)

    if where(config.local.host, config.local.port) == where(config.mqtt.host, config.mqtt.port):
        raise ConfigError(f"{key}.topic", "local and mqtt name the same broker "
                          f"({config.mqtt.host}:{config.mqtt.port}): what ingest forwards "
                          "would come back in (a loop); point [local] at the gateway's broker")


def _check_remote(key: str, template: str) -> None:
    import string  # noqa: PLC0415 - only configs with forward rules need it

    try:
        names = {part for _, part, _, _ in string.Formatter().parse(template)
                 if part is not None}
    except ValueError as exc:
        raise ConfigError(key, f"{shown(template)} is not a template: {exc}") from None
    unknown = sorted(names - REMOTE_FIELDS)
    if unknown:
        raise ConfigError(key, f"{shown(template)} names {{{unknown[0]}}}; allowed: "
                          "{prefix}, {gateway}, {topic}")
    if "+" in template or "#" in template:
        raise ConfigError(key, f"{shown(template)} has an MQTT wildcard")


def _gpio_pins(gpio: GpioConfig) -> list[int | None]:
    singles = [gpio.green_led, gpio.red_led, gpio.amber_led, gpio.pause_button, gpio.flush_button]
    return [*singles, *gpio.bargraph]


def _devices(table: Any) -> dict[str, DeviceConfig]:
    if not isinstance(table, dict):
        raise ConfigError("devices", "must be a table of [devices.NAME] tables")
    devices = {}
    for name, spec in table.items():
        key = f"devices.{name}"
        if not NAME_PATTERN.match(name):
            raise ConfigError(key, "a device name is 1-64 of letters, digits, '_', '-', '.'")
        if not isinstance(spec, dict):
            raise ConfigError(key, "must be a table with at least 'handler'")
        options = dict(spec)
        handler = options.pop("handler", None)
        if not isinstance(handler, str) or not handler:
            raise ConfigError(f"{key}.handler",
                              f"is required and must be a handler name, got {handler!r}")
        devices[name] = DeviceConfig(name=name, handler=handler, options=options)
    return devices


# --------------------------------------------------------------------------- the validator


def fields_reference() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) of every option: the source of ``docs/config.md``."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type[Any], prefix: str) -> None:
        for opt in options(cls):
            if opt.name in {"devices", "source", "gateway_id"} and cls is Config:
                continue
            hint = opt.hint
            if is_section(hint):
                walk(hint, f"{prefix}{opt.name}.")
                continue
            inner = typing.get_args(hint)
            if typing.get_origin(hint) is list and inner and is_section(inner[0]):
                walk(inner[0], f"{prefix}{opt.name}[].")
                continue
            default = opt.default() if opt.factory else opt.default
            rows.append((prefix + opt.name, _type_name(hint), plain(default),
                         opt.rule.get("doc", "")))

    walk(Config, "")
    return rows


def _type_name(hint: Any) -> str:
    text = str(hint)
    for noise in ("typing.", "pathlib.", "<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("Path", "absolute path")


def reference_markdown() -> str:
    """The option table of ``docs/config.md``, generated so that the docs cannot drift."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, doc in fields_reference():
        shown = "(none)" if default is None else f"`{default!r}`".replace("'", '"')
        lines.append(f"| `{key}` | {kind.replace('|', '&#124;')} | {shown} | {doc} |")
    return "\n".join(lines)
