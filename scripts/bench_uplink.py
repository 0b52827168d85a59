"""Benchmark, part 2: the uplink, side by side with what a user would pick instead.

One run on this machine, everything on 127.0.0.1, ~200 bytes of params per command,
50 devices, real mosquitto brokers:

- drain a 100,000-command backlog through pigateway's uplink, as commands/s, against
  (a) raw aiomqtt publishing the same commands one QoS 1 message each, 100 in flight, and
  (b) a mosquitto bridge forwarding the same 100,000 messages after an outage (an edge
  broker that queued them, bridged to the receiving broker);
- online latency from ``put`` to receipt at a subscriber at 100 commands/s, p50 and p99;
- RSS of ``pigateway run`` while it drains a 1,000,000-command backlog, and the time and
  peak RSS of the integrity check its start runs over that backlog (target <= 5 s here);
- cloud part (``--cloud`` runs only it): the drain under ``max_messages_per_second = 100``
  (a cloud's publish quota) as commands/s, and the time to drain 100,000 through the
  refusing proxy (``tests/harness/mqttproxy.py``) answering 10% of PUBACKs 0x97 (quota exceeded)
  for the first 10 s, with the dead letters it left (target 0).

Rates are counted at a receiver in its own process (paho, no asyncio) from the first
arrival to the last, so each side is timed on the same path. Run through ``scripts/bench``;
``--quick`` scales everything down for a smoke run.

The brokers, the config and the service come from the tests' harness (``tests/harness``),
which ``scripts/bench`` puts on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from harness import gateway
from harness.broker import Mosquitto
from harness.mqttproxy import RefusingProxy
from harness.ports import free_port
from harness.service import Service
from pigateway import config as configuration
from pigateway.state import GatewayState, Link
from pigateway.store import NewCommand, Store
from pigateway.uplink import Uplink

GATEWAY = "bench-gw"
PREFIX = "bench"
DEVICES = 50
PARAMS = {"level": 80, "note": "x" * 180}  # about 200 bytes of JSON

RECEIVER = r'''
import json, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, topic, mode = sys.argv[1], sys.argv[2], sys.argv[4]
expected, limit = int(sys.argv[3]), float(sys.argv[5])
seen = {"count": 0, "first": None, "last": None, "arrivals": {}, "delays": []}
def on_connect(client, userdata, flags, rc, props=None):
    client.subscribe(topic, qos=1)
def on_subscribe(client, userdata, mid, rcs, props=None):
    print("ready", flush=True)
def on_message(client, userdata, msg):
    now = time.time()
    if seen["first"] is None:
        seen["first"] = now
    if mode == "paced":
        doc = json.loads(msg.payload)
        got = sum(len(action["commands"]) for action in doc["actions"])
        seen["count"] += got
        seen["delays"].append((now, got))
    elif mode in ("batch", "latency"):
        doc = json.loads(msg.payload)
        for action in doc["actions"]:
            for command in action["commands"]:
                seen["count"] += 1
                if mode == "latency":
                    seen["arrivals"][command["id"]] = now
                    seen["delays"].append(now - command["queued_at"])
    else:
        seen["count"] += 1
    seen["last"] = now
    if seen["count"] >= expected:
        client.disconnect()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-receiver-" + mode)
client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
client.connect("127.0.0.1", int(port), 30)
deadline = time.time() + limit
while seen["count"] < expected and time.time() < deadline:
    client.loop(0.2)
print(json.dumps(seen), flush=True)
'''


class Receiver:
    """A paho subscriber in its own process; ``result()`` waits for its counts."""

    def __init__(self, port: int, topic: str, expected: int, mode: str, limit: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", RECEIVER, str(port), topic, str(expected), mode, str(limit)],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit("bench receiver did not subscribe")

    def result(self, limit: float) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=limit)
        data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return data


def rate(seen: dict[str, Any]) -> float:
    span = (seen["last"] or 0) - (seen["first"] or 0)
    return float(seen["count"] / span) if span > 0 else 0.0


def broker(folder: Path, *extra: str, port: int | None = None) -> Mosquitto:
    return Mosquitto(folder, port=port, persistence=False, extra=["user root", *extra])


def commands(count: int, start: int = 0) -> list[NewCommand]:
    return [NewCommand(f"device{n % DEVICES:02d}", "set", PARAMS)
            for n in range(start, start + count)]


async def fill(path: Path, count: int) -> None:
    cfg = configuration.StoreConfig(path=path, min_free_bytes=0, max_commands=2_000_000,
                                    max_bytes=2 * 1024**3)
    async with await Store.open(cfg, drainer=False) as store:
        for start in range(0, count, 5000):
            await store.put_many(commands(min(5000, count - start), start))


def gateway_settings(folder: Path, port: int, **tables: Any) -> dict[str, Any]:
    """The bench gateway: room for the biggest backlog, and ``tables`` over it."""
    return gateway.settings(folder, gateway_id=GATEWAY, port=port, prefix=PREFIX,
                            store={"max_commands": 2_000_000, "max_bytes": 2 * 1024**3},
                            **tables)


def gateway_config(folder: Path, port: int, **uplink: Any) -> configuration.Config:
    return configuration.from_dict(gateway_settings(folder, port, uplink=uplink,
                                                    gpio={"enabled": False}))


# --------------------------------------------------------------------------- drain


async def drain_pigateway(folder: Path, count: int) -> float:
    """Commands/s of pigateway's uplink draining a backlog of ``count``."""
    with broker(folder / "broker") as mosq:
        cfg = gateway_config(folder, mosq.port)
        await fill(cfg.store.path, count)
        receiver = Receiver(mosq.port, f"{PREFIX}/{GATEWAY}/actions", count, "batch", 300)
        async with await Store.open(cfg.store) as store:
            uplink = Uplink(cfg, store, GatewayState())
            task = asyncio.create_task(uplink.run())
            seen = await asyncio.to_thread(receiver.result, 310)
            await uplink.stop(5)
            await asyncio.wait({task}, timeout=5)
            task.cancel()
    if seen["count"] < count:
        raise SystemExit(f"pigateway drained only {seen['count']} of {count}")
    return rate(seen)


