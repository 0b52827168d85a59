"""The ``mqtt`` handler: republish a command to a local broker (zigbee2mqtt and friends).

Options: ``topic`` (a template, default ``"zigbee2mqtt/{device}/set"``; placeholders
``{device}`` (the ``target`` option, else the device's name), ``{name}`` (the command's
name) and ``{gateway}``), ``host`` (default ``127.0.0.1``), ``port`` (1883), ``username``,
``password_file`` or ``password_credential`` (a systemd ``LoadCredential=`` name), ``qos``
(0-2, default 1), ``retain`` (default false).

With ``[[ingest]]`` rules configured the connection speaks MQTT 5 and every message carries
the user property ``pigateway-origin = <gateway_id>``: ingest never takes it back in, even
when a rule's filter matches its topic (no loops).

The payload is the command's ``params`` as JSON, so ``{"state": "ON"}`` sent to a device
``hall`` becomes that message on ``zigbee2mqtt/hall/set``. With QoS 1 or 2 the command is
``ok`` once the local broker acknowledged the message.

Idempotence: a command run twice after a crash publishes the same message twice. Devices
driven by absolute states (``{"state": "ON"}``, a brightness) end where once would leave
them; prefer absolute states over ``TOGGLE`` for that reason.

The connection is opened at the first command and kept; when it fails the command is
retried (``RetryableHandlerError``) on a fresh connection. Every aiomqtt call lives in
:mod:`pigateway.mqtt` (``local_publisher``); secrets are read by :mod:`pigateway.mqtt.credentials`.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from pigateway import wire
from pigateway.config import HOST_PATTERN, Config, DeviceConfig
from pigateway.errors import ConfigError, InvalidCommand, RetryableHandlerError, UplinkError
from pigateway.handlers import Options, Request
from pigateway.inputs import shown, topic_problem
from pigateway.mqtt import local_publisher
from pigateway.mqtt.credentials import credential, read_secret

DEFAULT_TOPIC = "zigbee2mqtt/{device}/set"
#: A systemd credential name: a file name in $CREDENTIALS_DIRECTORY, never a path out of it.
CREDENTIAL = re.compile(r"^[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,254}$")


class MqttHandler:
    """Publishes each command's params to a topic made from the template."""

    @classmethod
    def check(cls, device: DeviceConfig, config: Config) -> None:
        """Building one connects nowhere (the connection opens at the first command)."""
        cls(device, config)

    def __init__(self, device: DeviceConfig, config: Config) -> None:
        options = Options(device)
        self.template = options.text("topic", DEFAULT_TOPIC, printable=True)
        self.target = options.text("target", device.name, printable=True)
        self.host = options.text("host", "127.0.0.1", printable=True)
        self.port = options.integer("port", 1883, low=1, high=65535)
        self.username = options.text("username", printable=True)
        password_file = options.path("password_file")
        password_credential = options.text("password_credential", printable=True)
        self.qos = options.integer("qos", 1, low=0, high=2)
        self.retain = options.flag("retain", False)
        options.finish()
        self.gateway = config.gateway_id
        #: with ``[[ingest]]`` rules, publish under MQTT 5 with the user property
        #: ``pigateway-origin``, so that ingest never takes our own message back in
        self.origin = bool(config.ingest)
        self.client_id = f"pigateway-{config.gateway_id}-{device.name}"[:64]
        if password_file and password_credential:
            raise ConfigError(options.key("password_credential"),
                              "give password_file or password_credential, not both")
        if password_credential:
            _check_pattern(options.key("password_credential"), password_credential,
                           CREDENTIAL, "a credential name (letters, digits, '_.@-', no '/')")
            found = credential(password_credential)
            if found is None:
                raise ConfigError(options.key("password_credential"),
                                  f"no credential {password_credential!r} in "
                                  "$CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
            password_file = found
        self.password = _read_password(options.key("password_file"), password_file)
        _check_options(options, self)
        _check_no_loop(options, self, config)
        self._stack: contextlib.AsyncExitStack | None = None
        self._publisher: Any = None

    def topic(self, name: str) -> str:
        return str(self.template.format(device=self.target, name=name, gateway=self.gateway))

    async def run(self, request: Request) -> Any:
        topic = self.topic(request.name)
        problem = topic_problem(topic)
        if problem is not None:  # target and template were checked: the name is the cause
            raise InvalidCommand(f"the command name {shown(request.name, 40)} makes an invalid "
                                 f"topic {shown(topic, 80)}: it {problem}")
        payload = _payload(request.params)
        try:
            publisher = await self._connected()
            await publisher.publish(topic, payload, qos=self.qos, retain=self.retain)
        except UplinkError as exc:
            await self.close()
            raise RetryableHandlerError(f"local broker {self.host}:{self.port}: {exc}") from exc
        return {"topic": topic}

    async def _connected(self) -> Any:
        if self._publisher is None:
            stack = contextlib.AsyncExitStack()
            self._publisher = await stack.enter_async_context(local_publisher(
                self.host, self.port, username=self.username, password=self.password,
                client_id=self.client_id, origin=self.gateway if self.origin else None))
            self._stack = stack
        return self._publisher

    async def close(self) -> None:
        stack, self._stack, self._publisher = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(UplinkError):
                await stack.aclose()


def _payload(params: dict[str, Any]) -> bytes:
    """The params as strict JSON in UTF-8: what a receiver can read, or InvalidCommand."""
    try:
        return wire.encode(params).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, a lone surrogate, depth
        raise InvalidCommand(f"params cannot be sent as JSON: {str(exc)[:200]}") from exc


def _read_password(key: str, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return read_secret(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError too; a file too long
        raise ConfigError(key, f"cannot read {path}: {exc}") from exc


def _check_options(options: Options, handler: MqttHandler) -> None:
    """What ``config check`` can know before the first command: the topic made from the
    template and ``target`` is one we can publish to, and the connection options are usable
    (a bad one would otherwise fail every command, blaming the command)."""
    _check_template(options.key("topic"), handler.template)
    problem = topic_problem(handler.target)
    if problem is not None:
        raise ConfigError(options.key("target"), f"{shown(handler.target)} is not usable in a "
                          f"topic: it {problem}")
    _check_topic(options, handler, handler.topic("n"))
    _check_pattern(options.key("host"), handler.host, HOST_PATTERN,
                   "a host name or an IP address")


def _check_no_loop(options: Options, handler: MqttHandler, config: Config) -> None:
    """Ingest keeps our own publishes out by the MQTT 5 user property ``pigateway-origin``;
    under ``local.protocol = "3.1.1"`` no property arrives, so a rule that can match this
    handler's topic on the same broker would take them in and forward them (a loop)."""
    from pigateway.config import is_loopback  # noqa: PLC0415
    from pigateway.mqtt.topics import NAME_SLOT, filter_may_match  # noqa: PLC0415 - ingest only

    local = config.local
    if not config.ingest or local.protocol == "5" or handler.port != local.port:
        return
    if handler.host != local.host and not (is_loopback(handler.host) and
                                           is_loopback(local.host)):
        return
    topic = handler.topic(NAME_SLOT)
    for index, rule in enumerate(config.ingest):
        if filter_may_match(rule.topic, topic):
            shown_topic = shown(handler.template.format(device=handler.target, name="{name}",
                                                        gateway=handler.gateway))
            raise ConfigError(options.key("topic"), (
                f"{shown_topic} on the local broker can match ingest[{index}].topic "
                f"{shown(rule.topic)}, and under local.protocol = '3.1.1' ingest cannot tell "
                "this handler's publishes from a device's (no user properties): they would "
                "be forwarded to the cloud (a loop). Set local.protocol = '5', or narrow "
                f"ingest[{index}].topic or this topic so they cannot match"))


def _check_topic(options: Options, handler: MqttHandler, topic: str) -> None:
    problem = topic_problem(topic)
    if problem is not None:  # target is sound (checked first): the template is the cause
        raise ConfigError(options.key("topic"), f"{shown(handler.template)} makes an invalid "
                          f"topic {shown(topic)}: it {problem}")


def _check_pattern(key: str, value: str, pattern: re.Pattern[str], what: str) -> None:
    if not pattern.match(value):
        raise ConfigError(key, f"{shown(value)} is not {what}")


def _check_template(key: str, template: str) -> None:
    try:
        template.format(device="d", name="n", gateway="g")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(key, f"{shown(template)} is not a topic template: use only "
                          f"{{device}}, {{name}}, {{gateway}} ({shown(exc)})") from exc
