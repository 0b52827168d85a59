"""The bounded read-ahead (pigateway.mqtt.ReadAhead) and the link: pausing the socket read
costs the rest of the connection nothing (keepalive, a drop, TLS).

Real mosquitto brokers on loopback (``max_inflight_messages 0``, the harness' setting: a
broker that sends past our Receive Maximum, the case the read-ahead exists for).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import aiomqtt
import pytest

from harness.broker import Mosquitto, free_port, mosquitto_binary
from harness.ingest_helpers import as_us, publish, take_acked
from harness.uplink_helpers import RecordingState, drained, make_config, running_uplink, wait_until
from pigateway import wire
from pigateway.errors import StoreError, UplinkError
from pigateway.mqtt import Connection, Settings, connect
from pigateway.state import Link
from test_uplink_security import make_pki

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


async def _paused(client: Connection, limit: int, within: float = 10.0) -> None:
    """Until the read-ahead holds ``limit`` messages (reading paused)."""
    assert await wait_until(lambda: client.waiting >= limit, within), client.waiting


async def test_a_command_flood_does_not_stall_the_uplinks_forwarding(
        tmp_path: Path, unique_prefix: str) -> None:
    """The uplink's one connection carries both the inbound commands (Intake) and the
    PUBACKs its forwarding waits for. Commands the store cannot take yet (under its disk
    reserve, locked: Intake waits them out, unacknowledged) pile up in the read-ahead; once it is
    full, reading pauses; the PUBACKs must still be read, or every publish would time out,
    the link restart and the queue never drain."""
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix)

        async def on_command(payload: bytes) -> None:
            raise StoreError("under the disk reserve (simulated)")

        state = RecordingState()
        async with running_uplink(cfg, on_command=on_command, state=state) as run:
            assert await wait_until(lambda: run.state.link == Link.ONLINE, 10)
            flood = 1500  # past the uplink's read_ahead (the default, 1024)
            assert await publish(broker, [(wire.topic(cfg, "commands"), b"{}")] * flood,
                                 window=100) == flood
            await asyncio.sleep(1.0)  # the broker pushes them all (max_inflight_messages 0)
            for n in range(20):
                await run.store.put(f"dev{n % 4}", "reading", {"n": n})
            assert await drained(run.store, 15), "readings stuck behind unread PUBACKs"
            assert not _went_offline(state)


def _went_offline(state: RecordingState) -> bool:
    links = state.history.get("link", [])
    online = links.index(Link.ONLINE) if Link.ONLINE in links else len(links)
    return Link.OFFLINE in links[online:]


async def test_a_paused_read_ahead_does_not_drop_the_link_at_keepalive(tmp_path: Path) -> None:
    """The store refusing for longer than the keepalive (15 s by default) is normal
    back-pressure, not a dead broker: the PINGRESP is only unread because we paused."""
    limit, keepalive = 20, 5
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        settings = Settings(broker.host, broker.port, client_id="slow", protocol="5",
                            persistent=True, session_expiry=300, read_ahead=limit,
                            keepalive=keepalive)
        async with connect(settings, bound=10) as client:
            lost: list[float] = []
            client.when_lost(lambda: lost.append(asyncio.get_running_loop().time()))
            await client.subscribe("z2m/#", qos=1)
            count = 200
            assert await publish(broker, [(f"z2m/{n}", str(n).encode())
                                          for n in range(count)]) == count
            await _paused(client, limit)
            await asyncio.sleep(3 * keepalive)  # nothing taken: a store that refuses
            assert not lost, "the link dropped while reading was paused"
            got = await take_acked(client, [], until=count, timeout=30)
            assert got == [str(n).encode() for n in range(count)]


async def test_messages_raises_once_the_read_ahead_is_drained_after_a_drop(tmp_path: Path) -> None:
    """Non-defect check: what was read before a drop is still yielded, then UplinkError."""
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        settings = Settings(broker.host, broker.port, client_id="drop", protocol="5",
                            persistent=True, session_expiry=300, read_ahead=10)
        async with connect(settings, bound=10) as client:
            await client.subscribe("z2m/#", qos=1)
            assert await publish(broker, [(f"z2m/{n}", b"x") for n in range(50)]) == 50
            await _paused(client, 10)
            broker.kill()
            got = 0
            with pytest.raises(UplinkError):
                async with asyncio.timeout(20):
                    async for message in client.messages():
                        got += 1
                        client.ack(message)  # on a closed client: must not raise
            assert got >= 10


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_over_tls_pause_and_resume_lose_nothing_and_keep_the_order(
        tmp_path: Path) -> None:
    """Non-defect check: TLS (decrypted bytes the socket's readiness never announces), sizes
    from 10 bytes to 40 KiB (a message across TLS records), paused and resumed many times."""
    pki = make_pki(tmp_path / "pki")
    plain = free_port()
    extra = [*as_us(), f"cafile {pki / 'ca.crt'}", f"certfile {pki / 'server.crt'}",
             f"keyfile {pki / 'server.key'}", f"listener {plain} 127.0.0.1"]
    sizes = [10, 3000, 17000, 41000, 200]
    count, limit = 600, 10
    sent = [(f"z2m/{n}", str(n).encode().ljust(sizes[n % len(sizes)], b".")) for n in range(count)]
    with Mosquitto(tmp_path / "broker", extra=extra) as broker:
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        settings = Settings(broker.host, broker.port, client_id="tls", protocol="5",
                            persistent=True, session_expiry=300, read_ahead=limit, tls=tls)
        async with connect(settings, bound=10) as client:
            await client.subscribe("z2m/#", qos=1)
            side = Mosquitto(tmp_path / "unused", port=plain)  # only its address is used
            assert await publish(side, sent, window=100) == count
            got: list[bytes] = []
            most = 0
            async with asyncio.timeout(60):
                async for message in client.messages():
                    got.append(message.payload)
                    client.ack(message)
                    assert client.waiting <= 2 * limit + 100
                    most = max(most, client.waiting)
                    if len(got) % 7 == 0:
                        await asyncio.sleep(0.01)  # a slow consumer: pause, resume
                    if len(got) == count:
                        break
    assert got == [p for _, p in sent]
    assert most >= limit - 1, "reading never paused"  # counted after a take


async def test_qos2_messages_fill_no_more_than_the_inbox(tmp_path: Path) -> None:
    """paho's loop_read reads as many packets at once as QoS 2 messages wait for their
    PUBREL (and our publishes for their acks), whatever the Inbox holds: a QoS 2 burst from
    a broker past our Receive Maximum filled it 100 times over its limit. Read one packet at
    a time, reading stops at the limit. All arrive, once and in order."""
    count, limit = 2000, 10
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        settings = Settings(broker.host, broker.port, client_id="qos2", protocol="5",
                            persistent=True, session_expiry=300, receive_maximum=20,
                            read_ahead=limit)
        async with connect(settings, bound=10) as client:
            await client.subscribe("z2m/#", qos=2)
            async with aiomqtt.Client(broker.host, broker.port,
                                      max_inflight_messages=100) as cloud:
                cloud.pending_calls_threshold = 200
                for start in range(0, count, 100):
                    await asyncio.gather(*(cloud.publish(f"z2m/{n}", str(n).encode(), qos=2)
                                           for n in range(start, start + 100)))
            got: list[int] = []
            most = 0
            async with asyncio.timeout(60):
                async for message in client.messages():
                    got.append(int(message.payload))
                    client.ack(message)
                    most = max(most, client.waiting)
                    if len(got) % 5 == 0:
                        await asyncio.sleep(0.01)  # a slow consumer
                    if len(got) == count:
                        break
            assert most < limit + 20, f"the inbox held {most} messages (limit {limit})"
    assert got == list(range(count))
