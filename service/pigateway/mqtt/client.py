"""The MQTT connection, and the one file that uses private members of aiomqtt or paho.

Re-read this file at every upgrade of aiomqtt or paho.

What the rest of the service sees is a :class:`Connection` opened with :func:`connect` (an
async context manager): ``deliver`` (publish and wait for the PUBACK, returning its failure
code), manual ``ack`` of inbound messages, ``messages``, ``subscribe``, ``when_lost``, and
what the broker said in CONNACK (``max_packet_size``, ``session_present``). Every aiomqtt or
paho error becomes a :mod:`pigateway.errors` type
(:func:`~pigateway.mqtt.codes.classify`): ``LoginRefused`` and ``LinkFault`` for what an
operator must fix, ``UplinkError`` for a link to wait for.

aiomqtt 2.5 drops two facts we need, so :class:`_Client` keeps them: the reason code of each
PUBACK, and the broker's Maximum Packet Size from CONNACK. Doing that, and two repairs
(a PUBACK code paho refuses, a close before CONNACK), needs private members of aiomqtt and
paho: every one is named in :data:`PRIVATE_API`, and ``tests/test_mqtt_private_api.py``
fails by name when an upgrade moves one.

One packet, one failure: an inbound PUBLISH paho cannot decode (mosquitto passes U+FEFF in a
user property; paho refuses it), or whose handling raises, is that message's failure and
never the link's. It reaches the consumer as a :class:`~pigateway.mqtt.packets.Undecodable`
payload (its raw bytes, bounded, and why) and is acknowledged like any other message, by
the consumer, once it recorded it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, NamedTuple, cast

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, writeInt32, writeUTF
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from pigateway.errors import (
    UplinkError,
)
from pigateway.mqtt.codes import (
    DEFAULT_PACKET_LIMIT,
    LEAVE_BOUND,
    NOT_UTF8,
    PUBACK_REFUSALS,
    READ_BUDGET,
    RECVS_PER_PACKET,
    SLOW_DOWN,
    _translated,
    _varint,
    check_publish,
    classify,
)
from pigateway.mqtt.forwarded import Extras
from pigateway.mqtt.packets import (
    PublishHead,
    TooLarge,
    Undecodable,
    publish_head,
    without_properties,
)
from pigateway.mqtt.readahead import Message, ReadAhead
from pigateway.mqtt.stream import (
    PLAIN_PUBACK_CODES,
    Cut,
    PacketBuffer,
    ProtocolError,
    plain_puback,
    plain_publish,
)
from pigateway.text import bounded


class PrivateMember(NamedTuple):
    """A private member of aiomqtt or paho this module relies on, and why."""

    owner: Literal["aiomqtt.Client", "paho.Client"]
    name: str
    kind: Literal["method", "attribute"]
    #: a method's parameter names after ``self``; an attribute's type name
    shape: tuple[str, ...] | str
    why: str


#: Every private member of aiomqtt 2.5 / paho 2.2 used here, in one place.
PRIVATE_API: Final = (
    PrivateMember("aiomqtt.Client", "_client", "attribute", "Client",
                  "the paho client: manual acks, publish without aiomqtt's wait, the socket"),
    PrivateMember("aiomqtt.Client", "_connected", "attribute", "Future",
                  "fail the CONNACK wait when the broker closes first"),
    PrivateMember("aiomqtt.Client", "_disconnected", "attribute", "Future",
                  "notice a lost link while waiting for a PUBACK; when_lost"),
    PrivateMember("aiomqtt.Client", "_pending_publishes", "attribute", "dict",
                  "register a publish so aiomqtt's PUBACK callback wakes deliver()"),
    PrivateMember("aiomqtt.Client", "_on_connect", "method",
                  ("client", "userdata", "flags", "reason_code", "properties"),
                  "overridden: keep CONNACK's Maximum Packet Size and session present"),
    PrivateMember("aiomqtt.Client", "_on_disconnect", "method",
                  ("client", "userdata", "flags", "reason_code", "properties"),
                  "overridden: a close before CONNACK fails the connect instead of hanging"),
    PrivateMember("aiomqtt.Client", "_on_publish", "method",
                  ("client", "userdata", "mid", "reason_code", "properties"),
                  "overridden: keep each PUBACK's failure reason code"),
    PrivateMember("aiomqtt.Client", "_on_message", "method", ("client", "userdata", "message"),
                  "overridden: inbound messages go to the bounded ReadAhead, not aiomqtt's queue"),
    PrivateMember("aiomqtt.Client", "_on_socket_open", "method", ("client", "userdata", "sock"),
                  "extended: our own socket reader, which the ReadAhead can pause"),
    PrivateMember("aiomqtt.Client", "_on_socket_close", "method", ("client", "userdata", "sock"),
                  "extended: a paused reader is never resumed on a closed socket"),
    PrivateMember("aiomqtt.Client", "_loop", "attribute", "_UnixSelectorEventLoop",
                  "the loop aiomqtt registered the socket's reader with"),
    PrivateMember("paho.Client", "_handle_pubackcomp", "method", ("cmd",),
                  "wrapped: a PUBACK with 0x89/0x95/0x96 is a refusal, not a broken link"),
    PrivateMember("paho.Client", "_check_keepalive", "method", (),
                  "wrapped: a read the ReadAhead paused is no dead broker (its PINGRESP waits)"),
    PrivateMember("paho.Client", "_ping_t", "attribute", "float",
                  "cleared while reading is paused: the PINGRESP is unread, not missing"),
    PrivateMember("paho.Client", "_last_bytes_received", "attribute", "float",
                  "renewed while reading is paused (paho's keepalive check)"),
    PrivateMember("paho.Client", "_packet_read", "method", (),
                  "called: a packet paho's own reader began before ours took the socket"),
    PrivateMember("paho.Client", "_sock_recv", "method", ("bufsize",),
                  "called: the socket read in chunks (TLS's want-read mapped as paho maps it)"),
    PrivateMember("paho.Client", "_easy_log", "method", ("level", "fmt", "args"),
                  "called: a failed read said as paho's reader says it (its logger, its level)"),
    PrivateMember("paho.Client", "_msgtime_mutex", "attribute", "lock",
                  "guard _last_bytes_received as paho does when bytes came in"),
    PrivateMember("paho.Client", "_out_packet", "attribute", "deque",
                  "the packets waiting to be written, joined into one write"),
    PrivateMember("paho.Client", "_packet_write", "method", (),
                  "wrapped: the packets waiting are joined first (one send, not one each)"),
    PrivateMember("paho.Client", "_loop_rc_handle", "method", ("rc",),
                  "called: a failed read ends the link as loop_read would"),
    PrivateMember("paho.Client", "_in_packet", "attribute", "dict",
                  "a packet cut from our buffer handed to paho; the raw PUBACK paho refused"),
    PrivateMember("paho.Client", "_out_message_mutex", "attribute", "RLock",
                  "guard paho's outgoing messages as paho does"),
    PrivateMember("paho.Client", "_out_messages", "attribute", "OrderedDict",
                  "whether the refused PUBACK answers a message of ours"),
    PrivateMember("paho.Client", "_do_on_publish", "method",
                  ("mid", "reason_code", "properties"),
                  "finish that message with the refusal's code"),
    PrivateMember("paho.Client", "_sock_close", "method", (),
                  "close a hung connection without a DISCONNECT (abort)"),
    PrivateMember("paho.Client", "_packet_handle", "method", (),
                  "wrapped: an acknowledgement, CONNACK or DISCONNECT is read again "
                  "without the properties paho refuses (its codes and limits kept)"),
    PrivateMember("paho.Client", "_handle_publish", "method", (),
                  "wrapped: a PUBLISH paho cannot decode fails alone, not the link"),
    PrivateMember("paho.Client", "_handle_pubrel", "method", (),
                  "wrapped: with manual acks, every PUBREL is completed (PUBCOMP) at once"),
    PrivateMember("paho.Client", "_send_pubrec", "method", ("mid",),
                  "a QoS 2 message acknowledged (PUBREC) only after its consumer's commit"),
    PrivateMember("paho.Client", "_send_pubcomp", "method", ("mid",),
                  "complete a PUBREL, also one for a message of an earlier connection"),
    PrivateMember("paho.Client", "_in_message_mutex", "attribute", "lock",
                  "guard paho's QoS 2 messages waiting for their PUBREL as paho does"),
    PrivateMember("paho.Client", "_in_messages", "attribute", "OrderedDict",
                  "mark an undecodable QoS 2 message that waits for its PUBREL"),
)

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.mqtt")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True)
class Settings:
    """How to connect: the broker, who we are, and the session we want.

    ``persistent``: a session the broker keeps (``session_expiry`` seconds under MQTT 5)
    and manual acks of inbound messages; else a clean session, acked by paho.
    ``timeout`` bounds the CONNACK wait and each subscribe.
    """

    host: str
    port: int
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    protocol: Literal["5", "3.1.1"] = "3.1.1"
    will: Will | None = None
    persistent: bool = False
    session_expiry: int = 0
    keepalive: int = 60
    timeout: float = 10.0
    tls: ssl.SSLContext | None = None
    max_inflight: int | None = None
    #: MQTT 5 Receive Maximum: unacknowledged QoS 1/2 messages the broker may send us
    receive_maximum: int | None = None
    #: inbound messages held at most before reading the socket pauses (:class:`ReadAhead`);
    #: ``None``: never paused. Only for a connection that waits on no inbound packet of its
    #: own (ingest's): a paused socket holds back PUBACKs and PINGRESPs as well, so the
    #: uplink, whose forwarding waits for PUBACKs on the socket its commands come in on,
    #: must not pause (its inbound commands are bounded by the broker's in-flight limit)
    read_ahead: int | None = None
    #: the largest packet we take, fixed header included: our CONNECT says it (MQTT 5, so a
    #: compliant broker drops a bigger message for us), and our reader holds no packet past
    #: it whatever the broker (:func:`~pigateway.mqtt.codes.packet_limit`)
    max_packet_size: int = DEFAULT_PACKET_LIMIT


def _extras(message: paho.MQTTMessage) -> Extras:
    """Retain flag, content type, user properties and expiry of an inbound message."""
    props = getattr(message, "properties", None)
    if props is None:
        return Extras(retain=bool(message.retain))
    users = tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", []) or [])
    expiry = getattr(props, "MessageExpiryInterval", None)
    content = getattr(props, "ContentType", None)
    return Extras(retain=bool(message.retain),
                  content_type=None if content is None else str(content),
                  user_properties=users, expiry=None if expiry is None else int(expiry))


def _topic(message: paho.MQTTMessage) -> str:
    try:
        return message.topic
    except UnicodeDecodeError:  # a broker should have refused it; ending the link would not
        log.warning("mqtt: a message whose topic is not UTF-8 came in; it is acknowledged "
                    "and ignored")
        return NOT_UTF8


def _inbound(message: paho.MQTTMessage) -> Message:
    """paho's message as ours, without aiomqtt's own wrapper in between."""
    return Message(_topic(message), bytes(message.payload), message.mid, message.qos,
                   _extras(message))




def _properties(extras: Extras) -> Properties | None:
    """``extras`` as MQTT 5 PUBLISH properties (None when there are none)."""
    if extras.content_type is None and not extras.user_properties and extras.expiry is None:
        return None
    return _PublishProperties(extras)


#: paho's encoders (untyped there), as :meth:`Properties.pack` uses them
_utf8: Callable[[str], bytes] = writeUTF
_int32: Callable[[int], bytes] = writeInt32


class _PublishProperties(Properties):
    """PUBLISH properties packed once, with paho's own encoders and in paho's order (the
    bytes :meth:`Properties.pack` makes: tests/test_mqtt_private_api.py compares them).

    paho's ``Properties`` builds its name tables for every instance and scans them for every
    attribute set and at every ``pack()``: ~60 us a message here, for each forwarded one.
    paho calls nothing but ``pack()`` on a PUBLISH's properties (at the first send and at
    a resend after a reconnect).
    """

    def __init__(self, extras: Extras) -> None:  # not super().__init__(): see above
        body = b""
        if extras.expiry is not None:  # Message Expiry Interval (2)
            body += _varint(2) + _int32(max(1, extras.expiry))
        if extras.content_type is not None:  # Content Type (3)
            body += _varint(3) + _utf8(extras.content_type)
        for key, value in extras.user_properties:  # User Property (38)
            body += _varint(38) + _utf8(key) + _utf8(value)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", _varint(len(body)) + body)

    packed: bytes

    def pack(self) -> bytes:
        return self.packed


class _Confirmation:
    """One publish's wait for its PUBACK, the link's end or a timeout: one future and two
    callbacks, not three tasks (``first_of``), as the drain does it for every message.

    aiomqtt calls :meth:`set` (as it would an ``asyncio.Event``'s) when the PUBACK came.
    """

    __slots__ = ("confirmed", "future")

    def __init__(self) -> None:
        self.confirmed = False
        self.future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        self.confirmed = True
        if not self.future.done():
            self.future.set_result(0)

    async def wait(self, ended: asyncio.Future[Any], timeout: float) -> int | None:
        """0: the PUBACK came (it wins over the rest, like ``first_of``'s lowest index);
        1: ``ended`` (the link) is done first; ``None``: ``timeout`` passed."""
        future = self.future

        def link_ended(_: asyncio.Future[Any]) -> None:
            if not future.done():
                future.set_result(1)

        def timed_out() -> None:
            if not future.done():
                future.set_result(None)

        ended.add_done_callback(link_ended)
        timer = future.get_loop().call_later(timeout, timed_out)
        try:
            winner = await future
        finally:
            timer.cancel()
            ended.remove_done_callback(link_ended)
        return 0 if self.confirmed else winner


# --------------------------------------------------------------------------- CONNACK


#: CONNACK properties (MQTT 5) that limit what we may send, with their default when the
#: broker leaves one out: (paho's property name, BrokerLimits field, default).
CONNACK_LIMITS: Final = (
    ("ReceiveMaximum", "receive_maximum", 65535),
    ("MaximumQoS", "maximum_qos", 2),
    ("RetainAvailable", "retain_available", 1),
    ("TopicAliasMaximum", "topic_alias_maximum", 0),
)


@dataclass(frozen=True)
class BrokerLimits:
    """What the broker said in CONNACK about what it takes (MQTT 5; 3.1.1 says nothing,
    so the defaults are the protocol's own: no limit, QoS 2, retain available)."""

    receive_maximum: int = 65535
    maximum_qos: int = 2
    retain_available: int = 1
    topic_alias_maximum: int = 0

    @classmethod
    def from_connack(cls, properties: Properties | None) -> BrokerLimits:
        values = {field: int(getattr(properties, name, default)) if properties is not None
                  else default for name, field, default in CONNACK_LIMITS}
        return cls(**values)

    @property
    def retain(self) -> bool:
        return bool(self.retain_available)


# --------------------------------------------------------------------------- the client


def _read_again(inner: paho.Client, handle: Callable[[], MQTTErrorCode],
                rewrite: Callable[[Exception], bytes | None]) -> Callable[[], MQTTErrorCode]:
    """paho's packet handler ``handle``, which, when it fails on the packet paho read,
    reads that packet once more as ``rewrite`` makes it from the error (``None``: the
    failure stands, and ends the link as paho would)."""

    def again() -> MQTTErrorCode:
        try:
            return handle()
        except Exception as exc:
            packet = rewrite(exc)
            if packet is None:
                raise
            inner._in_packet["packet"] = bytearray(packet)
            return handle()
    return again


class _ReadingClient(aiomqtt.Client):
    """aiomqtt's client reading its socket itself: a chunk at a time cut into packets
    (:mod:`pigateway.mqtt.stream`), a plain PUBLISH and a success PUBACK handled without
    paho's per-message objects, every other packet handed to paho whole; one packet at a
    time so that a full read-ahead pauses reading at once; queued packets joined into one
    write. The repairs to paho's handlers are :class:`_Client`'s."""

    def __init__(self, *args: Any, manual_ack: bool = False, read_ahead: int | None = None,
                 max_packet: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_ahead = ReadAhead(read_ahead, self._pause_reading, self._resume_reading)
        self._reading_fd = -1
        self._client.manual_ack_set(manual_ack)
        self.manual_ack = manual_ack
        #: inbound bytes read ahead of paho, cut into packets (:mod:`pigateway.mqtt.stream`)
        self._packets = PacketBuffer(max_packet)
        self._v5 = self._client.protocol == paho.MQTTv5
        self._client._packet_write = self._joined_writes(  # type: ignore[method-assign]
            self._client._packet_write)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        super()._on_socket_open(client, userdata, sock)  # its reader, its keepalive task
        # called from the thread paho connects on; this add_reader replaces aiomqtt's
        self._loop.call_soon_threadsafe(self._start_reading, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._reading_fd = -1
        super()._on_socket_close(client, userdata, sock)

    def _start_reading(self, fd: int) -> None:
        self._reading_fd = fd
        if self.read_ahead.paused:  # filled before this ran: aiomqtt's reader must not go on
            self._loop.remove_reader(fd)
        else:
            self._loop.add_reader(fd, self._read_socket)

    def _read_socket(self) -> None:
        """aiomqtt's reader: what the socket has, and what TLS already decrypted; an error
        ends the link. One packet at a time, so it stops the moment the inbox pauses
        reading: paho's ``loop_read`` reads as many packets at once as QoS 2 messages wait
        for their PUBREL and publishes of ours for their acks, past any limit."""
        inner = self._client
        try:
            for _ in range(READ_BUDGET):
                if self.read_ahead.paused or inner.socket() is None:
                    return
                rc = self._read_packet()
                if rc > 0:
                    inner._loop_rc_handle(rc)  # closes, on_disconnect: as loop_read does
                    return
                if rc == paho.MQTT_ERR_AGAIN:  # the socket is empty, TLS's buffer too
                    return
            # the budget is spent: more may wait in our buffer or TLS's, which no
            # readiness shows
            if self._packets.whole() or _tls_pending(inner.socket()):
                self._loop.call_soon(self._read_socket)
        except Exception as exc:  # the link ends, its socket closed: never a link marked
            # lost whose socket stays open, read and pinged, for the broker to send on to
            log.warning("mqtt: reading the socket failed (%s: %s); the link ends",
                        type(exc).__name__, bounded(exc, 200))
            with contextlib.suppress(Exception):
                inner._loop_rc_handle(paho.MQTT_ERR_PROTOCOL)
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def _read_packet(self) -> MQTTErrorCode:
        """One inbound packet handled, the socket read (a chunk at a time) when none waits in
        the buffer: paho's ``_packet_read`` without its recv per header byte. Returns paho's
        code (``MQTT_ERR_AGAIN``: the socket is empty, and TLS's buffer too)."""
        inner = self._client
        if inner._in_packet["command"]:  # begun by paho's reader before ours took over
            return inner._packet_read()
        packets = self._packets
        try:
            for _ in range(RECVS_PER_PACKET):
                if (packet := packets.next()) is not None:
                    return self._handle_packet(*packet)
                rc = self._receive(packets.wanted())
                if rc != paho.MQTT_ERR_SUCCESS:
                    return rc
        except ProtocolError as exc:
            log.warning("mqtt: %s; the link ends", exc)
            return paho.MQTT_ERR_PROTOCOL
        # a big packet, or one read past: other tasks run before its next chunks
        self._loop.call_soon(self._read_socket)
        return paho.MQTT_ERR_AGAIN

    def _receive(self, size: int) -> MQTTErrorCode:
        """One read of the socket into the buffer (paho's codes, as its reader says them)."""
        inner = self._client
        try:
            data = inner._sock_recv(size)
        except BlockingIOError:
            return paho.MQTT_ERR_AGAIN
        except OSError as err:  # TimeoutError and a closed socket too, as paho says it
            inner._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return paho.MQTT_ERR_CONN_LOST
        if not data:
            return paho.MQTT_ERR_CONN_LOST
        self._packets.feed(data)
        with inner._msgtime_mutex:
            inner._last_bytes_received = paho.time_func()
        return paho.MQTT_ERR_SUCCESS

    def _handle_packet(self, first: int, body: bytes) -> MQTTErrorCode:
        """A plain PUBLISH (manual acks) or PUBACK read here; any other packet by paho."""
        kind = first >> 4
        if isinstance(body, Cut):
            return self._too_large(first, body)
        if kind == 3 and self.manual_ack:
            try:
                message = plain_publish(first, body, self._v5)
            except Exception as exc:  # one packet, one failure: paho's path (guarded) takes it
                log.debug("mqtt: a PUBLISH goes to paho's decoder: %s", bounded(exc, 200))
                message = None
            if message is not None:
                self.read_ahead.put(message)
                return paho.MQTT_ERR_SUCCESS
        elif kind == 4:
            plain = plain_puback(body, self._v5)
            if plain is not None:
                return self._acknowledged(*plain)
        return self._by_paho(first, body)

    def _too_large(self, first: int, cut: Cut) -> MQTTErrorCode:
        """A PUBLISH over our Maximum Packet Size, read past: the link ends (:class:`_Client`
        hands it over as that message's failure instead)."""
        return paho.MQTT_ERR_PROTOCOL

    def _acknowledged(self, mid: int, code: int) -> MQTTErrorCode:
        """A PUBACK that says success: what paho's ``_handle_pubackcomp`` does with it."""
        inner = self._client
        with inner._out_message_mutex:
            if mid in inner._out_messages:
                return inner._do_on_publish(mid, _PUBACK_CODES[code], _NO_PROPERTIES)
        return paho.MQTT_ERR_SUCCESS

    def _by_paho(self, first: int, body: bytes) -> MQTTErrorCode:
        """``body`` handled by paho (through the wrappers above), as its reader hands a
        packet over once it has read it whole."""
        inner = self._client
        inner._in_packet = _in_packet(first, bytearray(body))
        try:
            return inner._packet_handle()
        except MalformedPacket:
            return paho.MQTT_ERR_PROTOCOL
        finally:
            inner._in_packet = _in_packet(0, bytearray())

    def _joined_writes(self, write: Callable[[], MQTTErrorCode]) -> Callable[[], MQTTErrorCode]:
        """paho writes each packet with a send of its own: a PUBACK for every ingested
        message and a PUBLISH for every forwarded one, thousands of sends a second. Here the
        packets waiting are joined into one write first (:func:`_join`)."""
        queue = self._client._out_packet

        def joined() -> MQTTErrorCode:
            if len(queue) > 1:
                _join(queue)
            return write()
        return joined

    def _pause_reading(self) -> None:
        if self._reading_fd >= 0:
            self._loop.remove_reader(self._reading_fd)

    def _resume_reading(self) -> None:
        if self._reading_fd >= 0:
            self._loop.add_reader(self._reading_fd, self._read_socket)
            self._loop.call_soon(self._read_socket)  # bytes TLS decrypted while paused



class _Client(_ReadingClient):
    """aiomqtt's client plus what 2.5 drops: PUBACK reason codes and CONNACK's packet limit,
    and paho's packet handlers made to fail one packet, not the link."""

    def __init__(self, *args: Any, manual_ack: bool = False, read_ahead: int | None = None,
                 max_packet: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, manual_ack=manual_ack, read_ahead=read_ahead,
                         max_packet=max_packet, **kwargs)
        self.max_packet_size: int | None = None
        self.limits = BrokerLimits()
        self.session_present = False
        #: the reason code of a DISCONNECT the broker sent, if it sent one
        self.disconnect_code: int | None = None
        self.puback_codes: dict[int, ReasonCode] = {}
        #: a QoS 2 PUBLISH is being handed to :meth:`_on_message` as QoS 1 (manual acks)
        self._qos2 = False
        self._client._handle_pubackcomp = self._lenient_puback(  # type: ignore[method-assign,assignment]
            self._client._handle_pubackcomp)
        self._client._check_keepalive = self._keepalive_unless_paused(  # type: ignore[method-assign]
            self._client._check_keepalive)
        #: the undecodable PUBLISH being handed to :meth:`_on_message` (QoS 0 and 1)
        self._undecodable: Undecodable | None = None
        self._client._handle_publish = self._tolerant_publish(  # type: ignore[method-assign]
            self._client._handle_publish)
        self._client._handle_pubrel = self._tolerant_pubrel(  # type: ignore[method-assign]
            self._client._handle_pubrel)
        self._client._packet_handle = self._without_odd_properties(  # type: ignore[method-assign]
            self._client._packet_handle)
        # a full in-flight window is normal here; aiomqtt warns past 10 pending calls
        self.pending_calls_threshold = (kwargs.get("max_inflight_messages") or 0) + 16

    def _lenient_puback(self, handle: Callable[[Any], MQTTErrorCode]
                        ) -> Callable[[Any], MQTTErrorCode]:
        """paho drops the link on a PUBACK whose code MQTT 5 keeps for DISCONNECT (0x89
        server busy, 0x95 packet too large, 0x96 message rate too high); brokers send them
        anyway. Such a PUBACK is passed on as the refusal it is (:data:`PUBACK_REFUSALS`).
        """
        inner = self._client

        def lenient(cmd: Any) -> MQTTErrorCode:
            try:
                return handle(cmd)
            except MalformedPacket:
                packet = bytes(inner._in_packet["packet"])
                if cmd != "PUBACK" or len(packet) < 3 or packet[2] not in PUBACK_REFUSALS:
                    raise
                mid = int.from_bytes(packet[:2], "big")
                code = ReasonCode(PacketTypes.DISCONNECT, identifier=packet[2])
                properties = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
                with inner._out_message_mutex:
                    if mid in inner._out_messages:
                        return inner._do_on_publish(mid, code, properties)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return lenient

    def _keepalive_unless_paused(self, check: Callable[[], None]) -> Callable[[], None]:
        """paho ends the link when no byte came in for a keepalive after its PINGREQ (1.5 to
        2 x keepalive); while the ReadAhead pauses reading, the PINGRESP is there, unread behind
        the messages nobody took yet. A paused read counts as a live one: the PINGREQs still
        go out every keepalive (the broker's check is met), and a dead broker is noticed
        within two keepalives of reading again."""
        inner = self._client

        def checked() -> None:
            if self.read_ahead.paused:
                inner._ping_t = 0.0
                inner._last_bytes_received = paho.time_func()
            check()
        return checked

    def _tolerant_publish(self, handle: Callable[[], MQTTErrorCode]
                          ) -> Callable[[], MQTTErrorCode]:
        """paho ends the link on a PUBLISH it cannot decode (and on any exception while it
        hands one over); a persistent session then sends it again first at every reconnect.
        Here it is that message's failure: the packet is handed over again without its
        properties (:meth:`~pigateway.mqtt.packets.PublishHead.plain`), so it takes paho's own
        QoS flow and manual ack, and its consumer gets an :class:`Undecodable` payload."""

        inner = self._client

        def tolerant() -> MQTTErrorCode:
            command = int(inner._in_packet["command"])
            self._qos2 = self.manual_ack and (command >> 1) & 3 == 2
            if self._qos2:  # paho sees QoS 1: handed over now, never acknowledged by paho
                inner._in_packet["command"] = command & ~0x06 | 0x02
            try:
                return handle()
            except Exception as exc:
                return self._hand_over_undecodable(handle, exc)
            finally:
                self._qos2 = False
        return tolerant

    def _hand_over_undecodable(self, handle: Callable[[], MQTTErrorCode],
                               exc: Exception) -> MQTTErrorCode:
        inner = self._client
        v5 = inner.protocol == paho.MQTTv5
        raw = bytes(inner._in_packet["packet"])
        head = publish_head(int(inner._in_packet["command"]), raw, v5)
        if head is None:  # not even a packet id to acknowledge: a broken link after all
            raise exc
        undecodable = Undecodable(raw, f"{type(exc).__name__}: {exc}", head.payload)
        log.warning("mqtt: a message on %s (QoS %d) could not be decoded: %s; it is "
                    "acknowledged once recorded, and the link goes on",
                    bounded(head.topic.decode("utf-8", "replace"), 200), head.qos,
                    undecodable.reason)
        inner._in_packet["packet"] = bytearray(head.plain(v5))
        return self._hand_over(head, undecodable, handle)

    def _too_large(self, first: int, cut: Cut) -> MQTTErrorCode:
        """A PUBLISH over our Maximum Packet Size, read past (:class:`PacketBuffer`): that
        message's failure, handed over as :class:`TooLarge` and acknowledged by its consumer
        once recorded, so a persistent session does not send it again at every reconnect
        (under MQTT 3.1.1, or from a broker that ignores our CONNECT's limit)."""
        limit = self._packets.limit or 0
        head = publish_head(first, cut, self._v5)
        if head is None:  # not even a packet id to acknowledge it by
            log.warning("mqtt: the broker sent a PUBLISH of %d bytes, over our Maximum "
                        "Packet Size of %d, that cannot be read; the link ends", cut.size,
                        limit)
            return paho.MQTT_ERR_PROTOCOL
        log.warning("mqtt: a message on %s (QoS %d) is %d bytes, over our Maximum Packet "
                    "Size of %d; it was read past, and is acknowledged once recorded",
                    bounded(head.topic.decode("utf-8", "replace"), 200), head.qos, cut.size,
                    limit)
        plain = PublishHead(head.qos, head.mid, head.topic, None)
        return self._hand_over(plain, TooLarge(bytes(cut), cut.size, limit),
                               lambda: self._by_paho(first, plain.plain(self._v5)))

    def _hand_over(self, head: PublishHead, undecodable: Undecodable,
                   handle: Callable[[], MQTTErrorCode]) -> MQTTErrorCode:
        """An undecodable PUBLISH handed to paho as its plain copy (``head``, through
        ``handle``), so it takes paho's own QoS flow and manual ack; its consumer gets
        ``undecodable``."""
        self._undecodable = undecodable  # QoS 0 and 1: handed over within this call
        try:
            rc = handle()
        finally:
            self._undecodable = None
        if head.qos == 2:  # handed over at its PUBREL: marked where paho keeps it till then
            inner = self._client
            with inner._in_message_mutex:
                waiting = inner._in_messages.get(head.mid)
                if waiting is not None:
                    waiting.payload = undecodable
        return rc

    def _tolerant_pubrel(self, handle: Callable[[], MQTTErrorCode]
                         ) -> Callable[[], MQTTErrorCode]:
        """Under manual acks, paho would send a QoS 2 message's PUBREC before its consumer
        committed it and hand it over only at the PUBREL; a PUBREL for a message of an
        earlier connection (the broker sends it again after a cut) it never completes, so
        that packet id stays taken at the broker for good, a slot of Receive Maximum lost
        each time. Here (see :meth:`_tolerant_publish`) such a message is handed over at
        once and acknowledged with PUBREC by :meth:`acknowledge`, after the commit; paho
        holds none, and every PUBREL is completed at once by its packet id (the first two
        bytes: a reason or properties paho cannot decode change nothing)."""
        inner = self._client

        def packet_id_only(_: Exception) -> bytes | None:
            packet = inner._in_packet["packet"]
            return bytes(packet[:2]) if len(packet) >= 2 else None

        again = _read_again(inner, handle, packet_id_only)

        def tolerant() -> MQTTErrorCode:
            packet = inner._in_packet["packet"]
            if self.manual_ack and len(packet) >= 2:
                return inner._send_pubcomp(int.from_bytes(packet[:2], "big"))
            return again()
        return tolerant

    def _without_odd_properties(self, handle: Callable[[], MQTTErrorCode]
                                ) -> Callable[[], MQTTErrorCode]:
        """A CONNACK, PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK or DISCONNECT whose Reason
        String or User Property paho refuses (U+FEFF, NUL, bytes that are not UTF-8) ended
        the link: a PUBACK's code never reached its publish (sent again at every reconnect),
        a DISCONNECT's "slow down" was lost, a CONNACK failed every connect. Such a packet
        is read again without them (:func:`~pigateway.mqtt.packets.without_properties`): its
        packet id, reason codes and a CONNACK's limits, which is all we use, stay."""
        inner = self._client

        def plain(exc: Exception) -> bytes | None:
            if inner.protocol != paho.MQTTv5:
                return None
            kind = int(inner._in_packet["command"]) >> 4
            packet = without_properties(kind, bytes(inner._in_packet["packet"]))
            if packet is not None:
                log.warning("mqtt: the broker's %s could not be decoded (%s: %s); read again "
                            "without its properties", PacketTypes.Names[kind].upper(),
                            type(exc).__name__, bounded(exc, 200))
            return packet
        return _read_again(inner, handle, plain)

    def acknowledge(self, message: Message) -> None:
        """PUBACK (QoS 1), or PUBREC (QoS 2 under manual acks; the PUBREL that follows is
        completed by :meth:`_tolerant_pubrel`)."""
        if message.qos == 2 and self.manual_ack:
            self._client._send_pubrec(message.mid)
        else:
            self._client.ack(message.mid, message.qos)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None = None) -> None:
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.max_packet_size = int(properties.MaximumPacketSize)
        self.limits = BrokerLimits.from_connack(properties)
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None = None) -> None:
        # a DISCONNECT the broker sent, not a dropped socket (paho calls that 0x80 too)
        if flags.is_disconnect_packet_from_server and reason_code.is_failure:
            self.disconnect_code = int(reason_code.value)
        # aiomqtt ignores a close before CONNACK and would wait for the CONNACK forever
        if not self._connected.done():
            self._connected.set_exception(
                aiomqtt.MqttError(f"the broker closed the connection before CONNACK "
                                  f"({reason_code})"))
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties) -> None:
        if reason_code.is_failure:
            self.puback_codes[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    def _on_message(self, client: paho.Client, userdata: Any,
                    message: paho.MQTTMessage) -> None:
        undecodable = self._undecodable
        if undecodable is None and isinstance(message.payload, Undecodable):
            undecodable = message.payload  # QoS 2 without manual acks: marked until PUBREL
        qos = 2 if self._qos2 else message.qos
        if undecodable is not None:
            self.read_ahead.put(Message(_topic(message), undecodable, message.mid, qos))
        else:
            self.read_ahead.put(replace(_inbound(message), qos=qos) if self._qos2
                           else _inbound(message))

    def abort(self) -> None:
        """Close the socket without a DISCONNECT (a failed or hung connect, a hung exit)."""
        with contextlib.suppress(Exception):
            self._client._sock_close()
        self.settle()

    def settle(self) -> None:
        """Mark the connection futures' errors as seen: this client is done with."""
        for future in (self._connected, self._disconnected):
            if future.done() and not future.cancelled():
                future.exception()


#: The reason codes and (no) properties a plain PUBACK is passed on with (never changed).
_PUBACK_CODES: Final = {code: ReasonCode(PacketTypes.PUBACK, identifier=code)
                        for code in PLAIN_PUBACK_CODES}
_NO_PROPERTIES: Final = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
#: Bytes joined into one write at most.
JOINED_BYTES: Final = 65536
#: What paho does after writing a packet, by its first byte's type: a PUBLISH of QoS 0 calls
#: on_publish, a DISCONNECT closes the socket. Such packets are never joined with others.
_PUBLISH, _DISCONNECT = 0x30, 0xE0


def _in_packet(first: int, body: bytearray) -> Any:  # paho's _InPacket (a TypedDict)
    """paho's record of an inbound packet: whole (``first`` 0: none begun)."""
    return {"command": first, "have_remaining": 1 if first else 0, "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body), "packet": body,
            "to_process": 0, "pos": 0}


def _joinable(packet: dict[str, Any]) -> bool:
    kind = packet["command"] & 0xF0
    return kind != _DISCONNECT and not (kind == _PUBLISH and packet["qos"] == 0)


def _join(queue: Any) -> None:
    """Runs of paho's queued packets (``_out_packet``) joined into single ones of up to
    :data:`JOINED_BYTES`, in order (a packet begun keeps only what is left of it). A joined
    packet is typed PUBACK: after writing it paho does nothing but note the time, as it
    does for every packet joined into it."""
    packets = list(queue)
    queue.clear()
    run: list[bytes] = []
    size = 0

    def close() -> None:
        nonlocal size
        if run:
            data = b"".join(run)
            queue.append({"command": 0x40, "mid": 0, "qos": 1, "pos": 0,
                          "to_process": len(data), "packet": data, "info": None})
        run.clear()
        size = 0

    for packet in packets:
        if not _joinable(packet):
            close()
            queue.append(packet)
            continue
        if size >= JOINED_BYTES:
            close()
        rest = bytes(packet["packet"][packet["pos"]:])
        run.append(rest)
        size += len(rest)
    close()


class Connection:
    """One MQTT connection, up while :func:`connect`'s block runs."""

    def __init__(self, client: _Client) -> None:
        self._link = client
        #: never more unacknowledged QoS 1 publishes than the broker's Receive Maximum
        self.quota = asyncio.Semaphore(client.limits.receive_maximum)

    @property
    def limits(self) -> BrokerLimits:
        """What the broker said in CONNACK (Receive Maximum, Maximum QoS, Retain Available)."""
        return self._link.limits

    @property
    def max_packet_size(self) -> int | None:
        """CONNACK's Maximum Packet Size (MQTT 5), ``None`` when the broker set none."""
        return self._link.max_packet_size

    @property
    def slow_down(self) -> str | None:
        """What the broker said when it disconnected us to slow down (:data:`SLOW_DOWN`)."""
        code = self._link.disconnect_code
        if code is None or code not in SLOW_DOWN:
            return None
        return f"DISCONNECT reason code 0x{code:02X} ({SLOW_DOWN[code]})"

    @property
    def session_present(self) -> bool:
        return self._link.session_present

    @property
    def lost(self) -> bool:
        """Whether the link has dropped (or was closed)."""
        return self._link._disconnected.done()

    @property
    def waiting(self) -> int:
        """Inbound messages read from the socket and not yet taken (:class:`ReadAhead`)."""
        return len(self._link.read_ahead)

    async def deliver(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                      timeout: float, extras: Extras | None = None,
                      written: Callable[[], None] | None = None) -> int | None:
        """Publish; return after the PUBACK with its failure reason code, ``None`` for success.

        Raises :class:`UplinkError` when the link drops or no PUBACK came in time
        (aiomqtt's own publish would only notice the drop at its timeout). What CONNACK
        said holds for every caller: at most Receive Maximum QoS 1 publishes unacknowledged
        (a publish waits for a free one, at most ``timeout``), no QoS above Maximum QoS, no
        retain flag unless Retain Available. ``written`` is called once the PUBLISH is in
        the connection's outgoing order (before its PUBACK): a caller that pipelines
        messages whose order matters hands the next one over only then.
        """
        if qos == 0:
            return await self.publish_now(topic, payload, 0, retain, timeout=timeout,
                                          extras=extras, written=written)
        if self.quota.locked():  # a free slot is taken without a timer (one per publish)
            try:
                async with asyncio.timeout(timeout):  # a quota comes back within one PUBACK wait
                    await self.quota.acquire()
            except TimeoutError:
                raise UplinkError(f"no free slot under the broker's Receive Maximum "
                                  f"({self.limits.receive_maximum}) within {timeout}s") from None
        else:
            await self.quota.acquire()
        try:
            return await self.publish_now(topic, payload, qos, retain, timeout=timeout,
                                          extras=extras, written=written)
        finally:
            self.quota.release()

    async def publish_now(self, topic: str, payload: bytes, qos: int, retain: bool, *,
                          timeout: float, extras: Extras | None = None,
                          written: Callable[[], None] | None = None) -> int | None:
        """:meth:`deliver` without the wait for a Receive Maximum slot (the caller has one)."""
        client = self._link
        qos = min(qos, client.limits.maximum_qos)
        properties = None
        if extras is not None:
            retain = retain or extras.retain
            if client._client.protocol == paho.MQTTv5:
                properties = _properties(extras)
        retain = retain and client.limits.retain
        packed = properties.packed if isinstance(properties, _PublishProperties) else b"\x00"
        check_publish(topic.encode(), payload, qos=qos, max_packet_size=client.max_packet_size,
                      properties=packed if client._client.protocol == paho.MQTTv5 else None)
        info = client._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise classify(aiomqtt.MqttCodeError(info.rc, "could not publish"))
        if written is not None:
            written()
        if qos > 0 and not info.is_published():
            confirmation = _Confirmation()
            # aiomqtt's PUBACK callback pops it and calls set(), as it would an Event's;
            # registered here, not with aiomqtt's _pending_call, which counts every pending
            # call twice for each publish (O(window) per message)
            pending = client._pending_publishes
            registered = cast(asyncio.Event, confirmation)
            pending[info.mid] = registered
            try:
                winner = await confirmation.wait(client._disconnected, timeout)
            finally:
                if pending.get(info.mid) is registered:
                    del pending[info.mid]
            if winner != 0:
                raise UplinkError("the link dropped before the PUBACK" if winner == 1
                                  else f"no PUBACK within {timeout}s")
        code = client.puback_codes.pop(info.mid, None)
        return None if code is None else int(code.value)

    async def subscribe(self, topic: str, qos: int = 1, *, as_published: bool = False) -> bool:
        """Subscribe; whether the broker granted it (its SUBACK: 0x80 and up is a refusal,
        an ACL's 0x87). ``as_published`` (MQTT 5 only; ignored under 3.1.1): keep the retain
        flag a message was published with (Retain As Published), never hear our own
        publishes back (No Local), and get the retained messages only when the subscription
        is new (Retain Handling 1), not again at every reconnect of a persistent session."""
        with _translated():
            if as_published and self._link._client.protocol == paho.MQTTv5:
                options = SubscribeOptions(qos=qos, noLocal=True, retainAsPublished=True,
                                           retainHandling=1)
                granted = await self._link.subscribe(topic, options=options)
            else:
                granted = await self._link.subscribe(topic, qos=qos)
        return all((code if isinstance(code, int) else code.value) < 0x80 for code in granted)

    async def unsubscribe(self, topic: str, timeout: float) -> None:
        with _translated():
            await self._link.unsubscribe(topic, timeout=timeout)

    async def messages(self) -> AsyncIterator[Message]:
        """Inbound messages until the link drops (then :class:`UplinkError`); at most
        ``Settings.read_ahead`` wait here (:class:`ReadAhead`)."""
        inbox, ended = self._link.read_ahead, self._link._disconnected
        while True:
            message = inbox.take()
            if message is not None:
                yield message
            elif not await inbox.wait(ended):
                raise UplinkError("the link dropped") from _error_of(ended)

    def take(self, limit: int) -> list[Message]:
        """Up to ``limit`` waiting messages, oldest first, without waiting.

        Raises :class:`UplinkError` once the link has dropped, even with messages still
        waiting: they can no longer be acknowledged, and the broker sends them again on the
        next connection of a persistent session.
        """
        ended = self._link._disconnected
        if ended.done():
            raise UplinkError("the link dropped") from _error_of(ended)
        inbox = self._link.read_ahead
        group: list[Message] = []
        while len(group) < limit and (message := inbox.take()) is not None:
            group.append(message)
        return group

    async def incoming(self) -> None:
        """Until a message is waiting or the link drops (then :meth:`take` raises)."""
        await self._link.read_ahead.wait(self._link._disconnected)

    def ack(self, message: Message) -> None:
        """Acknowledge an inbound message (persistent sessions: manual acks), after its
        record is committed: PUBACK, or PUBREC for QoS 2."""
        self._link.acknowledge(message)

    def when_lost(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` the moment the connection drops, before any clean-up runs."""
        self._link._disconnected.add_done_callback(lambda _: callback())

    def _send_at_once(self) -> None:
        """Turn Nagle's algorithm off on the connection (TCP_NODELAY).

        MQTT packets are small; with Nagle on, a PUBLISH that follows a PUBACK waits for
        the broker's delayed ACK, 40 ms on Linux, on every command and result.
        """
        sock = self._link._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tls_pending(sock: object) -> bool:
    """Whether TLS holds decrypted bytes the socket's readiness will never announce."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _error_of(future: asyncio.Future[Any]) -> BaseException | None:
    return None if future.cancelled() or not future.done() else future.exception()


def _new_client(settings: Settings) -> _Client:
    v5 = settings.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry if settings.persistent else 0
        if settings.receive_maximum is not None:
            properties.ReceiveMaximum = settings.receive_maximum
        properties.MaximumPacketSize = settings.max_packet_size
    will = settings.will
    return _Client(
        settings.host, settings.port, identifier=settings.client_id,
        username=settings.username, password=settings.password,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        will=None if will is None else aiomqtt.Will(will.topic, will.payload, qos=1,
                                                    retain=will.retain),
        clean_session=None if v5 else not settings.persistent,
        clean_start=(not settings.persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties, keepalive=settings.keepalive, timeout=settings.timeout,
        tls_context=settings.tls, max_inflight_messages=settings.max_inflight,
        manual_ack=settings.persistent, read_ahead=settings.read_ahead,
        max_packet=settings.max_packet_size,
    )


@asynccontextmanager
async def connect(settings: Settings, *, bound: float,
                  leave_bound: float = LEAVE_BOUND) -> AsyncIterator[Connection]:
    """A connection for the block: CONNECT bounded by ``bound`` seconds (a CONNACK that
    never comes), never a half-open socket left behind, a clean DISCONNECT at the end
    bounded by ``leave_bound``. Errors are :mod:`pigateway.errors` types."""
    client = _new_client(settings)
    stack = contextlib.AsyncExitStack()
    try:
        async with asyncio.timeout(bound):
            await stack.enter_async_context(client)
    except TimeoutError:
        client.abort()
        raise UplinkError(f"no CONNACK within {bound:.0f}s") from None
    except aiomqtt.MqttError as exc:
        client.abort()
        if isinstance(exc.__context__, TimeoutError):  # aiomqtt's own CONNACK wait
            raise UplinkError(f"no CONNACK within {client.timeout:.0f}s") from exc
        raise classify(exc) from exc
    except BaseException:
        client.abort()
        raise
    try:
        connection = Connection(client)
        connection._send_at_once()
        yield connection
    finally:
        try:
            async with asyncio.timeout(leave_bound):
                await stack.aclose()
        except (TimeoutError, aiomqtt.MqttError):
            client.abort()
        client.settle()


