"""What Home Assistant is told about the gateway: pure data, no I/O.

One Home Assistant device per gateway (its identifiers from ``gateway_id``), one entity per
:data:`ENTITIES` entry, each announced by MQTT discovery on
``{discovery_prefix}/{component}/{node}/{key}/config`` (retained). Every entity reads the
one flat state document (:func:`state_document`) on ``{prefix}/{gateway}/homeassistant/state``
with its own ``value_template``, so what HA shows is what the LEDs, ``pigateway status`` and
the metrics show: the same :class:`~pigateway.state.GatewayState` and counters, never a copy
of their rules.

Every entity is available only while ``{prefix}/{gateway}/homeassistant/availability`` says
``online``: the discovery link says so retained once connected, says ``offline`` at a clean
stop, and has ``offline`` as its last will, so every entity goes unavailable when the
gateway dies. That topic, not the uplink's ``state``: the uplink's last will fires when the
uplink session drops (a refused login, a broker restart) while the gateway still runs and
HA could still show why and take a flush.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pigateway.config import Config
from pigateway.text import bounded

#: Characters of a text state (HA keeps states of at most 255 characters).
MAX_STATE_TEXT: Final = 255
#: Home Assistant's own topic, where it says "online" when it (re)starts.
STATUS_LEAF: Final = "status"
ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
#: What a button's command topic takes.
PRESS: Final = "PRESS"
_NOT_ID: Final = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity of the gateway.

    ``key`` is its object id and its field of the state document; ``commands`` the payloads
    its command topic takes (empty: it takes none).
    """

    component: str
    key: str
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    commands: frozenset[str] = frozenset()
    #: announced only when the config has what it shows (``"local"``: an ``[[ingest]]`` rule)
    needs: str | None = None


def _entity(component: str, key: str, name: str, *, device_class: str | None = None,
            state_class: str | None = None, unit: str | None = None, icon: str | None = None,
            diagnostic: bool = False, commands: frozenset[str] = frozenset(),
            needs: str | None = None, **extra: str) -> Entity:
    """One row of :data:`ENTITIES`: HA's options by name, those not given left out."""
    named = {"device_class": device_class, "state_class": state_class,
             "unit_of_measurement": unit, "icon": icon,
             "entity_category": "diagnostic" if diagnostic else None}
    options = {option: value for option, value in named.items() if value is not None} | extra
    return Entity(component, key, name, options, commands, needs)


_MEASURED: Final = "measurement"
_COUNTED: Final = "total_increasing"

#: Every entity, in the order HA lists them.
ENTITIES: Final[tuple[Entity, ...]] = (
    _entity("binary_sensor", "uplink", "Uplink connected", device_class="connectivity"),
    _entity("binary_sensor", "local", "Local link connected", device_class="connectivity",
            needs="local"),
    # the views' words: a fault an operator must fix, or work being turned away
    _entity("binary_sensor", "problem", "Fault", device_class="problem",
            json_attributes_template="{{ {'fault': value_json.fault, "
                                     "'refusing': value_json.refusing} | tojson }}"),
    _entity("switch", "paused", "Paused", icon="mdi:pause-circle",
            commands=frozenset({"ON", "OFF"})),
    _entity("sensor", "depth", "Queue depth", state_class=_MEASURED, unit="commands",
            icon="mdi:tray-full"),
    _entity("sensor", "oldest_age", "Oldest queued age", device_class="duration",
            state_class=_MEASURED, unit="s"),
    _entity("sensor", "dead_letters", "Dead letters", state_class=_MEASURED, unit="commands",
            icon="mdi:email-alert"),
    _entity("sensor", "delivered", "Delivered", state_class=_COUNTED, unit="commands",
            icon="mdi:send-check"),
    _entity("sensor", "forwarded", "Forwarded", state_class=_COUNTED, unit="messages",
            icon="mdi:share"),
    _entity("sensor", "refusals", "Broker refusals", state_class=_COUNTED, unit="batches",
            diagnostic=True),
    _entity("sensor", "last_error", "Last error", icon="mdi:alert-circle", diagnostic=True),
    _entity("sensor", "disk_free", "Disk free", device_class="data_size",
            state_class=_MEASURED, unit="MiB", diagnostic=True),
    _entity("sensor", "version", "Version", icon="mdi:tag", diagnostic=True),
    _entity("button", "flush", "Flush", icon="mdi:send", commands=frozenset({PRESS})),
    _entity("button", "requeue_dead", "Requeue dead letters", icon="mdi:email-sync",
            commands=frozenset({PRESS})),
)

BY_KEY: Final = {entity.key: entity for entity in ENTITIES}