async def publish_raw(port: int, count: int, window: int = 100) -> None:
    """Raw aiomqtt: one QoS 1 message per command, ``window`` awaiting PUBACK at a time."""
    slots = asyncio.Semaphore(window)
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-raw",
                              max_inflight_messages=window) as client:
        client.pending_calls_threshold = window + 10  # a full window is the point here
        async def one(n: int) -> None:
            try:
                payload = json.dumps({"id": f"c{n}", "device": f"device{n % DEVICES:02d}",
                                      "name": "set", "params": PARAMS,
                                      "queued_at": time.time()}).encode()
                await client.publish(f"{PREFIX}/raw/device{n % DEVICES:02d}", payload, qos=1,
                                     timeout=60)
            finally:
                slots.release()

        async with asyncio.TaskGroup() as tasks:
            for n in range(count):
                await slots.acquire()
                tasks.create_task(one(n))


async def drain_raw_aiomqtt(folder: Path, count: int) -> float:
    with broker(folder / "raw") as mosq:
        receiver = Receiver(mosq.port, f"{PREFIX}/raw/#", count, "raw", 300)
        await publish_raw(mosq.port, count)
        seen = await asyncio.to_thread(receiver.result, 310)
    return rate(seen)


async def drain_bridge(folder: Path, count: int) -> float:
    """A mosquitto bridge forwarding ``count`` queued messages once its remote is back."""
    cloud_port = free_port()
    edge = broker(folder / "edge", "connection cloud", f"address 127.0.0.1:{cloud_port}",
                  f"topic {PREFIX}/raw/# out 1", "cleansession false", "restart_timeout 1",
                  "start_type automatic", "bridge_protocol_version mqttv311")
    cloud = broker(folder / "cloud", port=cloud_port)
    with edge:
        await publish_raw(edge.port, count)  # the remote is down: the edge queues them
        with cloud:
            receiver = Receiver(cloud.port, f"{PREFIX}/raw/#", count, "raw", 300)
            seen = await asyncio.to_thread(receiver.result, 310)
    if seen["count"] < count:
        raise SystemExit(f"the bridge forwarded only {seen['count']} of {count}")
    return rate(seen)


# --------------------------------------------------------------------------- latency


@contextlib.asynccontextmanager
async def online_uplink(folder: Path, count: int,
                        seconds: float) -> AsyncIterator[tuple[Store, Receiver, Path]]:
    """A broker, a receiver expecting ``count`` commands, and a store drained by an uplink
    that is online; the uplink is stopped on the way out."""
    with broker(folder / "broker") as mosq:
        cfg = gateway_config(folder, mosq.port)
        receiver = Receiver(mosq.port, f"{PREFIX}/{GATEWAY}/actions", count, "latency",
                            seconds + 60)
        async with await Store.open(cfg.store) as store:
            state = GatewayState()
            uplink = Uplink(cfg, store, state)
            task = asyncio.create_task(uplink.run())
            while state.link != Link.ONLINE:  # noqa: ASYNC110 (the state wakes on any change)
                await asyncio.sleep(0.05)
            try:
                yield store, receiver, cfg.store.path
            finally:
                await uplink.stop(5)
                await asyncio.wait({task}, timeout=5)
                task.cancel()


