"""Cloud profiles (``[mqtt] profile``): what a cloud broker takes, as a table of data.

A profile is a few defaults (applied only where the config file says nothing) and a few
checks (a config the cloud would refuse fails ``pigateway config check`` naming the key and
the limit). The topics a cloud takes are the wire's (:data:`pigateway.wire.CLOUD_TOPICS`),
checked here against the cloud's limits. QoS 2 is never used by any profile (the gateway
publishes at QoS 1 at most).

The numbers are the clouds' documented quotas:

- AWS IoT Core: 128 KB a message, 100 publishes/s per connection, keepalive 30-1200 s,
  at most 7 slashes and 256 bytes in a topic, no topic under ``$aws``, TLS only.
- Azure IoT Hub (MQTT 3.1.1 only): telemetry only on ``devices/{device_id}/messages/events/``
  (application properties after it as a property bag: we send ``kind=actions`` etc.),
  cloud-to-device on ``devices/{device_id}/messages/devicebound/#``, the client id is the
  device id, the user name ``{hub host}/{device_id}/?api-version=...``, 256 KB a message,
  keepalive at most 1177 s, TLS only. The publish quota is the hub's, shared by devices.
- HiveMQ Cloud: TLS only, a user name and password always; limits in CONNACK (honoured).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pigateway import wire
from pigateway.errors import ConfigError

if TYPE_CHECKING:
    from pigateway.config import Config

#: The profile names ``[mqtt] profile`` takes.
NAMES: Final = ("generic", "aws-iot", "azure-iot-hub", "hivemq-cloud")


class Profile(NamedTuple):
    """One cloud: its defaults, its limits, its topic templates. A named tuple, not a
    dataclass: ``pigateway send`` loads this table (its defaults may name ``[store]``
    keys) and no dataclass (their import and set-up cost a send ~50 million instructions)."""

    name: str
    cloud: str
    #: "section.key" (or "mqtt.tls.enabled") -> value, where the config file sets none
    defaults: Mapping[str, Any] = MappingProxyType({})
    max_message_bytes: int | None = None
    max_messages_per_second: float | None = None
    keepalive: tuple[int, int] | None = None
    tls_required: bool = False
    protocols: tuple[str, ...] = ("5", "3.1.1")
    credentials_required: bool = False
    #: the user name must start with this (formatted with host, gateway)
    username_form: str | None = None
    max_topic_bytes: int | None = None
    max_topic_slashes: int | None = None
    reserved_prefixes: tuple[str, ...] = ()


PROFILES: Final[dict[str, Profile]] = {
    "generic": Profile("generic", "any MQTT broker"),
    "aws-iot": Profile(
        "aws-iot", "AWS IoT Core",
        defaults={"mqtt.port": 8883, "mqtt.tls.enabled": True, "mqtt.keepalive": 30,
                  "uplink.max_batch_bytes": 128 * 1024, "uplink.max_messages_per_second": 100},
        max_message_bytes=128 * 1024, max_messages_per_second=100, keepalive=(30, 1200),
        tls_required=True, max_topic_bytes=256, max_topic_slashes=7,
        reserved_prefixes=("$aws",)),
    "azure-iot-hub": Profile(
        "azure-iot-hub", "Azure IoT Hub",
        defaults={"mqtt.port": 8883, "mqtt.tls.enabled": True, "mqtt.protocol": "3.1.1",
                  "uplink.max_batch_bytes": 256 * 1024, "uplink.max_messages_per_second": 100},
        max_message_bytes=256 * 1024, keepalive=(5, 1177), tls_required=True,
        protocols=("3.1.1",), username_form="{host}/{gateway}/?api-version="),
    "hivemq-cloud": Profile(
        "hivemq-cloud", "HiveMQ Cloud", defaults={"mqtt.port": 8883, "mqtt.tls.enabled": True},
        tls_required=True, credentials_required=True),
}


def get(name: str) -> Profile:
    return PROFILES[name]


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The raw config mapping with the profile's defaults where the file sets nothing."""
    mqtt = data.get("mqtt")
    name = mqtt.get("profile", "generic") if isinstance(mqtt, dict) else "generic"
    if not isinstance(name, str) or name not in PROFILES:  # a list or table is unhashable
        return data  # the validator names the bad profile
    data = _copy(data)
    for dotted, value in PROFILES[name].defaults.items():
        *sections, key = dotted.split(".")
        table = data
        for section in sections:
            table = table.setdefault(section, {})
            if not isinstance(table, dict):
                break
        else:
            table.setdefault(key, value)
    return data


