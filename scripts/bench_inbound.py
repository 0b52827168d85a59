"""Benchmark, part 3: inbound commands end to end, through a real mosquitto and the service.

A test client publishes ``{prefix}/{gw}/commands`` (QoS 1) and reads ``/results``; the
service (``pigateway run``, a subprocess) validates, persists, runs the ``log`` handler and
sends each result back through the durable outbox. Two figures:

* round trip (publish -> result received) at a steady 50 commands/s: p50 and p99;
* sustained rate with 4 workers over 20 devices: commands published as fast as the broker
  takes them, rate = commands / (first publish -> last result), every result committed to
  the outbox before it was sent (checked afterwards in the inbox: all rows ``done``).

Run through ``scripts/bench`` (``--quick`` runs fewer commands for a smoke run).

The brokers, the config and the service come from the tests' harness (``tests/harness``),
which ``scripts/bench`` puts on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt

from harness import gateway
from harness.broker import Mosquitto
from harness.service import Service
from pigateway.config import load
from pigateway.inbound import list_inbox

GATEWAY = "bench"
PREFIX = "bench"
DEVICES = 20
WORKERS = 4
RATE = 50.0
TARGET_P99_MS = 50.0
TARGET_SUSTAINED = 1000.0


def write_config(folder: Path, port: int) -> Path:
    return gateway.write(folder / "config.toml", gateway.settings(
        folder, gateway_id=GATEWAY, port=port, prefix=PREFIX,
        uplink={"batch_delay": 0.0}, inbound={"workers": WORKERS},
        gpio={"pin_factory": "mock", "enabled": False},
        log={"level": "warning"},  # the log handler's INFO lines would measure stderr
        devices={f"d{index:02d}": {"handler": "log"} for index in range(DEVICES)}))


class Results:
    """Receive times of results by command id."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.statuses: dict[str, int] = {}
        self.online = asyncio.Event()
        self.changed = asyncio.Event()

    async def collect(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if message.topic.matches(f"{PREFIX}/{GATEWAY}/state"):
                with contextlib.suppress(ValueError, AttributeError):
                    if json.loads(payload).get("link") == "online":
                        self.online.set()
                continue
            document = json.loads(payload)
            self.at.setdefault(document["id"], time.perf_counter())
            self.finished.setdefault(document["id"], document["finished_at"])
            self.statuses[document["status"]] = self.statuses.get(document["status"], 0) + 1
            self.changed.set()

    async def wait_for(self, ids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= self.at.keys():
            if time.monotonic() > deadline:
                missing = len(ids - self.at.keys())
                raise SystemExit(f"bench: {missing} results did not arrive in {timeout}s")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self.changed.wait()


def send_at_once(client: aiomqtt.Client) -> None:
    """TCP_NODELAY on the operator's socket, as the service and the harness's broker have
    it: with Nagle on, a command published while the client's PUBACK of a result is not
    yet acknowledged waits for the broker's delayed ACK (40 ms on Linux), which put about
    one round trip in ten at 40 ms and more: the client's wait, not the gateway's."""
    sock = client._client.socket()  # aiomqtt exposes no socket of its own
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def command(command_id: str, device: int) -> bytes:
    return json.dumps({"v": 1, "id": command_id, "device": f"d{device % DEVICES:02d}",
                       "name": "ping", "params": {"n": device}}).encode()


@contextlib.asynccontextmanager
async def service_and_client(folder: Path) -> AsyncIterator[tuple[aiomqtt.Client, Results,
                                                                   Path]]:
    with Mosquitto(folder / "broker") as broker:
        config = write_config(folder, broker.port)
        service = Service(config, folder / "service.log").start()
        try:
            quiet = logging.getLogger("bench.mqtt")
            quiet.setLevel(logging.ERROR)  # aiomqtt warns about every pending publish
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-client",
                                      max_inflight_messages=2000, logger=quiet) as client:
                send_at_once(client)
                results = Results()
                await client.subscribe(f"{PREFIX}/{GATEWAY}/results", qos=1)
                await client.subscribe(f"{PREFIX}/{GATEWAY}/state", qos=1)
                task = asyncio.create_task(results.collect(client))
                async with asyncio.timeout(30):
                    await results.online.wait()
                try:
                    yield client, results, config
                finally:
                    task.cancel()
        finally:
            service.stop(timeout=20)


async def round_trips(client: aiomqtt.Client, results: Results, count: int,
                      prefix: str = "rt") -> list[float]:
    """Publish at a steady RATE; milliseconds from each publish to its result."""
    sent: dict[str, float] = {}
    start = time.perf_counter()
    for index in range(count):
        await asyncio.sleep(max(0.0, start + index / RATE - time.perf_counter()))
        command_id = f"{prefix}{index:06d}"
        sent[command_id] = time.perf_counter()
        results.wall[command_id] = time.time()
        await client.publish(f"{PREFIX}/{GATEWAY}/commands", command(command_id, index), qos=1)
    await results.wait_for(set(sent), 60)
    inside = [(results.finished[i] - results.wall[i]) * 1000 for i in sent]
    print(f"  publish -> result recorded: p50 {statistics.median(inside):.1f} ms, "
          f"p99 {percentile(inside, 0.99):.1f} ms", file=sys.stderr)
    return [(results.at[i] - sent[i]) * 1000 for i in sent]


async def sustained(client: aiomqtt.Client, results: Results, count: int) -> float:
    """Commands/s from the first publish to the last result, publishing flat out."""
    ids = [f"s{index:07d}" for index in range(count)]
    start, wall = time.perf_counter(), time.time()
    for chunk in range(0, count, 500):
        await asyncio.gather(*(
            client.publish(f"{PREFIX}/{GATEWAY}/commands", command(i, n), qos=1)
            for n, i in enumerate(ids[chunk:chunk + 500], start=chunk)))
    published = time.perf_counter() - start
    await results.wait_for(set(ids), 300)
    recorded = max(results.finished[i] for i in ids) - wall
    print(f"  sustained: published in {published:.2f}s, all recorded after {recorded:.2f}s",
          file=sys.stderr)
    return count / (max(results.at[i] for i in ids) - start)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def main(quick: bool) -> None:
    trips_count, sustained_count = (150, 3000) if quick else (1000, 10_000)
    with tempfile.TemporaryDirectory(prefix="bench-inbound-") as tmp:
        folder = Path(tmp)
        async with service_and_client(folder) as (client, results, config):
            await round_trips(client, results, 20, prefix="warm")
            trips = await round_trips(client, results, trips_count)
            rate = await sustained(client, results, sustained_count)
            statuses = dict(results.statuses)
        entries = await list_inbox(load(config), limit=10 * sustained_count)
    done = sum(1 for e in entries if e["state"] == "done" and e["status"] == "ok")
    expected = trips_count + sustained_count + 20
    p50, p99 = statistics.median(trips), percentile(trips, 0.99)
    print(f"# inbound benchmark: log handler, {DEVICES} devices, {WORKERS} workers, "
          "synchronous=FULL, real mosquitto on loopback")
    print(f"round trips at {RATE:.0f} cmd/s: {len(trips)}  sustained run: {sustained_count:,} "
          f"commands  results by status: {statuses}")
    print(f"inbox rows done/ok afterwards: {done:,} of {expected:,}")
    rows = [
        (f"round trip p50 at {RATE:.0f} cmd/s", f"{p50:.1f} ms", "-", True),
        (f"round trip p99 at {RATE:.0f} cmd/s", f"{p99:.1f} ms", f"< {TARGET_P99_MS:.0f} ms",
         p99 < TARGET_P99_MS),
        (f"sustained, {WORKERS} workers x {DEVICES} devices", f"{rate:,.0f} cmd/s",
         f">= {TARGET_SUSTAINED:,.0f}", rate >= TARGET_SUSTAINED),
        ("every result durable (inbox done)", f"{done:,}/{expected:,}", "all",
         done == expected),
    ]
    print(f"\n{'target':<40}{'measured':<18}{'wanted':<14}verdict")
    for name, measured, wanted, ok in rows:
        print(f"{name:<40}{measured:<18}{wanted:<14}{'ok' if ok else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer commands (a smoke run)")
    asyncio.run(main(parser.parse_args().quick))
