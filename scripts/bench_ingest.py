"""Benchmark, part 4: ingest (docs/ingest.md) side by side with a mosquitto bridge.

One run on this machine, everything on 127.0.0.1, real mosquittos (2.0, ``user root`` so
their persistence works under root), ``pigateway run`` as a child process:

- forward rate, local broker to uplink subscriber: ``count`` zigbee2mqtt-like messages
  (QoS 1, ~60 bytes, 20 topics) published by mosquitto_pub to a local broker, forwarded by
  pigateway (ingest -> SQLite -> uplink), by a bare aiomqtt forwarder with no store
  (``bare_forwarder.py``: what the MQTT stack alone does) or by a mosquitto bridge (``topic
  z2m/# out 1``, in the local broker) to the same uplink broker, read by mosquitto_sub;
  messages/s from the first publish to the last arrival (brokers without persistence, as
  the bridge is usually run), pigateway's CPU time per 1,000 messages and its peak RSS;
- lost by each when its process is SIGKILLed once during an outage of the uplink broker:
  the bridging broker with mosquitto's defaults (persistence on, ``autosave_interval``
  1800 s), pigateway with its defaults (``synchronous = full``);
- the added latency of the hop while online at 100 messages/s (p50, p99), both ways;
- ``pigateway send`` wall time with the service running (p50, p99), and ``send --wait``;
- bytes written per command with delivery records, against without (target: +10% at most).

Run through ``scripts/bench ingest``; ``--quick`` makes the windows short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import aiomqtt

from harness import gateway
from harness.broker import Mosquitto
from harness.ingest_helpers import V5, collecting
from harness.service import CONSOLE_SCRIPT, Service
from harness.waits import wait_until

GATEWAY = "bench-gw"
PREFIX = "bench"
TOPICS = 20
FORWARDED = f"{PREFIX}/{GATEWAY}/forward/"


#: What the forward rate is measured with (printed with the figures).
SETTINGS: Final = {
    "brokers": "mosquitto 2.0 on 127.0.0.1, no persistence for the rate, "
               "max_inflight_messages 0 (Receive Maximum 65535), bridge: topic z2m/# out 1",
    "load": "20 mosquitto_pub -l (QoS 1, one topic each), one mosquitto_sub -C (QoS 1)",
    "pigateway": "uplink.max_inflight 64, uplink.batch_delay 0, local.window 256 (default), "
                 "store.synchronous full (default), one forward rule z2m/# qos 1",
}


def payload(n: int) -> bytes:
    return json.dumps({"n": n, "t": time.time(), "linkquality": 120, "state": "ON"}).encode()


def messages(count: int) -> list[tuple[str, bytes]]:
    return [(f"z2m/dev{n % TOPICS:02d}/state", payload(n)) for n in range(count)]


def broker(folder: Path, *extra: str, persistence: bool = False) -> Mosquitto:
    return Mosquitto(folder, persistence=persistence, extra=["user root", *extra])


def bridged(folder: Path, uplink: Mosquitto, *, persistence: bool = False) -> Mosquitto:
    """A local broker bridging z2m/# to ``uplink`` as bridge/z2m/#, mosquitto's defaults."""
    return broker(folder, "autosave_interval 1800", "connection cloud",
                  f"address 127.0.0.1:{uplink.port}", 'topic z2m/# out 1 "" bridge/',
                  "cleansession false", "restart_timeout 1 2", persistence=persistence)


def service(folder: Path, local: Mosquitto, uplink: Mosquitto) -> Service:
    folder.mkdir(parents=True, exist_ok=True)
    data = settings(folder, uplink_port=uplink.port, local_host=local.host,
                    local_port=local.port)
    return Service(gateway.write(folder / "config.toml", data), folder / "service.log")


def settings(folder: Path, *, uplink_port: int, local_host: str, local_port: int
             ) -> dict[str, Any]:
    """The bench gateway's config (ingest ``z2m/#`` from the local broker, the uplink's
    batching without delay), its files in ``folder``."""
    data = gateway.settings(folder, gateway_id=GATEWAY, port=uplink_port, prefix=PREFIX,
                            store={"max_commands": 2_000_000, "max_bytes": 2 * 1024**3},
                            uplink={"batch_delay": 0.0, "backoff_initial": 0.05,
                                    "backoff_max": 0.5, "max_inflight": 64})
    data["gpio"] = {"enabled": False}
    data["inbound"] = {"enabled": False}
    data["local"] = {"host": local_host, "port": local_port}
    data["ingest"] = [{"topic": "z2m/#"}]
    return data


