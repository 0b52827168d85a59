"""A password file the broker's CONNECT cannot carry is the operator's fault, said once.

An MQTT password is binary data of at most 65535 bytes. A password_file pointing at the
wrong file (a certificate bundle, a log) held more: every CONNECT then failed to pack
(struct.error), an error no one classified, at every reconnect.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pigateway.config import LocalConfig, MqttConfig
from pigateway.errors import LinkFault
from pigateway.mqtt.credentials import broker_password, local_password


def test_a_password_file_past_what_mqtt_carries_is_a_link_fault(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p" * 70_000 + "\n")
    with pytest.raises(LinkFault, match="65,535"):
        broker_password(MqttConfig(host="h.example", username="u", password_file=secret))
    with pytest.raises(LinkFault, match="65,535"):
        local_password(LocalConfig(username="u", password_file=secret))


def test_a_password_of_65535_bytes_is_read_whole(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("p" * 65_535 + "\n")
    assert broker_password(MqttConfig(host="h.example", username="u",
                                      password_file=secret)) == "p" * 65_535
