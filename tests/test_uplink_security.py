"""Brokers that say no: a refused login, TLS with client certificates, packet limits, ACLs.

Each case must end in a clear state (``state.fault`` / ``last_error``), dead letters with
their reason where rows cannot travel, and a service that stays up and keeps queueing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.uplink_helpers import (
    GATEWAY,
    RecordingState,
    drained,
    make_config,
    running_uplink,
    wait_until,
)
from pigateway.mqtt import PUBLISH_OVERHEAD
from pigateway.state import Link
from pigateway.store import Command
from pigateway.store.ids import new_id
from pigateway.uplink import reconnect_policy
from pigateway.uplink.batching import Rules, plan

pytestmark = pytest.mark.broker


def broker_with(tmp_path: Path, *lines: str) -> Mosquitto:
    # when the tests run as root, mosquitto would drop to its own user and not read our files
    return Mosquitto(tmp_path / "broker", extra=["user root", *lines])


async def dead_reasons(store: object) -> dict[str, int]:
    return dict((await store.stats()).dead)  # type: ignore[attr-defined]


def password_file(path: Path, user: str, password: str) -> Path:
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), user, password],
                   check=True, capture_output=True)
    return path


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_refused_login_is_a_named_fault_retried_at_the_cap(
        tmp_path: Path, unique_prefix: str, monkeypatch: pytest.MonkeyPatch,
        protocol: str) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwords = password_file(tmp_path / "passwd", "gw", "right-secret")
    wrong = tmp_path / "wrong-password"
    wrong.write_text("wrong-secret\n")
    broker = broker_with(tmp_path, "allow_anonymous false", f"password_file {passwords}")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0.05)

    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, backoff_max=5.0,
                          mqtt={"username": "gw", "password_file": str(wrong),
                                "protocol": protocol})
        policy = reconnect_policy(cfg.uplink).copy(sleep=sleep)
        async with running_uplink(cfg, policy=policy) as run:
            await run.store.put("lock", "close")
            assert await wait_until(lambda: len(waits) >= 3, 10)
            assert run.state.fault is not None and "login refused" in run.state.fault
            # mosquitto 2 answers a wrong password with "not authorised" (MQTT 5 code 135)
            assert any(why in run.state.fault for why in ("not authorised", "bad user name"))
            assert run.state.link != Link.ONLINE
            assert waits[-3:] == [5.0, 5.0, 5.0]  # a fault waits the cap, it will not heal
            assert (await run.store.stats()).depth == 1  # still queueing
            # the operator fixes it the systemd way: a credential, read at the next attempt
            credentials = tmp_path / "credentials"
            credentials.mkdir()
            (credentials / "mqtt-password").write_text("right-secret\n")
            monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
            object.__setattr__(cfg.mqtt, "password_file", None)
            run.uplink.flush()
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            assert run.state.fault is None
            assert await drained(run.store, 10)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path, name: str = "ca") -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, by the openssl CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN=test {name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for leaf in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}", "-keyout",
                f"{leaf}.key", "-out", f"{leaf}.csr", cwd=folder)
        openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{name}.crt", "-CAkey",
                f"{name}.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out",
                f"{leaf}.crt", cwd=folder)
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_tls_with_client_certificates(tmp_path: Path, unique_prefix: str) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", name="other")
    broker = broker_with(tmp_path, f"cafile {pki / 'ca.crt'}", f"certfile {pki / 'server.crt'}",
                         f"keyfile {pki / 'server.key'}", "require_certificate true")
    tls = {"enabled": True, "ca_file": str(pki / "ca.crt"),
           "cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key")}
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, mqtt={"tls": tls})
        async with running_uplink(cfg) as run:
            await run.store.put("siren", "test", {"seconds": 1})
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            assert await drained(run.store, 10)  # PUBACKed over TLS
        untrusted = make_config(tmp_path, broker.port, unique_prefix,
                                mqtt={"tls": {**tls, "ca_file": str(other / "other.crt")}})
        async with running_uplink(untrusted) as run:
            await run.store.put("siren", "test")
            assert await wait_until(lambda: run.state.fault is not None, 10)
            assert "TLS" in (run.state.fault or "") and "certificate" in (run.state.fault or "")
            assert (await run.store.stats()).depth == 1


async def test_broker_packet_limit_shrinks_batches_and_buries_what_cannot_fit(
        tmp_path: Path, unique_prefix: str) -> None:
    broker = broker_with(tmp_path, "max_packet_size 2048")
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, batch_delay=0.2)
        async with running_uplink(cfg) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            for n in range(12):
                await run.store.put(f"light{n % 3}", "dim", {"level": n, "pad": "x" * 200})
            await run.store.put("camera", "upload", {"blob": "y" * 3000})
            assert await drained(run.store, 10)
            assert await dead_reasons(run.store) == {"too-large": 1}
            assert run.state.link == Link.ONLINE  # the service stayed up and connected
            assert run.uplink.batcher.rules.max_batch_bytes < 2048


async def test_under_mqtt_311_a_packet_limit_costs_only_the_command_over_it(
        tmp_path: Path, unique_prefix: str) -> None:
    """3.1.1 has no CONNACK limit and no PUBACK codes: the broker just drops the link."""
    broker = broker_with(tmp_path, "max_packet_size 2048")
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, batch_delay=0.2,
                          mqtt={"protocol": "3.1.1"}, store={"max_attempts": 8})
        async with running_uplink(cfg) as run:
            for n in range(12):
                await run.store.put(f"light{n % 3}", "dim", {"level": n, "pad": "x" * 200})
            await run.store.put("camera", "upload", {"blob": "y" * 3000})
            assert await drained(run.store, 30)
            dead = await run.store.list_dead()
            assert [(d.command.device, d.reason) for d in dead] == [("camera", "max-attempts")]


async def test_a_publish_the_broker_refuses_is_dead_lettered_with_its_reason(
        tmp_path: Path, unique_prefix: str) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {unique_prefix}/+/state\n"
                   f"topic readwrite {unique_prefix}/+/commands\n")
    broker = broker_with(tmp_path, f"acl_file {acl}")
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix)
        async with running_uplink(cfg) as run:
            await run.store.put("vault", "open")
            assert await drained(run.store, 10)
            dead = await run.store.list_dead()
            assert [d.reason for d in dead] == ["rejected-by-broker"]
            assert "135" in (dead[0].detail or "")  # MQTT 5 reason 0x87: not authorised
            assert run.state.link == Link.ONLINE
            await run.store.put("vault", "open", {"again": True})  # the link still works
            assert await drained(run.store, 10)


async def test_mqtt_311_link_drains_too(tmp_path: Path, unique_prefix: str) -> None:
    broker = broker_with(tmp_path)
    with broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix, mqtt={"protocol": "3.1.1"})
        async with running_uplink(cfg) as run:
            for n in range(5):
                await run.store.put("pump", "step", {"n": n})
            assert await drained(run.store, 10)
            assert run.state.link == Link.ONLINE
            document = run.uplink.state_document()
            assert json.loads(json.dumps(document))["gateway"] == cfg.gateway_id


async def test_the_packet_limit_counts_topic_bytes_not_characters(
        tmp_path: Path, unique_prefix: str) -> None:
    """A non-ASCII topic prefix is longer on the wire than in characters."""
    limit = 2048
    prefix = f"{unique_prefix}-" + "€" * 30  # 30 characters more, 90 bytes more
    topic_chars = len(f"{prefix}/{GATEWAY}/actions")
    topic_bytes = len(f"{prefix}/{GATEWAY}/actions".encode())
    # a command whose batch fits under the limit if the topic is counted in characters,
    # and not if it is counted in bytes (the ids' and times' widths vary by a few bytes)
    target = limit - PUBLISH_OVERHEAD - topic_chars - 10
    assert target + 20 > limit - PUBLISH_OVERHEAD - topic_bytes
    pad = target - single_batch_size("camera", "upload", {"blob": ""})
    broker = broker_with(tmp_path, f"max_packet_size {limit}")
    with broker:
        cfg = make_config(tmp_path, broker.port, prefix)
        state = RecordingState()
        async with running_uplink(cfg, state=state) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            await run.store.put("camera", "upload", {"blob": "y" * pad})
            await run.store.put("lamp", "on")
            assert await drained(run.store, 10)
            assert await dead_reasons(run.store) == {"too-large": 1}
            assert state.history["link"].count(Link.ONLINE) == 1  # never dropped


def single_batch_size(device: str, name: str, params: dict[str, object]) -> int:
    """Bytes of the batch payload that carries this one command alone."""
    command = Command(id=new_id(time.time()), device=device, name=name, params=dict(params),
                      kind="action", queued_at=time.time(), expires_at=None, attempts=0,
                      last_error=None, size=0)
    made = plan([command], Rules(GATEWAY, max_batch_bytes=1 << 20), now=time.time())
    return len(made.batches[0].payload)