async def online(svc: Service) -> None:
    if not await wait_until(lambda: "ingest: online" in _log(svc)
                            and "uplink: online" in _log(svc), 30):
        raise SystemExit(f"pigateway did not come online: {_log(svc)[-2000:]}")


def _log(svc: Service) -> str:
    return svc.log.read_text(errors="replace") if svc.log and svc.log.exists() else ""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def publish(local: Mosquitto, items: list[tuple[str, bytes]], window: int = 100,
                  pace: float = 0.0) -> None:
    async with aiomqtt.Client(local.host, local.port, protocol=V5,
                              max_inflight_messages=window) as client:
        client.pending_calls_threshold = window + 10
        for start in range(0, len(items), window):
            chunk = items[start:start + window]
            await asyncio.gather(*(client.publish(t, p, qos=1) for t, p in chunk))
            if pace:
                await asyncio.sleep(pace)


# --------------------------------------------------------------------------- forward rate


def _c_clients(root: Path, source: Mosquitto, uplink: Mosquitto, prefix: str, count: int, *,
               watch: int | None = None) -> tuple[float, int]:
    """``count`` messages published by mosquitto_pub (one process a topic, QoS 1) to
    ``source`` until mosquitto_sub got them all from ``uplink``: messages/s, and the peak
    RSS (KiB) of process ``watch``. C clients, so the figure is the forwarder's: a Python
    load generator tops out near 4,000/s here and made both sides look alike."""
    per = count // TOPICS
    lines = [root / f"topic{t:02d}.txt" for t in range(TOPICS)]
    for t, path in enumerate(lines):
        path.write_bytes(b"".join(payload(n * TOPICS + t) + b"\n" for n in range(per)))
    sub = subprocess.Popen(["mosquitto_sub", "-h", uplink.host, "-p", str(uplink.port), "-q",
                            "1", "-t", prefix + "#", "-C", str(per * TOPICS), "-i",
                            f"rate-{os.getpid()}"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # subscribed
    rss, started = 0, time.monotonic()
    pubs = [subprocess.Popen(["mosquitto_pub", "-h", source.host, "-p", str(source.port),
                              "-q", "1", "-t", f"z2m/dev{t:02d}/state", "-l"],
                             stdin=path.open("rb")) for t, path in enumerate(lines)]
    try:
        while sub.poll() is None and time.monotonic() - started < 300:
            if watch is not None:
                rss = max(rss, rss_kib(watch))
            time.sleep(0.05)
        span = time.monotonic() - started
    finally:
        for each in (sub, *pubs):
            each.kill()
            each.wait()
    if sub.returncode not in (0, -9) or span >= 300:
        raise SystemExit(f"{prefix}: not all {count} messages arrived within 300 s")
    return per * TOPICS / span, rss


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bare_rate(root: Path, local: Mosquitto, uplink: Mosquitto, count: int,
               kind: str) -> float:
    bare = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_forwarder.py")),
                             kind, str(local.port), str(uplink.port), f"{kind}/"],
                            stdout=subprocess.PIPE)
    try:
        assert bare.stdout is not None
        bare.stdout.readline()  # subscribed
        return _c_clients(root, local, uplink, f"{kind}/z2m/", count)[0]
    finally:
        bare.kill()
        bare.wait()


async def forward_rates(root: Path, count: int) -> dict[str, Any]:
    """pigateway, bare aiomqtt and paho forwarders (no store: the ceiling of the MQTT stack
    pigateway is built on) and a mosquitto bridge, one after the other, same brokers."""
    with broker(root / "up") as uplink, broker(root / "local") as local, \
            bridged(root / "bridged", uplink) as bridge:
        svc = service(root / "gw", local, uplink)
        svc.start()
        try:
            await online(svc)
            assert svc.process is not None
            cpu = _cpu_seconds(svc.process.pid)
            ours, rss = await asyncio.to_thread(_c_clients, root, local, uplink,
                                                FORWARDED + "z2m/", count,
                                                watch=svc.process.pid)
            cpu = _cpu_seconds(svc.process.pid) - cpu
        finally:
            svc.stop()
        stack = await asyncio.to_thread(_bare_rate, root, local, uplink, count, "aiomqtt")
        lean = await asyncio.to_thread(_bare_rate, root, local, uplink, count, "paho")
        theirs, _ = await asyncio.to_thread(_c_clients, root, bridge, uplink, "bridge/z2m/",
                                            count)
    return {"messages": count, "pigateway_msgs_per_s": round(ours),
            "bare_aiomqtt_msgs_per_s": round(stack), "bare_paho_msgs_per_s": round(lean),
            "bridge_msgs_per_s": round(theirs),
            "ratio": round(ours / theirs, 2), "ratio_to_bare_aiomqtt": round(ours / stack, 2),
            "pigateway_cpu_ms_per_1000": round(cpu * 1e6 / count),
            "rss_mib": round(rss / 1024, 1)}


