"""Ingest acknowledges nothing before its commit: the local broker keeps every message that
``pigateway run`` held but had not committed, whatever stops the process.

Real parts: two mosquittos on loopback (the gateway's broker and the uplink), ``pigateway
run`` as a child process stopped with SIGTERM (as systemd does) or SIGKILL (a crash), a real
SQLite file. The queue is kept full (``max_commands`` 3 under ``reject``, the uplink down) so
that ingest holds messages it has read and cannot commit when the signal comes; then the
service starts again with room and the uplink up, and every message the local broker
accepted must reach the uplink subscriber. ``local.window`` is small so that any
acknowledgement the broker still waits for from the previous connection (a QoS 2 PUBREL
left unanswered) would fill it and stop ingest for good.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness.broker import Mosquitto
from harness.gateway import settings, write
from harness.ingest_helpers import V5, brokers, collecting, take_acked
from harness.service import Service
from harness.waits import wait_until
from pigateway.mqtt import Settings, connect
from test_store_faults import tmpfs

FORWARDED = "pg/gw-test/forward/#"
TOPIC = "z2m/held/state"
SENT = 12
ROOM = 3


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    yield from brokers(tmp_path)


def service_file(folder: Path, local: Mosquitto, uplink: Mosquitto, *, qos: int,
                 room: int | None) -> Path:
    store: dict[str, Any] = {"overflow": "reject"}
    if room is not None:
        store["max_commands"] = room
    data = settings(folder, port=uplink.port, prefix="pg", store=store, uplink={
        "batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.3})
    data["gpio"] = {"enabled": False}
    data["inbound"] = {"enabled": False}
    data["local"] = {"host": local.host, "port": local.port, "window": 4}
    data["ingest"] = [{"topic": "z2m/+/state", "qos": qos}]
    return write(folder / "config.toml", data)


async def publish_at(broker: Mosquitto, qos: int, count: int) -> int:
    """Publish ``count`` messages at ``qos``; how many the broker accepted (PUBACK, PUBCOMP)."""
    accepted = 0
    async with aiomqtt.Client(broker.host, broker.port, protocol=V5) as client:
        for n in range(count):
            await client.publish(TOPIC, str(n).encode(), qos=qos)
            accepted += 1
    return accepted


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
@pytest.mark.parametrize("qos", [1, 2])
async def test_messages_ingest_held_survive_a_stop_and_a_kill(
        pair: tuple[Mosquitto, Mosquitto], folder: Path, qos: int,
        stop: signal.Signals) -> None:
    """Every message the local broker accepted arrives on the uplink, though the service
    was stopped or killed while it held messages it could not commit (queue full)."""
    local, uplink = pair
    log = folder / "service.log"
    service = Service(service_file(folder, local, uplink, qos=qos, room=ROOM), log)
    async with collecting(uplink, FORWARDED) as collector:
        uplink.stop()  # the collector's persistent session is saved by the broker
        with service:
            assert await wait_until(lambda: "ingest: online" in service.tail(100_000), 20), \
                service.tail()
            assert await publish_at(local, qos, SENT) == SENT
            assert await wait_until(lambda: "refusing work: ingest" in service.tail(100_000), 20), \
                service.tail()
            service.signal(stop)
        service = Service(service_file(folder, local, uplink, qos=qos, room=None), log)
        uplink.start()
        with service:
            assert await wait_until(
                lambda: len(collector.first_order("pg/gw-test/forward/" + TOPIC)) >= SENT, 20), \
                (collector.first_order("pg/gw-test/forward/" + TOPIC), service.tail())
            await asyncio.sleep(0.2)
            service.stop()
    assert collector.first_order("pg/gw-test/forward/" + TOPIC) == [
        str(n).encode() for n in range(SENT)]


async def test_pubrels_an_earlier_connection_left_do_not_stop_ingest(
        pair: tuple[Mosquitto, Mosquitto]) -> None:
    """A session whose earlier client answered QoS 2 messages with PUBREC and never with
    PUBCOMP (paho's own flow under manual acks, stopped before its acks): the broker sends
    those PUBRELs again at the next connection. Each is answered, so they do not fill the
    Receive Maximum, and the messages published after them arrive."""
    local, _ = pair
    window = 4
    settings = Settings(local.host, local.port, client_id="ingest-s", protocol="5",
                        persistent=True, session_expiry=300, receive_maximum=window,
                        read_ahead=2 * window)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    async with aiomqtt.Client(local.host, local.port, identifier="ingest-s", protocol=V5,
                              clean_start=False, properties=properties) as earlier:
        earlier._client.manual_ack_set(True)  # paho PUBRECs at once; PUBCOMP waits for ack
        await earlier.subscribe("z2m/#", qos=2)
        await publish_at(local, 2, window)
        await asyncio.sleep(0.3)  # PUBREC sent, PUBREL received, PUBCOMP never
    await publish_at(local, 2, window * 3)
    async with connect(settings, bound=10) as client:  # the session keeps the subscription
        got = await take_acked(client, [], until=window * 3, timeout=10)
    assert got == [str(n).encode() for n in range(window * 3)]


@pytest.mark.root
@pytest.mark.parametrize("disk_case", [
    ("64m", 63, 0),  # SQLite's own SQLITE_FULL: 1 MiB left
    ("48m", 15, None),  # the default guard (store.min_free_bytes, 32 MiB) refuses first
], ids=["sqlite-full", "guard"])
async def test_a_full_disk_acknowledges_nothing_it_could_not_commit(
        pair: tuple[Mosquitto, Mosquitto], folder: Path, tmp_path: Path,
        disk_case: tuple[str, int, int | None]) -> None:
    """The queue's file system fills up (a real size-limited tmpfs) while messages come in
    and the uplink is down; the service is killed while full. Once space returns, every
    message the local broker accepted arrives: what the full disk refused was never
    acknowledged, so the local broker kept it."""
    local, uplink = pair
    size, filler_mib, min_free = disk_case
    count, pad = 700, b"p" * 3000  # ~2.1 MB of rows: more than the room left
    with tmpfs(tmp_path / "disk", size) as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (filler_mib * 1024 * 1024))
        path = service_file(folder, local, uplink, qos=1, room=None)
        text = path.read_text().replace(str(folder / "queue.db"), str(disk / "queue.db"))
        if min_free is None:
            text = text.replace("min_free_bytes = 0\n", "")
        path.write_text(text)
        service = Service(path, folder / "service.log")
        sent = [b"%04d" % n + pad for n in range(count)]
        async with collecting(uplink, FORWARDED) as collector:
            uplink.stop()
            with service:
                assert await wait_until(lambda: "ingest: online" in service.tail(100_000),
                                        20), service.tail()
                async with aiomqtt.Client(local.host, local.port, protocol=V5) as client:
                    for payload in sent:
                        await client.publish(TOPIC, payload, qos=1)
                assert await wait_until(lambda: "refusing work: ingest" in service.tail(100_000),
                                        20), service.tail()
                service.kill()
            filler.unlink()  # space returns
            uplink.start()
            with service:
                assert await wait_until(
                    lambda: len(set(collector.payloads("pg/gw-test/forward/" + TOPIC)))
                    >= count, 60), (len(collector.got), service.tail())
                service.stop()
    assert collector.first_order("pg/gw-test/forward/" + TOPIC) == sent