async def online_latency(folder: Path, seconds: float,
                         per_second: int = 100) -> tuple[list[float], list[float]]:
    """Latency to receipt at a subscriber from the put call, and from its return (durable).

    ``per_second`` puts for ``seconds``; the first includes the synchronous commit.
    """
    count = int(seconds * per_second)
    async with online_uplink(folder, count, seconds) as (store, receiver, _):
        start = time.monotonic()
        called: dict[str, float] = {}
        durable: dict[str, float] = {}
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / per_second - time.monotonic()))
            before = time.time()
            command = await store.put(f"device{n % DEVICES:02d}", "set", PARAMS)
            called[command.id], durable[command.id] = before, time.time()
        seen = await asyncio.to_thread(receiver.result, 70)
    arrivals: dict[str, float] = seen["arrivals"]
    return (sorted(arrivals[i] - called[i] for i in arrivals),
            sorted(arrivals[i] - durable[i] for i in arrivals))


PRODUCER = r'''
import asyncio, sys, time
from pigateway.config import StoreConfig
from pigateway.store import Store
async def main(path, count, per_second):
    async with await Store.open(StoreConfig(path=path, min_free_bytes=0), drainer=False) as store:
        start = time.monotonic()
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n / per_second - time.monotonic()))
            await store.put(f"device{n % 50:02d}", "set", {"level": 80, "note": "x" * 180})
asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
'''


async def other_process_latency(folder: Path, seconds: float,
                                per_second: int = 100) -> list[float]:
    """Latency from the put call in another process (like ``pigateway send``) to receipt."""
    count = int(seconds * per_second)
    async with online_uplink(folder, count, seconds) as (_, receiver, path):
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PRODUCER, str(path), str(count), str(per_second))
        await producer.wait()
        seen = await asyncio.to_thread(receiver.result, 70)
    return sorted(seen["delays"])


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")


# --------------------------------------------------------------------------- RSS


def vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_check(path: Path) -> tuple[float, float, str | None]:
    """The drainer's integrity check at its start (``PRAGMA integrity_check``) of the file
    at ``path``, in a process of its own: seconds, its peak RSS (MB), and what it found."""
    code = ("import resource, sys, time; from pathlib import Path; "
            "from pigateway.store.files import check_integrity; t = time.perf_counter(); "
            "found = check_integrity(Path(sys.argv[1])); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " repr(found))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, check=True)
    took, peak, found = done.stdout.split(maxsplit=2)
    return float(took), int(peak) / 1024, None if found.strip() == "None" else found.strip()


async def rss_draining(folder: Path, count: int) -> tuple[float, float, tuple[float, float,
                                                                             str | None]]:
    """Peak RSS (MB) of ``pigateway run`` draining ``count``, the seconds it took, and the
    start's integrity check of that backlog (:func:`start_check`, the file just written)."""
    with broker(folder / "broker") as mosq:
        cfg = gateway_config(folder, mosq.port)
        await fill(cfg.store.path, count)
        check = start_check(cfg.store.path)
        config_file = gateway.write(folder / "config.toml", gateway_settings(
            folder, mosq.port, gpio={"pin_factory": "mock"}, log={"level": "warning"}))
        started = time.monotonic()
        service = Service(config_file).start()
        assert service.process is not None
        process = service.process
        peak = 0.0
        try:
            async with await Store.open(cfg.store, drainer=False) as watcher:
                while (await watcher.stats()).depth > 0:
                    if process.poll() is not None:
                        raise SystemExit(f"pigateway run exited with {process.returncode}")
                    peak = max(peak, vm(process.pid, "VmRSS"))
                    await asyncio.sleep(0.2)
            took = time.monotonic() - started
            peak = max(peak, vm(process.pid, "VmHWM"))
        finally:
            service.stop(timeout=30)
    return peak, took, check


# --------------------------------------------------------------------------- report


# --------------------------------------------------------------------------- cloud