# --------------------------------------------------------------------------- loss


async def loss(root: Path, count: int, outage: float) -> dict[str, Any]:
    """SIGKILL each once during an outage of ``outage`` seconds; count what never arrived."""
    uplink = broker(root / "up2", persistence=True)
    uplink.start()
    local = broker(root / "local2", persistence=True)
    bridge = bridged(root / "bridged2", uplink, persistence=True)
    svc = service(root / "gw2", local, uplink)
    try:
        local.start()
        bridge.start()
        svc.start()
        await online(svc)
        async with collecting(uplink, FORWARDED + "#", client_id="loss-ours") as ours, \
                collecting(uplink, "bridge/#", client_id="loss-bridge") as theirs:
            uplink.stop()
            began = time.monotonic()
            items = messages(count)
            await asyncio.gather(publish(local, items), publish(bridge, items))
            await asyncio.sleep(min(2.0, outage / 3))
            svc.kill()
            bridge.kill()
            svc.start()
            bridge.start()
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - began)))
            uplink.start()
            sent = {p for _, p in items}
            await wait_until(lambda: sent <= {g.payload for g in ours.got}, 120)
            await asyncio.sleep(3.0)  # the bridge's reconnect (restart_timeout) and drain
            lost_ours = len(sent - {g.payload for g in ours.got})
            lost_theirs = len(sent - {g.payload for g in theirs.got})
            dup = len(ours.got) - len({g.payload for g in ours.got})
    finally:
        svc.stop()
        for each in (bridge, local, uplink):
            each.kill()
    return {"messages": count, "outage_s": outage, "pigateway_lost": lost_ours,
            "pigateway_duplicates": dup, "bridge_lost": lost_theirs}


# --------------------------------------------------------------------------- latency


async def latency(root: Path, seconds: float) -> dict[str, Any]:
    """Publish at 100 messages/s; the delay from publish to the uplink subscriber."""
    out: dict[str, Any] = {}
    with broker(root / "up3") as uplink, broker(root / "local3") as local, \
            bridged(root / "bridged3", uplink) as bridge:
        svc = service(root / "gw3", local, uplink)
        svc.start()
        try:
            await online(svc)
            for name, source, prefix in (("pigateway", local, FORWARDED), ("bridge", bridge,
                                                                           "bridge/")):
                delays = await _delays(source, uplink, prefix, seconds)
                cut = statistics.quantiles(delays, n=100)
                out[name] = {"p50_ms": round(cut[49] * 1000, 1),
                             "p99_ms": round(cut[98] * 1000, 1), "n": len(delays)}
            out["send_wall"] = send_times(svc.config, 20)
            out["send_wait_wall"] = send_times(svc.config, 20, "--wait", "--timeout", "10")
        finally:
            svc.stop()
    return out


async def _delays(source: Mosquitto, uplink: Mosquitto, prefix: str,
                  seconds: float) -> list[float]:
    delays: list[float] = []
    count = int(seconds * 100)
    async with aiomqtt.Client(uplink.host, uplink.port, protocol=V5) as sub:
        await sub.subscribe(prefix + "#", qos=1)

        async def receive() -> None:
            async for message in sub.messages:
                now = time.time()
                body = message.payload if isinstance(message.payload, bytes) else b"{}"
                delays.append(now - json.loads(body)["t"])
                if len(delays) >= count:
                    return

        task = asyncio.create_task(receive())
        async with aiomqtt.Client(source.host, source.port, protocol=V5) as pub:
            for n in range(count):
                await pub.publish(f"z2m/dev{n % TOPICS:02d}/state", payload(n), qos=1)
                await asyncio.sleep(0.01)
        await asyncio.wait({task}, timeout=30)
        task.cancel()
    return delays


