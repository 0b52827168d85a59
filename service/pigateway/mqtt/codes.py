"""The MQTT reason codes and bounds the service acts on, and aiomqtt's errors as ours.

What a PUBACK failure code means for its message (retry or dead letter), which DISCONNECT
codes mean "slow down", which CONNACK codes mean "fix the credentials", and the size rules
every outgoing PUBLISH is checked against (:func:`check_publish`). A new code to act on is
one line in a table here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Final, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.properties import VariableByteIntegers

from pigateway.errors import (
    LinkFault,
    LoginRefused,
    PacketTooLarge,
    RetainNotSupported,
    UplinkError,
)

#: MQTT's variable byte integer (paho's encoder, untyped there)
_varint: Callable[[int], bytes] = VariableByteIntegers.encode

#: An MQTT 5 PUBACK failure code (>= 0x80) and what it means for the message it answers:
#: ``retry`` (the broker cannot take it *now*) or ``dead-letter`` (it will never be taken).
#: A success code (< 0x80, e.g. 0x10 "no matching subscribers") means delivered. A failure
#: code missing here is retried: nothing is lost to a code nobody foresaw.
PUBACK_REFUSALS: Final[dict[int, tuple[str, Literal["retry", "dead-letter"]]]] = {
    0x80: ("unspecified error", "retry"),
    0x83: ("implementation specific error", "retry"),
    0x87: ("not authorized", "dead-letter"),
    0x89: ("server busy", "retry"),
    0x90: ("topic name invalid", "dead-letter"),
    0x91: ("packet identifier in use", "retry"),
    0x95: ("packet too large", "dead-letter"),
    0x96: ("message rate too high", "retry"),
    0x97: ("quota exceeded", "retry"),
    0x99: ("payload format invalid", "dead-letter"),
}
#: DISCONNECT reason codes from the server that mean "slow down": the link is retried with
#: a backoff that keeps growing while they continue (never started over at once).
SLOW_DOWN: Final = {0x80: "unspecified error", 0x83: "implementation specific error",
                    0x89: "server busy", 0x93: "receive maximum exceeded",
                    0x96: "message rate too high", 0x97: "quota exceeded",
                    0x9F: "connection rate exceeded"}
#: CONNACK reason codes that mean "fix the credentials": a fault, retried at the cap.
#: (paho reports MQTT 3.1.1's return codes 4 and 5 as these MQTT 5 codes too.)
LOGIN_REFUSED: Final = {134: "bad user name or password", 135: "not authorised",
                        138: "banned", 140: "bad authentication method"}
#: CONNACK 0x9A: the broker does not take a retained message (our last will is one).
RETAIN_NOT_SUPPORTED: Final = 0x9A
#: Words in a connection error that mean an operator must act (TLS set-up), not wait.
TLS_FAULTS: Final = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed",
                     "hostname mismatch", "doesn't match", "TLSV1_ALERT", "SSLV3_ALERT",
                     "PEM lib", "No such file")
#: Bytes a PUBLISH adds around its payload (fixed header, topic length, packet id, props).
PUBLISH_OVERHEAD: Final = 16
#: MQTT's own bounds: a topic's UTF-8 bytes, a packet's Remaining Length.
MAX_TOPIC_BYTES: Final = 65_535
MAX_REMAINING_LENGTH: Final = 268_435_455
#: MQTT's largest packet: the largest Remaining Length behind a 5-byte fixed header.
MQTT_MAX_PACKET: Final = MAX_REMAINING_LENGTH + 5
#: What a packet limit keeps beside twice its payload bound: the longest topic (64 KiB)
#: and a message's properties (user properties, content type) with room to spare.
PACKET_ROOM: Final = 128 * 1024
#: Seconds a clean DISCONNECT may take before the socket is closed anyway.
LEAVE_BOUND: Final = 5.0
#: Inbound packets read at most per readiness of the socket (then other tasks run).
READ_BUDGET: Final = 64
#: Socket reads at most toward one packet per readiness (then other tasks run): a packet
#: near our limit, or one over it being read past, never holds the loop for long.
RECVS_PER_PACKET: Final = 16
#: The topic of an inbound message whose topic is not UTF-8 (no rule matches it).
NOT_UTF8: Final = "\ufffd"

def refusal(code: int) -> tuple[str, Literal["retry", "dead-letter"]]:
    """The name of a PUBACK failure code and what it means (:data:`PUBACK_REFUSALS`)."""
    return PUBACK_REFUSALS.get(code, (f"reason code 0x{code:02X}", "retry"))


def describe(code: int) -> str:
    """A PUBACK reason code for people: ``0x87 (not authorized)``."""
    return f"0x{code:02X} ({refusal(code)[0]})"


def publish_room(max_packet_size: int, where: str) -> int:
    """Payload bytes a PUBLISH on ``where`` may carry under the broker's ``max_packet_size``.

    The topic travels UTF-8 encoded: its bytes count, not its characters.
    """
    return max_packet_size - PUBLISH_OVERHEAD - len(where.encode())


def packet_limit(payload_bound: int) -> int:
    """The Maximum Packet Size we take on a connection whose messages the config bounds at
    ``payload_bound`` bytes (``store.max_params_bytes`` for ingest,
    ``inbound.max_payload_bytes`` for the uplink): twice the bound plus
    :data:`PACKET_ROOM`. A message between the bound and the limit still reaches us and is
    refused with a record (dead-lettered, answered ``rejected``); one past the limit is
    dropped by an MQTT 5 broker before it is sent, or read past by ours without being held
    (:class:`~pigateway.mqtt.stream.PacketBuffer`). On a Pi Zero's 512 MB, one packet
    never costs more than this, whatever a broker or a device sends."""
    return min(2 * payload_bound + PACKET_ROOM, MQTT_MAX_PACKET)


#: The limit of a connection with no payload bound of its own in the config (a local
#: publisher, which reads acknowledgements only; Home Assistant's link): the default bound's.
DEFAULT_PACKET_LIMIT: Final = packet_limit(64 * 1024)


def check_publish(topic: bytes, payload: bytes, *, qos: int, properties: bytes | None,
                  max_packet_size: int | None) -> int:
    """The whole PUBLISH packet's size, checked against MQTT and the broker's limit.

    The one check every outgoing PUBLISH passes (:meth:`Connection.publish_now`): batches,
    results, forwards, the state document. ``properties``: the packed MQTT 5 properties
    with their length (``b"\\x00"`` for none), ``None`` under MQTT 3.1.1. Raises
    :class:`PacketTooLarge` naming the limit, so one message fails alone instead of making
    the broker drop the link (or paho raise) for everything behind it.
    """
    if len(topic) > MAX_TOPIC_BYTES:
        raise PacketTooLarge(f"its topic is {len(topic):,} bytes, MQTT allows "
                             f"{MAX_TOPIC_BYTES:,}", limit=f"MQTT topic {MAX_TOPIC_BYTES:,} bytes")
    remaining = 2 + len(topic) + (2 if qos else 0) + len(properties or b"") + len(payload)
    if remaining > MAX_REMAINING_LENGTH:
        raise PacketTooLarge(f"a PUBLISH of {remaining:,} bytes, MQTT allows "
                             f"{MAX_REMAINING_LENGTH:,}",
                             limit=f"MQTT packet {MAX_REMAINING_LENGTH:,} bytes")
    size = 1 + len(_varint(remaining)) + remaining
    if max_packet_size is not None and size > max_packet_size:
        raise PacketTooLarge(f"a PUBLISH of {size:,} bytes, over the broker's Maximum Packet "
                             f"Size of {max_packet_size} bytes",
                             limit=f"broker max_packet_size {max_packet_size} bytes")
    return size


def classify(exc: aiomqtt.MqttError) -> UplinkError:
    """The typed error for an MQTT failure: a fault to fix, or a link to wait for."""
    code = getattr(exc, "rc", None)
    value = getattr(code, "value", code)
    if isinstance(exc, MqttConnectError) and value in LOGIN_REFUSED:
        return LoginRefused(f"login refused by the broker: {LOGIN_REFUSED[value]} "
                            "(check mqtt.username and the password: mqtt.password_file, "
                            "else /etc/credstore/pigateway.mqtt-password)")
    if isinstance(exc, MqttConnectError) and value == RETAIN_NOT_SUPPORTED:
        return RetainNotSupported("the broker does not take retained messages (CONNACK 0x9A "
                                  "retain not supported)")
    text = str(exc)
    if any(word in text for word in TLS_FAULTS):
        return LinkFault(f"TLS failed: {text}")
    return UplinkError(text or type(exc).__name__)


@contextlib.contextmanager
def _translated(what: str = "") -> Iterator[None]:
    """aiomqtt's and paho's errors as :func:`classify` types (``what`` goes in front)."""
    try:
        yield
    except aiomqtt.MqttError as exc:
        error = classify(exc)
        if what:
            raise UplinkError(f"{what}: {error}") from exc
        raise error from exc

