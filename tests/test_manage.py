"""Remote management through the real service: a test client publishes on
``{prefix}/{gw}/manage`` of a real mosquitto, ``pigateway run`` (a subprocess) answers on
``results``. The test plays systemd: a service that exits with 75 (a restart asked) is
started again by this test, by the PID it started; nothing else is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from harness import gateway as harness_gateway
from harness.broker import Mosquitto
from harness.operator import GATEWAY, Operator, operating, until
from harness.ports import free_port
from harness.service import Service
from pigateway.config import MANAGE_VERBS
from pigateway.manage import handler as manage

pytestmark = pytest.mark.broker

RESTART = 75


class Systemd:
    """Restarts the service when it exits with 75, as ``Restart=on-failure`` does."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.exits: list[int] = []

    async def watch(self) -> None:
        while True:
            process = self.service.process
            if process is not None and process.poll() is not None:
                self.exits.append(process.returncode)
                self.service.process = None
                if process.returncode == RESTART:
                    self.service.start()
            await asyncio.sleep(0.1)


def write_config(tmp_path: Path, broker: Mosquitto, prefix: str,
                 manage: dict[str, Any]) -> Path:
    secret = tmp_path / "password"
    secret.write_text("s3cret-of-the-broker\n")
    secret.chmod(0o600)
    return harness_gateway.write(tmp_path / "config.toml", harness_gateway.settings(
        tmp_path, gateway_id=GATEWAY, port=broker.port, prefix=prefix,
        mqtt={"username": "gw-user", "password_file": str(secret)},
        uplink={"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5},
        inbound={"backoff_initial": 0.05, "backoff_max": 0.2},
        manage={"enabled": True, "overlay": str(tmp_path / "state" / "remote.toml"),
                **manage},
        gpio={"pin_factory": "mock"}, devices={"lamp": {"handler": "log"}}))


@contextlib.asynccontextmanager
async def managed(tmp_path: Path, broker: Mosquitto, prefix: str,
                  **manage: Any) -> AsyncIterator[tuple[Service, Operator, Systemd]]:
    service = Service(write_config(tmp_path, broker, prefix, manage), tmp_path / "service.log")
    systemd = Systemd(service)
    async with operating(service, broker.port, prefix, ("results", "state", "actions")) \
            as operator:
        watcher = asyncio.create_task(systemd.watch())
        try:
            service.start()
            await until(lambda: operator.online > 0, 20, "online", service)
            yield service, operator, systemd
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def answer(operator: Operator, service: Service, command_id: str,
                 timeout: float = 20) -> dict[str, Any]:
    await until(lambda: operator.of(command_id), timeout, f"the result of {command_id}", service)
    return operator.of(command_id)[0]


def queue_rows(tmp_path: Path) -> int:
    """Device commands in the queue file (queued and dead; results are not counted: the
    manage commands' own results are queued too), read only."""
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'queue.db'}?mode=ro",
                                            uri=True)) as db:
        return int(db.execute("SELECT (SELECT count(*) FROM outbox WHERE kind = 'action') + "
                              "(SELECT count(*) FROM dead_letters WHERE kind = 'action')"
                              ).fetchone()[0])


def delivered(operator: Operator) -> list[str]:
    """The ``n`` param of every device command the broker received, in order."""
    return [c["params"]["n"] for a in operator.actions for action in a["actions"]
            for c in action["commands"]]


def dead_rows(tmp_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'queue.db'}?mode=ro",
                                            uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM dead_letters").fetchone()[0])


def send(tmp_path: Path, n: int, ttl: float | None = None) -> list[str]:
    """``pigateway send`` ``n`` times; the ids."""
    extra = [] if ttl is None else ["--ttl", str(ttl)]
    return [subprocess.run([sys.executable, "-m", "pigateway", "send", "--config",
                            str(tmp_path / "config.toml"), "--device", "lamp", "--command",
                            "on", "--param", f"n=c{i}", *extra],
                           check=True, capture_output=True, timeout=30, text=True).stdout.strip()
            for i in range(n)]


