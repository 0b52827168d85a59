"""The wire contract in one place: topics, the version, the documents and their JSON.

Everything the gateway puts on the broker, or takes from it, is shaped here:

- topics ``{prefix}/{gateway}/{actions,results,commands,state}`` (:func:`topic`), or a
  cloud's own form of them (:data:`CLOUD_TOPICS`, by ``[mqtt] profile``);
- version ``"v": 1`` in every document (:data:`VERSION`), checked on inbound commands;
- a batch of actions ``{"v","gateway","batch","sent_at","actions":[{"device","commands":
  [{"id","name","params","queued_at"}]}]}`` (:func:`batch_head`, :func:`action`,
  :func:`batch_command`; :mod:`pigateway.uplink.batching` packs them to a byte limit);
- a result: the stored params of a ``result`` row, sent as they are;
- the retained state ``{"v","gateway","version","sent_at",<state fields>,"counters"}``
  (:func:`state_document`), and the last will / clean-stop value ``"offline"``;
- JSON: compact, UTF-8 as is, no NaN or Infinity (:func:`encode`), the one encoder for
  what is sent and what is stored to be sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pigateway.text import bounded, fit_json

if TYPE_CHECKING:
    from pigateway.config import Config

#: The version of every document of the contract.
VERSION: Final = 1
#: The topic template of each message kind (``{prefix}``: ``mqtt.topic_prefix``,
#: ``{gateway}``: ``gateway_id``); a cloud profile replaces some (:data:`CLOUD_TOPICS`).
TOPICS: Final = {
    "actions": "{prefix}/{gateway}/actions",
    "results": "{prefix}/{gateway}/results",
    "commands": "{prefix}/{gateway}/commands",
    "state": "{prefix}/{gateway}/state",
    "manage": "{prefix}/{gateway}/manage",
}
_AZURE_EVENTS: Final = "devices/{gateway}/messages/events/"
#: The templates a cloud (``[mqtt] profile``, :mod:`pigateway.wire.profiles`) puts in place of
#: :data:`TOPICS`'s. They are the wire on that cloud, so they live here, with the contract;
#: the profile's checks (topic length, slashes, reserved prefixes) read them through
#: :func:`topic`. Azure IoT Hub takes telemetry only on the device's events topic (the kind
#: as a property bag after it) and sends commands on its devicebound topic.
CLOUD_TOPICS: Final[dict[str, dict[str, str]]] = {
    "azure-iot-hub": {"actions": _AZURE_EVENTS + "kind=actions",
                      "results": _AZURE_EVENTS + "kind=results",
                      "state": _AZURE_EVENTS + "kind=state",
                      "commands": "devices/{gateway}/messages/devicebound/#"},
}
#: The retained state while the gateway is not connected (last will, clean stop).
OFFLINE: Final = b'"offline"'
#: The state fields the retained state document carries (from :class:`GatewayState`).
STATE_FIELDS: Final = ("link", "local", "paused", "draining", "depth", "oldest_age", "in_flight",
                       "acked", "dead_letters", "last_error", "fault", "limits", "uptime")

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
#: A string as :data:`_ENCODER` writes it (its own function for strings, without the
#: encoder's dispatch)
_string: Final = json.encoder.encode_basestring
#: The C encoder ``_ENCODER`` builds at every call, built once (and without the circular
#: check's table of ids, whose cost is per container): half the instructions of a small
#: document, which a put pays once a command. Whatever it refuses, ``_ENCODER`` encodes
#: again to say why in its own words (a circular value: ``ValueError``, not RecursionError).
_MAKE_C_ENCODER: Callable[..., Callable[[Any, int], list[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None)
_FAST: Final = None if _MAKE_C_ENCODER is None else _MAKE_C_ENCODER(
    None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False,
    False)


def encode(value: Any) -> str:
    """Compact JSON, non-ASCII kept as is, NaN and Infinity refused (``ValueError``)."""
    if _FAST is not None:
        try:
            return "".join(_FAST(value, 0))
        except (TypeError, ValueError, RecursionError):
            pass
    return _ENCODER.encode(value)


def topic(config: Config, leaf: str) -> str:
    """The full topic of ``leaf`` ("actions", "results", "commands", "state"): the profile's
    template for it (:data:`CLOUD_TOPICS`), else :data:`TOPICS`'s."""
    template = CLOUD_TOPICS.get(config.mqtt.profile, {}).get(leaf, TOPICS[leaf])
    return template.format(prefix=config.mqtt.topic_prefix, gateway=config.gateway_id)


