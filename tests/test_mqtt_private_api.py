"""Every private member of aiomqtt or paho that pigateway.mqtt relies on, checked by name.

They are all used in one file, ``pigateway/mqtt/client.py``: the one to re-read at every
upgrade of aiomqtt or paho.

An upgrade of aiomqtt or paho that moves, renames or reshapes one of them fails here with
the member's name, instead of somewhere deep in the uplink. The list is
``pigateway.mqtt.PRIVATE_API``: the one place such a member may be named.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from pigateway.mqtt import PRIVATE_API, PrivateMember
from pigateway.mqtt.forwarded import Extras

SERVICE = Path(__file__).resolve().parents[1] / "service" / "pigateway"


def _instances() -> dict[str, Any]:
    client = aiomqtt.Client("127.0.0.1", 1)  # never connected: only looked at
    return {"aiomqtt.Client": client, "paho.Client": client._client}


def _advice(member: PrivateMember) -> str:
    return (f"{member.owner}.{member.name} ({member.why}) moved or changed shape in this "
            f"aiomqtt/paho: adapt pigateway/mqtt/client.py (and PRIVATE_API) to the new "
            f"version, or pin the old one in pyproject.toml")


@pytest.mark.parametrize("member", PRIVATE_API, ids=lambda m: f"{m.owner}.{m.name}")
async def test_private_member_is_where_pigateway_expects_it(member: PrivateMember) -> None:
    instance = _instances()[member.owner]
    assert hasattr(instance, member.name), f"missing: {_advice(member)}"
    value = getattr(instance, member.name)
    if member.kind == "method":
        assert callable(value), f"not a method any more: {_advice(member)}"
        names = tuple(inspect.signature(value).parameters)
        assert names == member.shape, (f"parameters {names}, expected {member.shape}: "
                                       f"{_advice(member)}")
    else:
        kind = type(value).__name__
        assert kind == member.shape, f"a {kind}, expected a {member.shape}: {_advice(member)}"


def test_private_members_are_named_only_in_the_table() -> None:
    """A private aiomqtt/paho member used in mqtt/client.py must be in PRIVATE_API (so it is
    guarded)."""
    source = (SERVICE / "mqtt" / "client.py").read_text()
    ours = {"_link", "_send_at_once", "_connection", "_timeout", "_lenient_puback", "_extras",
            # the Inbox and the socket reader that pauses for it
            "_reading_fd", "_read_socket",
            "_start_reading", "_pause_reading", "_resume_reading",
            "_keepalive_unless_paused",
            # a packet paho cannot decode fails alone
            "_tolerant_publish", "_tolerant_pubrel", "_hand_over_undecodable", "_undecodable",
            "_hand_over", "_too_large",
            "_without_odd_properties",
            # the socket read in chunks, packets cut and the plain ones read here; writes joined
            "_packets", "_v5", "_read_packet", "_receive", "_handle_packet", "_acknowledged",
            "_by_paho",
            "_joined_writes"}
    named = {member.name for member in PRIVATE_API}
    # a private member read (``._x``) or overridden (a method ``def _x``, even without super())
    used = set(re.findall(r"\.(_[a-z][a-z_]*)\b|^[ ]+def (_[a-z][a-z_]*)\(", source,
                          re.MULTILINE))
    used = {name for pair in used for name in pair if name} - ours
    assert used <= named, f"private members used but not in PRIVATE_API: {sorted(used - named)}"
    assert named <= used, f"PRIVATE_API names members no longer used: {sorted(named - used)}"


def test_only_the_mqtt_package_imports_aiomqtt_or_paho() -> None:
    importers = sorted(path.relative_to(SERVICE).as_posix() for path in SERVICE.rglob("*.py")
                       if re.search(r"^\s*(import|from) (aiomqtt|paho)\b", path.read_text(),
                                    re.MULTILINE))
    assert importers == ["mqtt/client.py", "mqtt/codes.py"]


def test_no_other_file_of_the_mqtt_package_touches_a_private_member() -> None:
    """Only client.py reaches into aiomqtt or paho: the others use their own members only."""
    for path in sorted((SERVICE / "mqtt").glob("*.py")):
        if path.name == "client.py":
            continue
        reached = set(re.findall(r"\b(?:client|_client|_link|inner|paho|aiomqtt)\.(_[a-z]\w*)",
                                 path.read_text()))
        assert not reached, f"{path.name} uses private members {sorted(reached)}"


@pytest.mark.parametrize("extras", [
    Extras(expiry=60),
    Extras(content_type="application/json"),
    Extras(user_properties=(("pigateway-id", "01ABC"), ("k", "v é"), ("k", "again"))),
    Extras(retain=True, content_type="text/plain", user_properties=(("a", "b"),), expiry=0),
], ids=["expiry", "content-type", "user-properties", "all"])
def test_publish_properties_pack_as_paho_packs_them(extras: Extras) -> None:
    """pigateway packs a forwarded message's PUBLISH properties itself (per message, paho's
    ``Properties`` costs ~60 us): the bytes must be paho's own, in paho's order."""
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    from pigateway.mqtt.client import _properties  # noqa: PLC0415

    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if extras.content_type is not None:
        theirs.ContentType = extras.content_type
    if extras.user_properties:
        theirs.UserProperty = list(extras.user_properties)
    if extras.expiry is not None:
        theirs.MessageExpiryInterval = max(1, extras.expiry)
    ours = _properties(extras)
    assert ours is not None
    assert bytes(ours.pack()) == bytes(theirs.pack())  # type: ignore[no-untyped-call]
    assert ours.packetType == PacketTypes.PUBLISH


def test_no_publish_properties_without_extras() -> None:
    from pigateway.mqtt.client import _properties  # noqa: PLC0415

    assert _properties(Extras(retain=True)) is None