# --------------------------------------------------------------------------- the verbs


async def test_each_read_and_control_verb_round_trips(tmp_path: Path, mosquitto: Mosquitto,
                                                      unique_prefix: str) -> None:
    async with managed(tmp_path, mosquitto, unique_prefix, allow=list(MANAGE_VERBS)) \
            as (service, operator, _):
        status = await answer(operator, service, await operator.ask("status"))
        assert status["status"] == "ok" and status["detail"]["link"] == "online"

        # paused, the gateway sends nothing, its results too: pause's comes after resume
        pause_id = await operator.ask("pause")
        await until(lambda: f"manage: pause {pause_id} done" in service.tail(20000), 20,
                    "the pause", service)
        await asyncio.sleep(0.5)
        assert operator.of(pause_id) == []
        resumed = await answer(operator, service, await operator.ask("resume"))
        paused = await answer(operator, service, pause_id)
        assert paused["status"] == "ok" and paused["detail"]["paused"] is True
        assert resumed["status"] == "ok" and resumed["detail"]["paused"] is False
        flushed = await answer(operator, service, await operator.ask("flush"))
        assert flushed["status"] == "ok"

        stats = await answer(operator, service, await operator.ask("queue-stats"))
        assert stats["status"] == "ok" and stats["detail"]["depth"] == 0

        requeue = await answer(operator, service,
                               await operator.ask("requeue-dead", {"id": "no-such-id"}))
        assert requeue["status"] == "ok" and requeue["detail"] == {"requeued": 0}
        # a dead letter (expired while paused), by the CLI's rules: expired ones on request
        await operator.ask("pause")
        dead_id = send(tmp_path, 1, ttl=0.5)[0]
        await asyncio.sleep(1.0)
        await answer(operator, service, await operator.ask("resume"))
        await until(lambda: queue_rows(tmp_path) == 1 and dead_rows(tmp_path) == 1, 20,
                    "the expired command to be a dead letter", service)
        refused = await answer(operator, service,
                               await operator.ask("requeue-dead", {"id": dead_id}))
        assert refused["status"] == "rejected" and "expired" in refused["detail"]
        requeued = await answer(operator, service, await operator.ask(
            "requeue-dead", {"id": dead_id, "expired": True}))
        assert requeued["detail"] == {"requeued": 1}
        await until(lambda: queue_rows(tmp_path) == 0, 20, "the requeued one to go", service)
        no_id = await answer(operator, service, await operator.ask("requeue-dead"))
        assert no_id["status"] == "rejected" and "params.id" in no_id["detail"]

        config = await answer(operator, service, await operator.ask("config-get"))
        assert config["status"] == "ok"
        effective = config["detail"]["effective"]
        assert effective["mqtt"]["port"] == mosquitto.port
        shown = {effective["mqtt"]["password_file"], effective["mqtt"]["username"]}
        assert shown == {"(withheld)"}
        assert "s3cret" not in json.dumps(config) and "gw-user" not in json.dumps(config)
        assert str(tmp_path / "password") not in json.dumps(config)

        # outside systemd the journal holds nothing of this service: this run's own lines,
        # from memory, say what it did (the pause above among them)
        logs = await answer(operator, service, await operator.ask("logs", {"lines": 50}))
        assert logs["status"] == "ok", logs
        assert logs["detail"]["source"].startswith("memory")
        assert 0 < len(logs["detail"]["lines"]) <= 50
        assert any(f"manage: pause {paused['id']}" in line for line in logs["detail"]["lines"])
        too_many = await answer(operator, service,
                                await operator.ask("logs", {"lines": 10 ** 6}))
        assert too_many["status"] == "rejected" and "manage.log_lines" in too_many["detail"]

        log = (tmp_path / "service.log").read_text()
        assert f"manage: pause {paused['id']} done" in log


