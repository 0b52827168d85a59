"""A paho subscriber on its own thread, for the power-cut and cut runs' observers."""

from __future__ import annotations

import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from harness.broker import Mosquitto


class Watcher:
    """A paho subscriber on its own thread for a whole run (a persistent session, so a
    broker restart loses nothing of it): a subclass says what a message means, under
    ``lock``."""

    def __init__(self, broker: Mosquitto, name: str, topic: str) -> None:
        self.topic = topic
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name,
                                  clean_session=False)
        self.client.on_connect = self._connected
        self.client.on_message = self._message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self.ready.wait(10):
            raise RuntimeError(f"the watcher {name} did not connect")

    def _connected(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.ready.set()

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