def _copy(table: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in table.items()}


# --------------------------------------------------------------------------- the checks


def _refuse(profile: Profile, key: str, value: Any, limit: str) -> ConfigError:
    return ConfigError(key, f"{value!r} is refused by {profile.cloud} (mqtt.profile = "
                       f"{profile.name!r}): {limit}")


def _size(p: Profile, c: Config) -> None:
    if p.max_message_bytes and c.uplink.max_batch_bytes > p.max_message_bytes:
        raise _refuse(p, "uplink.max_batch_bytes", c.uplink.max_batch_bytes,
                      f"a message is at most {p.max_message_bytes} bytes")


def _rate(p: Profile, c: Config) -> None:
    rate = c.uplink.max_messages_per_second
    if p.max_messages_per_second and not 0 < rate <= p.max_messages_per_second:
        raise _refuse(p, "uplink.max_messages_per_second", rate,
                      f"at most {p.max_messages_per_second:g} publishes/s per connection "
                      "(0, no limit, would be throttled)")


def _keepalive(p: Profile, c: Config) -> None:
    if p.keepalive and not p.keepalive[0] <= c.mqtt.keepalive <= p.keepalive[1]:
        raise _refuse(p, "mqtt.keepalive", c.mqtt.keepalive,
                      f"keepalive from {p.keepalive[0]} to {p.keepalive[1]} seconds")


def _tls(p: Profile, c: Config) -> None:
    if p.tls_required and not c.mqtt.tls.enabled:
        raise _refuse(p, "mqtt.tls.enabled", False, "TLS only")


def _protocol(p: Profile, c: Config) -> None:
    if c.mqtt.protocol not in p.protocols:
        raise _refuse(p, "mqtt.protocol", c.mqtt.protocol,
                      f"MQTT {' or '.join(p.protocols)} only")


def _credentials(p: Profile, c: Config) -> None:
    if p.credentials_required and not c.mqtt.username:
        raise _refuse(p, "mqtt.username", None, "a user name and password are required")


def _username(p: Profile, c: Config) -> None:
    if p.username_form is None or c.mqtt.username is None:
        return
    form = p.username_form.format(host=c.mqtt.host, gateway=c.gateway_id)
    if not c.mqtt.username.startswith(form):
        raise _refuse(p, "mqtt.username", c.mqtt.username,
                      f"the user name is {form}<version> (host, then the device id = gateway_id)")


def _topics(p: Profile, c: Config) -> None:
    for leaf in wire.TOPICS:
        where = wire.topic(c, leaf)
        if p.max_topic_bytes and len(where.encode()) > p.max_topic_bytes:
            raise _refuse(p, "mqtt.topic_prefix", c.mqtt.topic_prefix,
                          f"a topic is at most {p.max_topic_bytes} bytes ({where!r})")
        if p.max_topic_slashes is not None and where.count("/") > p.max_topic_slashes:
            raise _refuse(p, "mqtt.topic_prefix", c.mqtt.topic_prefix,
                          f"a topic has at most {p.max_topic_slashes} slashes ({where!r})")
        if any(where.lower().startswith(reserved) for reserved in p.reserved_prefixes):
            raise _refuse(p, "mqtt.topic_prefix", c.mqtt.topic_prefix,
                          f"topics under {', '.join(p.reserved_prefixes)} are reserved")


#: Every check a profile's cloud makes of a config, in the order they are reported.
CHECKS: Final[tuple[Callable[[Profile, Config], None], ...]] = (
    _tls, _protocol, _credentials, _username, _keepalive, _size, _rate, _topics)


def check(config: Config) -> None:
    """Raise :class:`ConfigError` (key and limit) if the profile's cloud would refuse it."""
    profile = PROFILES[config.mqtt.profile]
    for rule in CHECKS:
        rule(profile, config)