async def test_restart_answers_once_and_comes_back(tmp_path: Path, mosquitto: Mosquitto,
                                                   unique_prefix: str) -> None:
    async with managed(tmp_path, mosquitto, unique_prefix, allow=["status", "restart", "pause"]) \
            as (service, operator, systemd):
        await operator.ask("pause")
        await until(lambda: "manage: pause" in service.tail(20000), 20, "the pause", service)
        send(tmp_path, 3)
        assert queue_rows(tmp_path) == 3
        command_id = await operator.ask("restart")
        await until(lambda: RESTART in systemd.exits, 30, "the exit with 75", service)
        await until(lambda: queue_rows(tmp_path) == 0, 20, "the queue to drain", service)
        # acknowledged by the broker first, then handed to the operator's session
        await until(lambda: len(delivered(operator)) >= 3, 10, "the commands", service)
        assert sorted(delivered(operator)) == ["c0", "c1", "c2"]
        await until(lambda: operator.online >= 2, 20, "online again", service)
        reply = await answer(operator, service, command_id)
        assert reply["status"] == "ok"
        status = await answer(operator, service, await operator.ask("status"))
        assert status["detail"]["link"] == "online"
        await asyncio.sleep(1.0)
        assert len(operator.of(command_id)) == 1 and systemd.exits == [RESTART]


async def test_config_set_applies_and_config_get_shows_it(tmp_path: Path,
                                                          mosquitto: Mosquitto,
                                                          unique_prefix: str) -> None:
    async with managed(tmp_path, mosquitto, unique_prefix, rollback_after=20,
                       allow=["config-set", "config-get", "pause"]) \
            as (service, operator, systemd):
        await operator.ask("pause")  # its result waits in the queue with the commands
        await until(lambda: "manage: pause" in service.tail(20000), 20, "the pause", service)
        send(tmp_path, 3)
        assert queue_rows(tmp_path) == 3
        command_id = await operator.ask("config-set", {"set": {"uplink.batch_delay": 0.02}})
        reply = await answer(operator, service, command_id, timeout=40)
        assert reply["status"] == "ok" and reply["detail"] == {"applied": True}
        assert systemd.exits == [RESTART]
        shown = await answer(operator, service, await operator.ask("config-get"))
        assert shown["detail"]["effective"]["uplink"]["batch_delay"] == 0.02
        assert shown["detail"]["overlay"] == {"uplink": {"batch_delay": 0.02}}
        assert not (tmp_path / "state" / "remote.pending.toml").exists()
        # not paused after the restart: the 3 commands drain, each exactly once
        await until(lambda: len(delivered(operator)) >= 3, 20, "the commands to drain",
                    service)
        await until(lambda: queue_rows(tmp_path) == 0, 20, "an empty queue", service)
        assert sorted(delivered(operator)) == ["c0", "c1", "c2"]


@pytest.mark.parametrize("fault", ["a broker that does not answer", "a CA file that does not load"])
async def test_config_set_that_leaves_the_gateway_offline_rolls_back_by_itself(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str, fault: str) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                       "-----END CERTIFICATE-----\n")
    change = ({"mqtt.port": free_port()} if fault.startswith("a broker") else
              {"mqtt.tls.enabled": True, "mqtt.tls.ca_file": str(garbage)})
    async with managed(tmp_path, mosquitto, unique_prefix, rollback_after=5,
                       allow=["config-set", "config-get", "status"]) \
            as (service, operator, systemd):
        command_id = await operator.ask("config-set", {"set": change})
        await until(lambda: systemd.exits == [RESTART], 30, "the restart to try it", service)
        # the trial is offline: what is queued now stays on disk, untouched by the rollback
        send(tmp_path, 3)
        assert queue_rows(tmp_path) == 3
        reply = await answer(operator, service, command_id, timeout=60)
        assert reply["status"] == "error" and "rolled back" in reply["detail"]
        assert "manage.rollback_after" in reply["detail"]
        assert systemd.exits == [RESTART, RESTART]
        await until(lambda: queue_rows(tmp_path) == 0, 20, "the queue to drain", service)
        assert sorted(delivered(operator)) == ["c0", "c1", "c2"]
        shown = await answer(operator, service, await operator.ask("config-get"))
        assert shown["detail"]["effective"]["mqtt"]["port"] == mosquitto.port
        assert shown["detail"]["overlay"] == {}