async def drain_paced(folder: Path, count: int, per_second: float,
                      batch_bytes: int = 128 * 1024) -> tuple[float, int, float]:
    """Commands/s delivered from a backlog under ``max_messages_per_second``.

    Batches of at most ``batch_bytes`` (AWS IoT Core's message limit). Returns (commands/s
    first to last arrival, messages, messages/s first to last). The bucket lets one
    second's worth go at once, so messages/s over a short drain is above the limit by at
    most ``per_second / span``; commands per message times the limit is the steady state.
    """
    with broker(folder / "broker") as mosq:
        cfg = gateway_config(folder, mosq.port, max_messages_per_second=per_second,
                             max_batch_bytes=batch_bytes)
        await fill(cfg.store.path, count)
        receiver = Receiver(mosq.port, f"{PREFIX}/{GATEWAY}/actions", count, "paced", 600)
        async with await Store.open(cfg.store) as store:
            uplink = Uplink(cfg, store, GatewayState())
            task = asyncio.create_task(uplink.run())
            seen = await asyncio.to_thread(receiver.result, 610)
            await uplink.stop(5)
            await asyncio.wait({task}, timeout=5)
            task.cancel()
    if seen["count"] < count:
        raise SystemExit(f"paced drain delivered only {seen['count']} of {count}")
    messages = seen["delays"]
    span = messages[-1][0] - messages[0][0]
    if span <= 0:
        raise SystemExit("paced drain: every message arrived at once")
    return seen["count"] / span, len(messages), (len(messages) - 1) / span


async def drain_refused(folder: Path, count: int, share: float = 0.1,
                        seconds: float = 10.0) -> tuple[float, int, int]:
    """Seconds to drain ``count`` while ``share`` of PUBACKs say 0x97 for ``seconds``.

    Returns (seconds, dead letters, refusals). The refusals are every n-th publish on the
    actions topic (deterministic), only during the first ``seconds`` of the run.
    """
    every = round(1 / share)
    seen = {"publishes": 0}
    with broker(folder / "broker") as mosq:
        cfg = gateway_config(folder, mosq.port)  # for the store path; the proxy port below
        await fill(cfg.store.path, count)
        started = time.monotonic()

        def decide(connection: int, where: str, payload: bytes) -> int | None:
            if not where.endswith("/actions"):
                return None
            seen["publishes"] += 1
            refusing = time.monotonic() - started < seconds
            return 0x97 if refusing and seen["publishes"] % every == 0 else None

        proxy = await RefusingProxy(mosq.port, decide).start()
        cfg = gateway_config(folder, proxy.port)
        try:
            async with await Store.open(cfg.store) as store:
                uplink = Uplink(cfg, store, GatewayState())
                task = asyncio.create_task(uplink.run())
                for _ in range(int(600 / 0.1)):  # bounded: ten minutes
                    if not (await store.stats()).depth:
                        break
                    await asyncio.sleep(0.1)
                took = time.monotonic() - started
                stats = await store.stats()
                await uplink.stop(5)
                await asyncio.wait({task}, timeout=5)
                task.cancel()
        finally:
            await proxy.close()
    if stats.depth:
        raise SystemExit(f"refused drain left {stats.depth} of {count} queued")
    return took, stats.dead_total, len(proxy.refused)


async def cloud(quick: bool) -> list[tuple[str, str, str, float, bool]]:
    """The cloud rows: drain under 100 msg/s, drain through 10% 0x97 refusals."""
    paced_count = 100_000 if quick else 500_000
    refused_count = 100_000
    with tempfile.TemporaryDirectory(prefix="pigateway-bench-") as tmp:
        folder = Path(tmp)
        paced, messages, per_second = await drain_paced(folder / "paced", paced_count, 100)
        print(f"  drain at 100 msg/s  {paced:>10,.0f} commands/s first to last arrival "
              f"({messages} messages of <= 128 KiB, {per_second:.0f} messages/s incl. the "
              f"burst; steady state {100 * paced_count / messages:,.0f} commands/s)",
              flush=True)
        took, dead, refusals = await drain_refused(folder / "refused", refused_count)
        print(f"  drain {refused_count:,} through 10% 0x97 for 10 s: {took:.1f} s, "
              f"{refusals} refusals, {dead} dead letters", flush=True)
    return [
        (f"drain {paced_count:,} at 100 msg/s", f"{paced:,.0f} commands/s", ">= 1,500/s",
         paced / 1500, paced >= 1500),
        (f"drain {refused_count:,}, 10% 0x97 for 10 s", f"{took:.1f} s, {dead} dead",
         "0 dead", float(dead), dead == 0),
    ]


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def table(rows: list[tuple[str, str, str, float, bool]]) -> None:
    print(f"\n{'figure':<40}{'measured':<36}{'target':<12}{'ratio':>8}  verdict")
    for name, measured, target, ratio, ok in rows:
        print(f"{name:<40}{measured:<36}{target:<12}{ratio:>7.2f}x  {verdict(ok)}")


