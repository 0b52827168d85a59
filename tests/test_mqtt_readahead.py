"""The bounded read-ahead (pigateway.mqtt.ReadAhead): inbound messages wait in memory only up to a
limit; past it the socket is not read, so a broker that ignores our Receive Maximum
(mosquitto 2.0 with ``max_inflight_messages 0``, the test brokers' setting) keeps the rest.

Before it, aiomqtt's unbounded queue held every message the broker pushed: 14,000 messages
and 130 MiB for ingest in a burst (scripts/bench_ingest.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness.broker import Mosquitto
from harness.ingest_helpers import as_us, publish, take_acked
from pigateway.mqtt import Message, ReadAhead, Settings, connect


def _message(n: int) -> Message:
    return Message(f"t/{n}", str(n).encode(), mid=n + 1, qos=1)


def test_reading_pauses_at_the_limit_and_resumes_at_half() -> None:
    calls: list[str] = []
    inbox = ReadAhead(8, lambda: calls.append("pause"), lambda: calls.append("resume"))
    for n in range(8):
        inbox.put(_message(n))
    assert calls == ["pause"] and inbox.paused
    inbox.put(_message(8))  # what one read brings past the limit is kept, never dropped
    taken = [inbox.take() for _ in range(4)]
    assert calls == ["pause"], "resumed before the inbox was down to half"
    taken.append(inbox.take())
    assert calls == ["pause", "resume"] and not inbox.paused
    while (message := inbox.take()) is not None:
        taken.append(message)
    assert [m.payload for m in taken if m is not None] == [str(n).encode() for n in range(9)]


async def test_wait_returns_false_when_the_link_ends_and_true_for_a_message() -> None:
    inbox = ReadAhead(4, lambda: None, lambda: None)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(inbox.wait(ended))
    await asyncio.sleep(0)
    inbox.put(_message(1))
    assert await asyncio.wait_for(waiting, 5) is True
    inbox.take()
    asyncio.get_running_loop().call_later(0.05, ended.set_result, None)
    assert await asyncio.wait_for(inbox.wait(ended), 5) is False


async def test_a_broker_past_our_receive_maximum_fills_no_more_than_the_inbox(
        tmp_path: Path) -> None:
    """2,000 messages to a subscriber that reads none: it holds at most the limit (plus what
    one socket read decodes), the broker the rest; all arrive, in order, once taken."""
    count, limit = 2000, 50
    with Mosquitto(tmp_path / "broker", extra=as_us()) as broker:
        settings = Settings(broker.host, broker.port, client_id="inbox-test", protocol="5",
                            persistent=True, session_expiry=300, receive_maximum=20,
                            read_ahead=limit)
        async with connect(settings, bound=10) as client:
            await client.subscribe("z2m/#", qos=1)
            accepted = await publish(broker, [(f"z2m/d/{n}", str(n).encode())
                                              for n in range(count)], window=100)
            assert accepted == count
            # acks flowing: then mosquitto stops counting
            got = await take_acked(client, [], until=100, timeout=30)
            await asyncio.sleep(1.0)  # the broker pushes what it will; nobody takes
            held = client.waiting
            assert limit <= held < limit + 100, f"the inbox held {held} messages"
            await take_acked(client, got, until=count, timeout=60)
    assert got == [str(n).encode() for n in range(count)]


async def test_two_waiters_both_wake_for_a_message() -> None:
    inbox = ReadAhead(4, lambda: None, lambda: None)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    first = asyncio.ensure_future(inbox.wait(ended))
    second = asyncio.ensure_future(inbox.wait(ended))
    await asyncio.sleep(0)
    inbox.put(_message(1))
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [True, True]
