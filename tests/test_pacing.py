"""Pacing (``[uplink] max_messages_per_second``, ``max_bytes_per_second``): the token
bucket on a clock the test moves, and a real drain counted at the proxy in front of a real
mosquitto."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.mqttproxy import RefusingProxy
from harness.uplink_helpers import make_config, running_uplink
from pigateway.store import NewCommand
from pigateway.uplink.pacing import Pacer, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_burst_is_one_seconds_worth_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(50, clock=clock)
    assert all(bucket.wait_for(1) == 0 for _ in range(50))
    assert bucket.wait_for(1) == pytest.approx(1 / 50)
    clock.now += 0.5
    assert sum(1 for _ in range(100) if bucket.wait_for(1) == 0) == 25


def test_a_take_bigger_than_the_burst_waits_for_a_full_bucket_and_leaves_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(1000, clock=clock)
    assert bucket.wait_for(10) == 0
    assert bucket.wait_for(5000) == pytest.approx(10 / 1000)  # refused outright it is not
    clock.now += 0.01
    assert bucket.wait_for(5000) == 0
    assert bucket.wait_for(1) == pytest.approx(4001 / 1000)


def test_zero_is_no_limit() -> None:
    assert not Pacer(0, 0).active
    with pytest.raises(ValueError, match="rate above 0"):
        TokenBucket(0)


def most_in_any_window(times: list[float], window: float) -> int:
    """The most publishes seen in any ``window`` seconds (sliding, from each publish on)."""
    times = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.broker
async def test_a_drain_under_50_messages_per_second_stays_within_the_bucket(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    rate, window = 50, 4.0
    proxy = await RefusingProxy(mosquitto.port, lambda *_: None).start()
    try:
        cfg = make_config(tmp_path, proxy.port, unique_prefix, max_messages_per_second=rate,
                          max_actions=1, max_inflight=16)  # one device per batch: many publishes
        async with running_uplink(cfg) as run:
            await run.store.put_many([NewCommand(f"dev{n}", "on") for n in range(2000)])
            started = time.monotonic()
            await asyncio.sleep(window + 1.5)  # the bounded window the publishes are counted in
            depth = (await run.store.stats()).depth
    finally:
        await proxy.close()
    times = [at for at, _ in proxy.published if at >= started]
    delivered = 2000 - depth
    # the bucket: at most the burst (one second's worth) plus the rate times the window
    assert most_in_any_window(times, 1.0) <= 2 * rate + 1
    assert most_in_any_window(times, window) <= rate * window + rate + 1
    assert len(times) >= rate * window  # and it was kept busy: the limit, not idleness
    assert delivered >= rate * window - rate  # commands/s delivered: one per message here
    print(f"commands/s delivered under {rate} msg/s: {delivered / (window + 1.5):.0f}")