async def test_config_set_is_refused_naming_the_key(tmp_path: Path, mosquitto: Mosquitto,
                                                    unique_prefix: str) -> None:
    async with managed(tmp_path, mosquitto, unique_prefix,
                       allow=["config-set", "status", "pause", "resume"]) \
            as (service, operator, systemd):
        await operator.ask("pause")  # the queue holds still while config-set is refused
        await until(lambda: "manage: pause" in service.tail(20000), 20, "the pause", service)
        send(tmp_path, 3)
        assert queue_rows(tmp_path) == 3
        asked: list[tuple[str, str]] = []
        for change, words in [({"mqtt.port": 0}, "mqtt.port"),
                              ({"mqtt.tls.ca_file": str(tmp_path / "missing.pem"),
                                "mqtt.tls.enabled": True}, "mqtt.tls.ca_file"),
                              ({"store.path": "/tmp/other.db"}, "store.path"),
                              ({"manage.allow": ["config-set"]}, "manage.allow"),
                              ({"uplink.nonsense": 1}, "uplink.nonsense")]:
            asked.append((await operator.ask("config-set", {"set": change}), words))
        await until(lambda: service.tail(20000).count("manage: config-set") == len(asked), 20,
                    "the refusals", service)
        await asyncio.sleep(1.0)
        assert systemd.exits == []
        assert not (tmp_path / "state" / "remote.pending.toml").exists()
        assert queue_rows(tmp_path) == 3
        await answer(operator, service, await operator.ask("resume"))
        for command_id, words in asked:
            reply = await answer(operator, service, command_id)
            assert reply["status"] == "rejected", reply
            assert words in reply["detail"], reply
        await until(lambda: queue_rows(tmp_path) == 0, 20, "the queue to drain", service)
        assert sorted(delivered(operator)) == ["c0", "c1", "c2"]


