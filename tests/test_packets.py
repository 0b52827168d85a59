"""pigateway.mqtt.packets reads what it needs of a packet paho refuses, by its own rules, and never
raises on any bytes: checked against the harness's encoder, which shares no code with it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import mqttwire as w
from pigateway.mqtt.packets import (
    RAW_KEPT,
    Undecodable,
    numbers_only,
    publish_head,
    without_properties,
)


def _body(packet: bytes) -> tuple[int, bytes]:
    _, at = w.read_varint(packet, 1)
    return packet[0], packet[at:]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=300), st.integers(0, 3),
       st.integers(1, 65535), st.booleans())
def test_a_publish_head_is_its_topic_packet_id_and_payload(
        topic: bytes, payload: bytes, qos: int, mid: int, v5: bool) -> None:
    props = w.properties(w.user_property("k", "\ufeff")) if v5 else None
    if qos == 3:
        assert publish_head(0x36, b"\x00\x01t\x00\x01", v5) is None  # no such QoS
        return
    packet = w.publish(topic, payload, qos=qos, mid=mid if qos else None, v5=v5,
                       raw_props=props)
    head = publish_head(*_body(packet), v5)
    assert head is not None
    assert (head.topic, head.qos, head.mid, head.payload) == (topic, qos, mid if qos else 0,
                                                              payload)
    again = publish_head(head.qos << 1 | 0x30, head.plain(v5), v5)
    assert again is not None and again.payload == payload and again.mid == head.mid


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=64), st.booleans())
def test_any_bytes_are_read_or_refused_never_raised(header: int, body: bytes, v5: bool) -> None:
    head = publish_head(header, body, v5)
    if head is not None:
        assert head.qos in (0, 1, 2) and (head.qos == 0 or head.mid > 0)
    for kind in range(16):
        without_properties(kind, body)
    numbers_only(body)


def test_a_property_length_that_lies_leaves_the_payload_unknown() -> None:
    packet = w.publish("t", b"payload", qos=1, mid=9, raw_props=w.varint(5000) + b"ab")
    head = publish_head(*_body(packet), True)
    assert head is not None and head.mid == 9 and head.payload is None


def test_a_packet_id_of_zero_cannot_be_acknowledged() -> None:
    assert publish_head(0x32, b"\x00\x01t\x00\x00\x00", True) is None


def test_numbers_only_keeps_the_limits_and_drops_the_strings() -> None:
    block = w.properties(w.reason_string("\ufeff"), w.receive_maximum(1),
                         w.user_property("a\x00", "b"), w.maximum_packet_size(256),
                         w.prop_string(0x12, b"\xff"), w.prop_byte(0x24, 1))
    assert numbers_only(block) == w.properties(w.receive_maximum(1),
                                               w.maximum_packet_size(256),
                                               w.prop_byte(0x24, 1))
    assert numbers_only(w.varint(9) + b"\x26") is None  # runs past its end


@pytest.mark.parametrize(("kind", "body", "plain"), [
    (w.PUBACK, b"\x00\x07\x10" + w.properties(w.reason_string("\ufeff")), b"\x00\x07\x10\x00"),
    (w.DISCONNECT, b"\x89" + w.properties(w.reason_string("\ufeff")), b"\x89\x00"),
    (w.SUBACK, b"\x00\x02" + w.properties(w.reason_string("\ufeff")) + b"\x01\x80",
     b"\x00\x02\x00\x01\x80"),
    (w.PUBACK, b"\x00\x07", None),  # nothing to drop
])
def test_without_properties_keeps_the_ids_and_codes(kind: int, body: bytes,
                                                    plain: bytes | None) -> None:
    assert without_properties(kind, body) == plain


def test_an_undecodable_payload_is_bounded_and_says_why() -> None:
    packet = Undecodable(b"x" * (RAW_KEPT * 3), "MalformedPacket: " + "y" * 5000, b"{}")
    assert len(packet) == RAW_KEPT and packet.size == RAW_KEPT * 3
    assert len(packet.reason) <= 300 and packet.payload == b"{}"
    assert "could not be decoded" in packet.describe()