async def main(quick: bool, only_cloud: bool = False) -> None:
    if only_cloud:
        print(f"# uplink benchmark, cloud part ({'quick' if quick else 'full'}; loopback "
              f"mosquitto, ~200-byte params, {DEVICES} devices)")
        table(await cloud(quick))
        return
    backlog = 10_000 if quick else 100_000
    big = 50_000 if quick else 1_000_000
    seconds = 3.0 if quick else 10.0
    delay = configuration.UplinkConfig().batch_delay
    print(f"# uplink benchmark ({'quick' if quick else 'full'}; loopback mosquitto, "
          f"~200-byte params, {DEVICES} devices; rates first-to-last arrival at a receiver)")
    with tempfile.TemporaryDirectory(prefix="pigateway-bench-") as tmp:
        folder = Path(tmp)
        ours = await drain_pigateway(folder / "ours", backlog)
        print(f"  pigateway drain     {ours:>10,.0f} commands/s", flush=True)
        raw = await drain_raw_aiomqtt(folder / "raw", backlog)
        print(f"  raw aiomqtt w=100   {raw:>10,.0f} messages/s", flush=True)
        bridge = await drain_bridge(folder / "bridge", backlog)
        print(f"  mosquitto bridge    {bridge:>10,.0f} messages/s", flush=True)
        latencies, after_commit = await online_latency(folder / "latency", seconds)
        p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
        c50, c99 = percentile(after_commit, 0.50), percentile(after_commit, 0.99)
        print(f"  online latency      p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms from the "
              f"put call; p50 {c50 * 1000:.0f} ms, p99 {c99 * 1000:.0f} ms from its durable "
              f"return ({len(latencies)} commands at 100/s)", flush=True)
        remote = await other_process_latency(folder / "remote", seconds)
        r50, r99 = percentile(remote, 0.50), percentile(remote, 0.99)
        print(f"  online latency      p50 {r50 * 1000:.0f} ms, p99 {r99 * 1000:.0f} ms with the "
              f"producer in another process ({len(remote)} commands at 100/s)", flush=True)
        rss, took, (check_s, check_mb, found) = await rss_draining(folder / "rss", big)
        print(f"  RSS draining {big:,}: peak {rss:.1f} MB ({took:.0f} s)", flush=True)
        print(f"  start-up integrity check of {big:,} queued: {check_s:.1f} s, peak RSS "
              f"{check_mb:.0f} MB ({found or 'ok'}; load {os.getloadavg()[0]:.1f})", flush=True)
    cloud_rows = await cloud(quick)
    rows = [
        (f"drain {backlog:,} vs raw aiomqtt (w=100)", f"{ours:,.0f}/s vs {raw:,.0f}/s",
         ">= 3x", ours / raw if raw else float("inf"), ours >= 3 * raw),
        (f"drain {backlog:,} vs mosquitto bridge", f"{ours:,.0f}/s vs {bridge:,.0f}/s",
         ">= 1x", ours / bridge if bridge else float("inf"), ours >= bridge),
        ("online latency p99 at 100 cmd/s", f"{p99 * 1000:.0f} ms (p50 {p50 * 1000:.0f}; "
         f"{c99 * 1000:.0f} after commit)",
         f"<= {(delay + 0.05) * 1000:.0f} ms", p99 / (delay + 0.05), p99 <= delay + 0.05),
        ("  same, producer in another process", f"{r99 * 1000:.0f} ms (p50 {r50 * 1000:.0f})",
         f"<= {(delay + 0.05) * 1000:.0f} ms", r99 / (delay + 0.05), r99 <= delay + 0.05),
        (f"RSS draining {big:,}", f"{rss:.1f} MB", "< 60 MB", rss / 60, rss < 60),
        (f"start-up integrity check, {big:,} queued", f"{check_s:.1f} s, {check_mb:.0f} MB",
         "<= 5 s", check_s / 5, check_s <= 5 and found is None),
        *cloud_rows,
    ]
    table(rows)
    if quick:
        print("(quick run: backlogs scaled down; run without --quick for the real figures)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small backlogs, for a smoke run")
    parser.add_argument("--cloud", action="store_true",
                        help="only the cloud part (pacing, refusals)")
    options = parser.parse_args()
    asyncio.run(main(options.quick, options.cloud))