def send_times(config: Path, runs: int, *extra: str) -> dict[str, Any]:
    """``pigateway send`` wall time (the console script, as a producer runs it).

    With bytecode, as an installed package has it (pip compiles it at install): a shell
    with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile pigateway's sources at every
    call (~25 ms here). The bytecode goes to a folder next to the config (one untimed call
    first), never into the source tree.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(config.parent / "pycache")
    walls = []
    for n in range(-1, runs):
        started = time.monotonic()
        subprocess.run([str(CONSOLE_SCRIPT), "send", "--config", str(config), "--device",
                        f"d{n}", "--command", "on", *extra], check=True, capture_output=True,
                       env=env)
        if n >= 0:
            walls.append(time.monotonic() - started)
    cut = statistics.quantiles(walls, n=100)
    return {"p50_ms": round(cut[49] * 1000), "p99_ms": round(cut[98] * 1000),
            "runs": runs, "bytecode": "cached, as installed"}


async def bytes_per_command(root: Path, count: int, batch_size: int) -> dict[str, Any]:
    """Bytes written per command (put by 64 producers, claim, ack in batches of
    ``batch_size``), acked without delivery records, with them for unwatched commands (what
    the uplink does for every command), and for watched ones (``send --wait``/``--id``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_store  # noqa: PLC0415 - the store bench's figure, reused

    from pigateway.store import Store  # noqa: PLC0415
    from pigateway.store.ids import new_id  # noqa: PLC0415

    async def run(name: str, batch: bool, watch: bool) -> float:
        config = bench_store.bench_config(root / f"io-{name}-{batch_size}.db")
        store = await Store.open(config)
        before = bench_store.io_written()
        per = count // 64

        async def producer(index: int) -> None:
            for _ in range(per):
                await store.put(f"dev-{index % 50}", "set", bench_store.PARAMS, watch=watch)

        await asyncio.gather(*(producer(i) for i in range(64)))
        while claimed := await store.claim(500):
            for start in range(0, len(claimed), batch_size):
                ids = [c.id for c in claimed[start:start + batch_size]]
                await store.ack(ids, new_id() if batch else None)
        await store.close()
        with contextlib.closing(sqlite3.connect(config.path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.sync()
        return (bench_store.io_written() - before) / (per * 64)

    bare = await run("bare", batch=False, watch=False)
    unwatched = await run("unwatched", batch=True, watch=False)
    watched = await run("watched", batch=True, watch=True)
    return {"batch_size": batch_size, "bytes_without_records": round(bare),
            "unwatched_change_pct": round((unwatched / bare - 1) * 100, 1),
            "watched_change_pct": round((watched / bare - 1) * 100, 1), "target_pct": 10}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (smoke run)")
    args = parser.parse_args()
    count = 5000 if args.quick else 20_000
    outage = 5.0 if args.quick else 30.0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        root = Path(folder)
        results = {"cpus": os.cpu_count(), "load": os.getloadavg()[0],
                   "settings": SETTINGS,
                   "forward": await forward_rates(root, count),
                   "loss": await loss(root, min(count, 5000), outage),
                   "latency_100_per_s": await latency(root, 5.0 if args.quick else 20.0),
                   "bytes_per_command": [await bytes_per_command(root, 6400, size)
                                         for size in (50, 1)]}
    print(json.dumps(results, indent=2))
    forward, lost = results["forward"], results["loss"]
    print(f"settings: {SETTINGS['pigateway']}; {SETTINGS['brokers']}")
    print(f"forward: pigateway {forward['pigateway_msgs_per_s']}/s vs bridge "
          f"{forward['bridge_msgs_per_s']}/s = {forward['ratio']}x (target >= 1.0x); a bare "
          f"aiomqtt forwarder without a store {forward['bare_aiomqtt_msgs_per_s']}/s "
          f"(pigateway {forward['ratio_to_bare_aiomqtt']}x of it), bare paho on threads "
          f"{forward['bare_paho_msgs_per_s']}/s; pigateway RSS {forward['rss_mib']} MiB")
    sends = results["latency_100_per_s"]
    print(f"pigateway send p50/p99: {sends['send_wall']['p50_ms']}/"
          f"{sends['send_wall']['p99_ms']} ms (target <= 100 ms); send --wait online: "
          f"{sends['send_wait_wall']['p50_ms']}/{sends['send_wait_wall']['p99_ms']} ms")
    for each in results["bytes_per_command"]:
        print(f"bytes per command, batches of {each['batch_size']}: delivery records "
              f"{each['unwatched_change_pct']:+}% unwatched, {each['watched_change_pct']:+}% "
              f"watched (send --wait/--id) (target +{each['target_pct']}%)")
    print(f"lost at one SIGKILL in a {lost['outage_s']:.0f}s outage: pigateway "
          f"{lost['pigateway_lost']} (target 0), bridge {lost['bridge_lost']} "
          f"of {lost['messages']}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
