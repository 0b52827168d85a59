"""A bare aiomqtt forwarder, for the ingest benchmark only: the ceiling of the MQTT stack.

It does what pigateway's forward rule does on the wire (QoS 1 in, QoS 1 out with a
``pigateway-id`` user property, 64 publishes in flight) and nothing of what makes it
durable: no store, no commit, paho acknowledges each message on receipt. Whatever rate it
reaches, pigateway (built on the same aiomqtt and paho) cannot pass by much.

Usage: bare_forwarder.py LOCAL_PORT UPLINK_PORT PREFIX (prints "ready" once subscribed).
"""

from __future__ import annotations

import asyncio
import sys

import aiomqtt
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


if __name__ == "__main__":
    asyncio.run(forward(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