def object_id(text: str) -> str:
    """``text`` as a discovery node or object id (letters, digits, ``_``, ``-``): as it is
    when it fits, else with the rest replaced and a digest of ``text`` appended, so that
    ``gw.1`` and ``gw_1`` (both valid gateway ids) are two HA devices, never one whose
    retained configs each gateway overwrites and each one's retirement removes."""
    fitted = _NOT_ID.sub("_", text)
    if fitted == text:
        return text
    return f"{fitted}_{hashlib.sha256(text.encode()).hexdigest()[:10]}"


class Topics:
    """The topics of one gateway's Home Assistant device."""

    def __init__(self, config: Config) -> None:
        self.prefix = config.homeassistant.discovery_prefix
        self.node = object_id(config.gateway_id)
        self.base = f"{config.mqtt.topic_prefix}/{config.gateway_id}/homeassistant"
        self.availability = f"{self.base}/availability"
        self.state = f"{self.base}/state"
        self.status = f"{self.prefix}/{STATUS_LEAF}"
        self.commands = f"{self.base}/set/+"

    def discovery(self, entity: Entity) -> str:
        return f"{self.prefix}/{entity.component}/{self.node}/{entity.key}/config"

    def command(self, entity: Entity) -> str:
        return f"{self.base}/set/{entity.key}"

    def entity_of(self, topic: str) -> Entity | None:
        """The entity whose command topic ``topic`` is (None: not one of ours)."""
        head = f"{self.base}/set/"
        if not topic.startswith(head):
            return None
        entity = BY_KEY.get(topic[len(head):])
        return entity if entity is not None and entity.commands else None


def announced(config: Config) -> tuple[Entity, ...]:
    """The entities this config shows (the local link only with ``[[ingest]]`` rules)."""
    has = {"local"} if config.ingest else set()
    return tuple(e for e in ENTITIES if e.needs is None or e.needs in has)


def device(config: Config, version: str, model: str) -> dict[str, Any]:
    return {"identifiers": [f"pigateway_{config.gateway_id}"],
            "name": f"pigateway {config.gateway_id}", "manufacturer": "pigateway",
            "model": model, "sw_version": version}


def discovery_document(config: Config, entity: Entity, topics: Topics, version: str,
                       model: str) -> dict[str, Any]:
    """The retained config message of ``entity``."""
    uid = f"pigateway_{topics.node}_{entity.key}"
    doc: dict[str, Any] = {
        "name": entity.name, "unique_id": uid, "object_id": uid,
        "device": device(config, version, model),
        "origin": {"name": "pigateway", "sw_version": version},
        "availability_topic": topics.availability,
        "payload_available": ONLINE.decode(), "payload_not_available": OFFLINE.decode(),
    }
    if entity.component != "button":
        doc["state_topic"] = topics.state
        doc["value_template"] = f"{{{{ value_json.{entity.key} }}}}"
    if "json_attributes_template" in entity.options:
        doc["json_attributes_topic"] = topics.state
    if entity.commands:
        doc["command_topic"] = topics.command(entity)
    if entity.component == "switch":
        doc.update(payload_on="ON", payload_off="OFF", state_on="ON", state_off="OFF")
    if entity.component == "button":
        doc["payload_press"] = PRESS
    doc.update(entity.options)
    return doc


def _on(flag: bool) -> str:
    return "ON" if flag else "OFF"


def state_document(state: Mapping[str, Any], counters: Mapping[str, Any], *, version: str,
                   disk_free: int | None) -> dict[str, Any]:
    """The flat state every entity reads: from ``GatewayState.as_dict()`` and the counters."""
    fault, refusing = state.get("fault"), state.get("refusing")
    last_error = state.get("last_error")
    return {
        "uplink": _on(state.get("link") == "online"),
        "local": _on(state.get("local") == "online"),
        "problem": _on(fault is not None or refusing is not None),
        "fault": None if fault is None else bounded(fault, MAX_STATE_TEXT),
        "refusing": None if refusing is None else bounded(refusing, MAX_STATE_TEXT),
        "paused": _on(bool(state.get("paused"))),
        "depth": int(state.get("depth") or 0),
        "oldest_age": None if state.get("oldest_age") is None
        else round(float(state["oldest_age"]), 1),
        "dead_letters": int(state.get("dead_letters") or 0),
        "delivered": int(counters.get("delivered", 0)),
        "forwarded": int(counters.get("forwarded", 0)),
        "refusals": sum(int(n) for n in dict(counters.get("refusals", {})).values()),
        "last_error": "none" if last_error is None else bounded(last_error, MAX_STATE_TEXT),
        "disk_free": None if disk_free is None else round(disk_free / 2**20, 1),
        "version": version,
    }


__all__ = ["BY_KEY", "ENTITIES", "Entity", "Topics", "announced", "device",
           "discovery_document", "object_id", "state_document"]
