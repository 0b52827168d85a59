"""The test broker itself: what the uplink tests rely on when they stop it and start it
again. A restart is an outage, not a new broker: a persistent subscriber's session (its
subscription, the QoS 1 messages queued for it) is in mosquitto's persistence file and
survives, whoever runs the tests (root too: mosquitto then drops to another user, who
must still be able to write that file)."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from harness.broker import Mosquitto


@pytest.mark.broker
async def test_a_persistent_subscribers_messages_published_across_a_restart_reach_it(
        mosquitto: Mosquitto) -> None:
    """Subscribed (clean session off), the broker stopped cleanly and started again, a
    message published before the subscriber is back reaches it when it reconnects
    without subscribing again."""
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="keeper",
                              clean_session=False) as sub:
        await sub.subscribe("kept/#", qos=1)
    mosquitto.stop()
    mosquitto.start()
    assert "Error" not in mosquitto.log_path.read_text()
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="pub") as pub:
        await pub.publish("kept/one", b"while away", qos=1)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="keeper",
                              clean_session=False) as sub:
        async with asyncio.timeout(5):
            message = await anext(aiter(sub.messages))
    assert (str(message.topic), message.payload) == ("kept/one", b"while away")