def batch_head(gateway: str, batch_id: str, sent_at: float) -> str:
    """A batch document up to its first action (the caller appends actions and ``]}``)."""
    return (f'{{"v":{VERSION},"gateway":{encode(gateway)},"batch":{encode(batch_id)},'
            f'"sent_at":{sent_at:.3f},"actions":[')


def batch_tail() -> str:
    return "]}"


def action(device: str, commands: list[str]) -> str:
    """One action of a batch: a device and its encoded commands, in order."""
    return f'{{"device":{encode(device)},"commands":[{",".join(commands)}]}}'


def batch_command(command_id: str, name: str, params: dict[str, Any], queued_at: float) -> str:
    """One command inside an action: ``{"id","name","params","queued_at"}``."""
    return encode({"id": command_id, "name": name, "params": params, "queued_at": queued_at})


def batch_command_stored(command_id: str, name: str, params_json: str, queued_at: float) -> str:
    """:func:`batch_command` with ``params`` already encoded (as the queue stores them, by
    :func:`encode`): the same text, spliced instead of decoded and encoded again."""
    if type(queued_at) is not float or queued_at - queued_at != 0.0:  # not a finite float
        return batch_command(command_id, name, json.loads(params_json), queued_at)
    return (f'{{"id":{_string(command_id)},"name":{_string(name)},"params":{params_json},'
            f'"queued_at":{queued_at!r}}}')


def state_document(gateway: str, version: str, state: dict[str, Any],
                   counters: dict[str, Any], sent_at: float) -> dict[str, Any]:
    """The retained state: what every view shows, and the counters since start."""
    return {"v": VERSION, "gateway": gateway, "version": version,
            "sent_at": round(sent_at, 3), **{key: state.get(key) for key in STATE_FIELDS},
            "counters": counters}


def result_document(command_id: str, status: str, detail: Any = None, *, max_bytes: int,
                    now: float | None = None) -> dict[str, Any]:
    """The wire contract's result: ``{"v":1,"id","status","detail"?,"finished_at"}``.

    It always fits ``max_bytes`` (``store.max_params_bytes``) as stored JSON: a text detail
    is :func:`~pigateway.text.bounded` and cut to the room left, and a detail that cannot be
    encoded or does not fit is replaced by a note saying so. So recording a result, which
    is what finishes a command, never fails because of what the command or handler said.
    """
    document: dict[str, Any] = {"v": 1, "id": command_id, "status": status}
    document["finished_at"] = round(time.time() if now is None else now, 3)
    if detail is None:
        return document
    room = max_bytes - _size(document) - len(',"detail":')
    document = {**document, "detail": _fitted(detail, room)}
    document["finished_at"] = document.pop("finished_at")  # the contract's key order
    return document


def _fitted(detail: Any, room: int) -> Any:
    """``detail`` as it can be stored in ``room`` bytes of JSON."""
    if not isinstance(detail, str):
        try:
            if _size(detail) <= room:
                return detail
            detail = f"(a detail of {_size(detail)} bytes was left out: it did not fit " \
                     "store.max_params_bytes)"
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError):
            detail = bounded(detail)
    return fit_json(bounded(detail), room)


def _size(value: Any) -> int:
    return len(encode(value).encode("utf-8"))
