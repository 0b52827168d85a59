"""Bare forwarders, for the ingest benchmark only: the ceiling of the MQTT stack.

Each does what pigateway's forward rule does on the wire (QoS 1 in, QoS 1 out with a
``pigateway-id`` user property, 64 publishes in flight) and nothing of what makes it
durable: no store, no commit, paho acknowledges each message on receipt. ``aiomqtt`` is
what a user of the product's library would write; ``paho`` is the leanest use of paho
(its own network threads, no asyncio). Whatever rate they reach, pigateway (built on the
same aiomqtt and paho) cannot pass by much.

Usage: bare_forwarder.py aiomqtt|paho LOCAL_PORT UPLINK_PORT PREFIX (prints "ready" once
subscribed).
"""

from __future__ import annotations

import asyncio
import sys

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

IN_FLIGHT = 64


async def forward(local_port: int, uplink_port: int, prefix: str) -> None:
    v5 = aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client("127.0.0.1", uplink_port, protocol=v5, identifier="bare-up",
                              max_inflight_messages=IN_FLIGHT) as uplink, \
            aiomqtt.Client("127.0.0.1", local_port, protocol=v5, identifier="bare-in") as local:
        uplink.pending_calls_threshold = IN_FLIGHT + 16
        await local.subscribe("z2m/#", qos=1)
        print("ready", flush=True)
        slots = asyncio.Semaphore(IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def one(message: aiomqtt.Message, number: int) -> None:
            try:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.UserProperty = [("pigateway-id", f"{number:026d}")]
                await uplink.publish(prefix + str(message.topic), message.payload, qos=1,
                                     properties=properties)
            finally:
                slots.release()

        number = 0
        async for message in local.messages:
            await slots.acquire()
            number += 1
            task = asyncio.create_task(one(message, number))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def forward_with_paho(local_port: int, uplink_port: int, prefix: str) -> None:
    v2, v5 = paho.CallbackAPIVersion.VERSION2, paho.MQTTv5
    uplink = paho.Client(v2, client_id="bare-paho-up", protocol=v5)
    uplink.max_inflight_messages_set(IN_FLIGHT)
    uplink.max_queued_messages_set(0)  # no limit: paho queues past the in-flight window
    uplink.connect("127.0.0.1", uplink_port)
    uplink.loop_start()
    local = paho.Client(v2, client_id="bare-paho-in", protocol=v5)
    count = 0

    def on_message(_: paho.Client, __: object, message: paho.MQTTMessage) -> None:
        nonlocal count
        count += 1
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("pigateway-id", f"{count:026d}")]
        uplink.publish(prefix + message.topic, message.payload, qos=1, properties=properties)

    local.on_message = on_message
    local.on_connect = lambda client, *_: client.subscribe("z2m/#", qos=1)
    local.on_subscribe = lambda *_: print("ready", flush=True)
    local.connect("127.0.0.1", local_port)
    local.loop_forever()


if __name__ == "__main__":
    kind, ports = sys.argv[1], (int(sys.argv[2]), int(sys.argv[3]))
    if kind == "paho":
        forward_with_paho(*ports, sys.argv[4])
    else:
        asyncio.run(forward(*ports, sys.argv[4]))