async def test_a_hostile_publisher_gets_rejections_and_the_service_goes_on(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    async with managed(tmp_path, mosquitto, unique_prefix) as (service, operator, systemd):
        hostile = [
            (b'{"v":1,"id":"h-1e400","name":"status","params":{"x":1e400}}', "out of range"),
            (b'{"v":1,"id":"h-sur","name":"status","params":{"x":"\\ud800"}}', "surrogate"),
            (b'{"v":1,"id":"h-verb","name":"rm-rf","params":{}}', "unknown verb"),
            (b'{"v":1,"id":"h-deny","name":"config-set","params":{}}', "not allowed"),
            (b'{"v":1,"id":"h-pause","name":"pause","params":{}}', "not allowed"),
            (b'{"v":1,"id":"h-dev","name":"status","params":{},"device":"lamp"}',
             "unknown field"),
            (b'{"v":2,"id":"h-v2","name":"status","params":{}}', "version"),
            (b'{"v":1,"id":"h-params","name":"status","params":[]}', "params"),
            (b'{"v":1,"id":"h-extra","name":"status","params":{"a":1}}', "takes no param"),
        ]
        for payload, _ in hostile:
            await operator.manage(payload)
        huge = json.dumps({"v": 1, "id": "h-huge", "name": "status",
                           "params": {"x": "a" * 200_000}}).encode()
        for junk in (b"{not json", b"\xff\xfe", b"[]", b"1e400", huge, b'{"v":1}'):
            await operator.manage(junk)
        for payload, words in hostile:
            command_id = payload.split(b'"id":"')[1].split(b'"')[0].decode()
            reply = await answer(operator, service, command_id)
            assert reply["status"] == "rejected", reply
            assert words in reply["detail"], reply
        # a replayed id is answered from the record: one run, the same result
        first = await operator.ask("status", command_id="same-id")
        one = await answer(operator, service, first)
        await operator.ask("status", command_id="same-id")
        await until(lambda: len(operator.of("same-id")) == 2, 20, "the replay's answer", service)
        assert operator.of("same-id")[1] == one
        assert service.alive and systemd.exits == []
        status = await answer(operator, service, await operator.ask("status"))
        assert status["status"] == "ok" and status["detail"]["link"] == "online"
        assert "h-huge" not in json.dumps(operator.results)  # no id could be read: dropped


def documented_acl(prefix: str) -> str:
    """The ``acl_file`` block of docs/operations.md, as written, under ``prefix``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    block = text.split("```acl\n", 1)[1].split("```", 1)[0]
    return block.replace("pigateway/", f"{prefix}/")


def acl_broker_lines(folder: Path, prefix: str, users: dict[str, str]) -> list[str]:
    """mosquitto options: these users only, and the documented ACL."""
    folder.mkdir()
    passwd, acl = folder / "passwd", folder / "acl"
    for n, (user, password) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if n == 0 else []), "-b", str(passwd),
                        user, password], check=True, capture_output=True, timeout=30)
    acl.write_text(documented_acl(prefix))
    return [*(["user root"] if os.geteuid() == 0 else []), "allow_anonymous false",
            f"password_file {passwd}", f"acl_file {acl}"]


async def test_the_documented_acl_lets_only_the_operator_publish_on_manage(
        tmp_path: Path, unique_prefix: str) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    users = {GATEWAY: "gw-pass", "fleet-operator": "op-pass", "intruder": "in-pass"}
    folder = tmp_path / "acl-broker"
    extra = acl_broker_lines(folder, unique_prefix, users)
    with Mosquitto(folder, extra=extra) as broker:
        secret = tmp_path / "gw-password"
        secret.write_text("gw-pass\n")
        secret.chmod(0o600)
        path = harness_gateway.write(tmp_path / "config.toml", harness_gateway.settings(
            tmp_path, gateway_id=GATEWAY, port=broker.port, prefix=unique_prefix,
            mqtt={"username": GATEWAY, "password_file": str(secret)},
            uplink={"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5},
            manage={"enabled": True, "allow": ["status", "pause"],
                    "overlay": str(tmp_path / "state" / "remote.toml")},
            gpio={"pin_factory": "mock"}, devices={"lamp": {"handler": "log"}}))
        service = Service(path, tmp_path / "service.log")
        base = f"{unique_prefix}/{GATEWAY}"
        async with operating(service, broker.port, unique_prefix, ("results", "state"),
                             username="fleet-operator",
                             password=users["fleet-operator"]) as operator:
            service.start()
            await until(lambda: operator.online > 0, 20, "online", service)
            async with aiomqtt.Client("127.0.0.1", broker.port, username="intruder",
                                      password=users["intruder"], identifier="intruder") as bad:
                with contextlib.suppress(aiomqtt.MqttError):  # refused: 0x87
                    await bad.publish(f"{base}/manage", json.dumps(
                        {"v": 1, "id": "intruder-1", "name": "pause", "params": {}}).encode(),
                        qos=1)
            reply = await answer(operator, service, await operator.ask("status"))
            assert reply["status"] == "ok" and reply["detail"]["paused"] is False
            await asyncio.sleep(0.5)
            assert operator.of("intruder-1") == []
            assert "intruder-1" not in service.tail(50_000)


def test_config_get_withholds_every_credential_name_and_path_devices_included(
        tmp_path: Path) -> None:
    """config-get's effective config names no credential: not the uplink's, the local
    broker's, nor a device handler's (a user name, a password file, a systemd credential
    name, a TLS key or certificate)."""
    secret_names = ["zig-user", "zig-pass-credential", str(tmp_path / "zig-password"),
                    str(tmp_path / "client.key"), str(tmp_path / "client.crt")]
    config = harness_gateway.config(
        tmp_path, port=1883,
        mqtt={"tls": {"enabled": True, "key_file": secret_names[3],
                      "cert_file": secret_names[4]}},
        devices={"zig": {"handler": "mqtt", "username": secret_names[0],
                         "password_credential": secret_names[1]},
                 "zag": {"handler": "mqtt", "username": secret_names[0],
                         "password_file": secret_names[2]}})
    shown = json.dumps(manage.withheld(config.as_dict()))
    assert "zig" in shown and "(withheld)" in shown  # the devices are there, their secrets not
    for name in secret_names:
        assert name not in shown, name


async def test_config_set_that_would_shut_out_config_set_is_refused(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    """A config-set may not commit limits under which no config-set can arrive any more (a
    depth that refuses ``{"params":{"set":{...}}}``, a payload bound smaller than one): the
    gateway would be online, so committed, and out of remote reach for good."""
    async with managed(tmp_path, mosquitto, unique_prefix, allow=["config-set", "status"]) \
            as (service, operator, systemd):
        asked = [(await operator.ask("config-set", {"set": change}), words)
                 for change, words in [({"inbound.max_depth": 2}, "inbound.max_depth"),
                                       ({"inbound.max_payload_bytes": 100},
                                        "inbound.max_payload_bytes")]]
        for command_id, words in asked:
            reply = await answer(operator, service, command_id)
            assert reply["status"] == "rejected", reply
            assert words in reply["detail"], reply
        assert systemd.exits == []
        assert not (tmp_path / "state" / "remote.pending.toml").exists()
        status = await answer(operator, service, await operator.ask("status"))
        assert status["status"] == "ok"


async def test_config_set_whose_manage_topic_the_broker_refuses_rolls_back(
        tmp_path: Path, unique_prefix: str) -> None:
    """Online is not proof enough: a config-set under which the broker refuses the manage
    subscription (here a topic prefix the documented ACL does not grant) would leave the
    gateway online and out of the operator's reach for good. It is rolled back, and its
    result comes back on the topics the operator reaches it on."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    users = {GATEWAY: "gw-pass", "fleet-operator": "op-pass"}
    folder = tmp_path / "acl-broker"
    with Mosquitto(folder, extra=acl_broker_lines(folder, unique_prefix, users)) as broker:
        secret = tmp_path / "gw-password"
        secret.write_text("gw-pass\n")
        secret.chmod(0o600)
        path = harness_gateway.write(tmp_path / "config.toml", harness_gateway.settings(
            tmp_path, gateway_id=GATEWAY, port=broker.port, prefix=unique_prefix,
            mqtt={"username": GATEWAY, "password_file": str(secret)},
            uplink={"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5},
            manage={"enabled": True, "allow": ["status", "config-set"], "rollback_after": 5,
                    "overlay": str(tmp_path / "state" / "remote.toml")},
            gpio={"pin_factory": "mock"}, devices={"lamp": {"handler": "log"}}))
        service = Service(path, tmp_path / "service.log")
        systemd = Systemd(service)
        async with operating(service, broker.port, unique_prefix, ("results", "state"),
                             username="fleet-operator",
                             password=users["fleet-operator"]) as operator:
            watcher = asyncio.create_task(systemd.watch())
            try:
                service.start()
                await until(lambda: operator.online > 0, 20, "online", service)
                command_id = await operator.ask(
                    "config-set", {"set": {"mqtt.topic_prefix": "elsewhere"}})
                reply = await answer(operator, service, command_id, timeout=40)
                assert reply["status"] == "error" and "rolled back" in reply["detail"], reply
                status = await answer(operator, service, await operator.ask("status"))
                assert status["status"] == "ok"
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
