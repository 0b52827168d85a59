"""Cloud profiles (``[mqtt] profile``): defaults, the checks that refuse what a cloud would
refuse (naming the key and the limit), and an azure-iot-hub gateway on a real mosquitto
whose ACL allows only the Azure topic form, over TLS as Azure requires."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from harness.broker import Mosquitto
from harness.gateway import GATEWAY
from harness.uplink_helpers import drained, make_config, running_uplink, wait_until
from pigateway import config, wire
from pigateway.errors import ConfigError
from pigateway.mqtt.topics import topic_matches
from pigateway.store import NewCommand
from pigateway.wire import profiles
from test_uplink_security import make_pki

ROOT = Path(__file__).resolve().parent.parent


def parse(text: str) -> config.Config:
    return config.parse(f'gateway_id = "gw"\n{text}')


def test_generic_changes_nothing() -> None:
    assert config.parse('gateway_id = "gw"\n') == parse('[mqtt]\nprofile = "generic"\n')
    assert wire.topic(parse(""), "actions") == "pigateway/gw/actions"


def test_a_profile_sets_its_defaults_where_the_file_says_nothing() -> None:
    aws = parse('[mqtt]\nprofile = "aws-iot"\n')
    assert (aws.mqtt.port, aws.mqtt.tls.enabled, aws.mqtt.keepalive) == (8883, True, 30)
    assert aws.uplink.max_batch_bytes == 128 * 1024
    assert aws.uplink.max_messages_per_second == 100
    azure = parse('[mqtt]\nprofile = "azure-iot-hub"\n')
    assert azure.mqtt.protocol == "3.1.1"
    kept = parse('[mqtt]\nprofile = "aws-iot"\nport = 443\n'
                 '[uplink]\nmax_messages_per_second = 20\n')
    assert (kept.mqtt.port, kept.uplink.max_messages_per_second) == (443, 20)


def test_azure_topics_are_the_events_topic_of_the_device() -> None:
    azure = parse('[mqtt]\nprofile = "azure-iot-hub"\n')
    for leaf in ("actions", "results", "state"):
        assert wire.topic(azure, leaf) == f"devices/gw/messages/events/kind={leaf}"
    assert wire.topic(azure, "commands") == "devices/gw/messages/devicebound/#"
    assert topic_matches(wire.topic(azure, "commands"),
                         "devices/gw/messages/devicebound/%24.to=%2Fdevices%2Fgw")
    assert not topic_matches(wire.topic(azure, "commands"), "devices/gw2/messages/devicebound/x")


REFUSED = [
    ('profile = "aws-iot"\n[mqtt.tls]\nenabled = false', "mqtt.tls.enabled", "TLS only"),
    ('profile = "aws-iot"\nkeepalive = 15', "mqtt.keepalive", "from 30 to 1200"),
    ('profile = "aws-iot"\n[uplink]\nmax_batch_bytes = 200000', "uplink.max_batch_bytes",
     "at most 131072 bytes"),
    ('profile = "aws-iot"\n[uplink]\nmax_messages_per_second = 0',
     "uplink.max_messages_per_second", "at most 100 publishes/s"),
    ('profile = "aws-iot"\n[uplink]\nmax_messages_per_second = 150',
     "uplink.max_messages_per_second", "at most 100 publishes/s"),
    ('profile = "aws-iot"\ntopic_prefix = "$aws/things"', "mqtt.topic_prefix", "reserved"),
    ('profile = "aws-iot"\ntopic_prefix = "a/b/c/d/e/f/g"', "mqtt.topic_prefix",
     "at most 7 slashes"),
    ('profile = "azure-iot-hub"\nprotocol = "5"', "mqtt.protocol", "MQTT 3.1.1 only"),
    ('profile = "azure-iot-hub"\nkeepalive = 3600', "mqtt.keepalive", "from 5 to 1177"),
    ('profile = "azure-iot-hub"\nusername = "gw"\npassword_file = "/etc/p"', "mqtt.username",
     "localhost/gw/?api-version="),
    ('profile = "azure-iot-hub"\n[uplink]\nmax_batch_bytes = 300000', "uplink.max_batch_bytes",
     "at most 262144 bytes"),
    ('profile = "hivemq-cloud"', "mqtt.username", "user name and password are required"),
    ('profile = "hivemq-cloud"\nusername = "u"\npassword_file = "/etc/p"\n[mqtt.tls]\n'
     'enabled = false', "mqtt.tls.enabled", "TLS only"),
]


@pytest.mark.parametrize(("text", "key", "limit"), REFUSED, ids=[r[1] + ":" + r[2][:14]
                                                                   for r in REFUSED])
def test_a_config_the_cloud_would_refuse_names_the_key_and_the_limit(
        text: str, key: str, limit: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[mqtt]\n{text}\n")
    assert caught.value.key == key
    assert limit in str(caught.value)


def test_the_accepted_forms_pass() -> None:
    parse('[mqtt]\nprofile = "azure-iot-hub"\nhost = "hub.azure-devices.net"\n'
          'username = "hub.azure-devices.net/gw/?api-version=2021-04-12"\n'
          'password_file = "/etc/p"\n')
    parse('[mqtt]\nprofile = "hivemq-cloud"\nusername = "u"\npassword_file = "/etc/p"\n')
    assert set(profiles.PROFILES) == set(profiles.NAMES)
    assert set(wire.CLOUD_TOPICS) < set(profiles.NAMES)


def test_config_check_fails_with_the_key_and_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('gateway_id = "gw"\n[mqtt]\nprofile = "aws-iot"\nkeepalive = 2000\n')
    done = subprocess.run([sys.executable, "-m", "pigateway", "config", "check", "--config",
                           str(path)], check=False, capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "service")})
    assert done.returncode != 0
    assert "mqtt.keepalive" in done.stderr and "from 30 to 1200" in done.stderr


@pytest.mark.broker
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_an_azure_gateway_publishes_only_on_the_azure_topic_form(
        tmp_path: Path, unique_prefix: str) -> None:
    pki = make_pki(tmp_path / "pki")
    acl = tmp_path / "acl"
    acl.write_text("topic read devices/#\n"  # the anonymous receiver below
                   "pattern write devices/%c/messages/events/#\n")
    secret = tmp_path / "password"
    secret.write_text("sas-token\n")
    broker = Mosquitto(tmp_path / "broker", extra=[
        "user root", f"acl_file {acl}", f"cafile {pki / 'ca.crt'}",
        f"certfile {pki / 'server.crt'}", f"keyfile {pki / 'server.key'}",
        "log_type all"])
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, mqtt={
            "profile": "azure-iot-hub", "host": "127.0.0.1",
            "username": f"127.0.0.1/{GATEWAY}/?api-version=2021-04-12",
            "password_file": str(secret), "tls": {"enabled": True, "ca_file": str(pki / "ca.crt")}})
        assert cfg.mqtt.protocol == "3.1.1"
        got: list[str] = []
        receiver = asyncio.create_task(_receive(broker.port, pki / "ca.crt", got))
        try:
            async with running_uplink(cfg) as run:
                put = await run.store.put_many([NewCommand(f"d{n}", "on") for n in range(20)])
                assert await drained(run.store, 15)
                assert await wait_until(lambda: all(c.id in "".join(got) for c in put), 10)
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        log = broker.log_path.read_text(errors="replace")
    topics = re.findall(rf"Received PUBLISH from {GATEWAY} \([^']*'([^']*)'", log)
    assert topics, "mosquitto logged no PUBLISH of the gateway"
    assert set(topics) <= {f"devices/{GATEWAY}/messages/events/kind={k}"
                           for k in ("actions", "state")}
    assert "Denied PUBLISH" not in log


async def _receive(port: int, ca_file: Path, got: list[str]) -> None:
    """Everything on the device's events topic, as text (the receiver reads payloads)."""
    for _ in range(100):
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="azure-receiver",
                                      tls_context=ssl.create_default_context(
                                          cafile=str(ca_file))) as client:
                await client.subscribe(f"devices/{GATEWAY}/messages/events/#", qos=1)
                async for message in client.messages:
                    got.append(bytes(message.payload).decode())  # type: ignore[arg-type]
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)
