"""Benchmark, part 7: days, not minutes. ``pigateway run`` under a steady load for
``--minutes`` (default 20), sampled every minute, then the loss check.

The load: ~50 API puts/s (a producer process, ``Store.put``), a ``pigateway send`` every
2 s, ~50 local messages/s through ingest (a paho publisher on the local broker), and the
uplink broker stopped for 10 s of every minute (SIGTERM: the subscriber that checks for
loss keeps its persistent session across it; to the service it is a lost link all the
same). Every minute: the service's RSS, descriptors, threads, WAL size and Python's
traced memory (``tracemalloc``, one frame, started in the service's process by a small
wrapper, so its own overhead is in the RSS too). At the end every command and message
must have reached the uplink subscriber.

Target: RSS after 8 hours within 5 MB of its value after 10 minutes. A run here is
minutes long, so it reports the RSS slope per hour from minute 10 on (least squares), and
what 8 hours at that slope would add. ``--env MALLOC_ARENA_MAX=2`` runs the service with
a variable set (to compare allocator settings: run twice).

Run through ``scripts/bench soak --minutes 20`` (``--quick``: 3 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import bench_ingest
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from harness.broker import Mosquitto
from harness.service import CONSOLE_SCRIPT, environment

PRODUCER = r'''
import asyncio, sys, time
from pigateway.config import StoreConfig
from pigateway.store import Store
async def main(path, seconds, per_second):
    async with await Store.open(StoreConfig(path=path, min_free_bytes=0), drainer=False) as store:
        start, n = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            await asyncio.sleep(max(0.0, start + n / per_second - time.monotonic()))
            await store.put(f"api{n % 20:02d}", "set", {"n": n, "note": "x" * 150})
            n += 1
    print(n, flush=True)
asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
'''

#: ``pigateway run`` with tracemalloc on and a thread writing its traced memory each
#: ``interval`` seconds as a JSON line to a file (argv: config, file, interval).
WRAPPER = r'''
import json, sys, threading, time, tracemalloc
tracemalloc.start(1)
config, out, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
def report():
    while True:
        current, peak = tracemalloc.get_traced_memory()
        with open(out, "a") as f:
            f.write(json.dumps({"at": time.time(), "traced": current, "peak": peak}) + "\n")
        time.sleep(interval)
threading.Thread(target=report, daemon=True, name="soak-traced").start()
from pigateway.cli import main
sys.exit(main(["run", "--config", config]))
'''


class Receiver:
    """A paho subscriber with a persistent session on the uplink broker (which keeps it
    across its stops): every action command and forwarded message, by its key."""

    def __init__(self, uplink: Mosquitto) -> None:
        self.keys: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-receiver",
                                  clean_session=False)
        self.client.on_connect = self._connected
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", uplink.port, 30)
        self.client.loop_start()

    def _connected(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe([(f"{bench_ingest.PREFIX}/{bench_ingest.GATEWAY}/actions", 1),
                          (bench_ingest.FORWARDED + "#", 1)])

    def _message(self, _: mqtt.Client, __: Any, message: mqtt.MQTTMessage) -> None:
        doc = json.loads(message.payload)
        with self.lock:
            if "actions" in doc:
                for action in doc["actions"]:
                    for command in action["commands"]:
                        self.keys.add(f"{action['device']}:{command['params'].get('n')}")
            else:
                self.keys.add(f"z2m:{doc['n']}")

    def count(self) -> int:
        with self.lock:
            return len(self.keys)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def local_publisher(local: Mosquitto, seconds: float, per_second: float,
                    sent: list[str]) -> None:
    """~``per_second`` QoS 1 messages to the local broker for ``seconds``."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-local")
    client.connect("127.0.0.1", local.port, 30)
    client.loop_start()
    start, n = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        time.sleep(max(0.0, start + n / per_second - time.monotonic()))
        info = client.publish(f"z2m/dev{n % 20:02d}/state", json.dumps(
            {"n": n, "linkquality": 120, "state": "ON"}), qos=1)
        info.wait_for_publish(10)
        if info.is_published():  # the local broker has it (PUBACK): ours from here on
            sent.append(f"z2m:{n}")
        n += 1
    client.loop_stop()
    client.disconnect()


def sender(config: Path, seconds: float, sent: list[str], env: dict[str, str]) -> None:
    """``pigateway send`` every 2 s for ``seconds``."""
    start, n = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        time.sleep(max(0.0, start + n * 2 - time.monotonic()))
        done = subprocess.run([str(CONSOLE_SCRIPT), "send", "--config", str(config), "--device",
                               "cli", "--command", "set", "--param", f"n={n}"],
                              capture_output=True, env=env, check=False)
        if done.returncode == 0:
            sent.append(f"cli:{n}")
        n += 1


def outages(uplink: Mosquitto, seconds: float, stop: threading.Event) -> None:
    """The uplink broker down for 10 s of every minute (at 30 s into it)."""
    start = time.monotonic()
    minute = 0
    while not stop.is_set() and time.monotonic() - start < seconds:
        at = start + minute * 60 + 30
        if stop.wait(max(0.0, at - time.monotonic())) or at + 10 > start + seconds:
            return
        uplink.stop()
        stop.wait(10)
        uplink.start()
        minute += 1


def sample(pid: int, wal: Path, traced: Path) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    lines = traced.read_text().splitlines() if traced.exists() else []
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "wal_mb": wal.stat().st_size / 2**20 if wal.exists() else 0.0,
            "traced_mb": json.loads(lines[-1])["traced"] / 2**20 if lines else float("nan")}


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, value) points, per hour."""
    if len(points) < 2:
        return float("nan")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 60 * sum((x - mx) * (y - my) for x, y in points) / var if var else float("nan")


class Load:
    """The soak's load, started together and joined at the end: the API producer process,
    the local publisher, the sender and the uplink's outages."""

    def __init__(self, root: Path, config: Path, local: Mosquitto, uplink: Mosquitto, *,
                 seconds: float, env: dict[str, str]) -> None:
        self.cli: list[str] = []
        self.z2m: list[str] = []
        self.stop = threading.Event()
        self.producer = subprocess.Popen([sys.executable, "-c", PRODUCER,
                                          str(root / "gw" / "queue.db"), str(seconds), "50"],
                                         stdout=subprocess.PIPE, text=True)
        self.threads = [
            threading.Thread(target=local_publisher, args=(local, seconds, 50, self.z2m)),
            threading.Thread(target=sender, args=(config, seconds, self.cli, env)),
            threading.Thread(target=outages, args=(uplink, seconds, self.stop))]
        for each in self.threads:
            each.start()

    def join(self) -> list[str]:
        """Wait for the load to end; the keys of the API puts the producer made."""
        out, _ = self.producer.communicate(timeout=120)
        for each in self.threads:
            each.join(timeout=120)
        self.stop.set()
        return [f"api{n % 20:02d}:{n}" for n in range(int(out.strip() or 0))]


def soak(root: Path, minutes: float, extra: dict[str, str]) -> dict[str, Any]:
    """The service under :class:`Load` for ``minutes``: a sample a minute, then the loss."""
    seconds = minutes * 60
    with Mosquitto(root / "up", persistence=True, extra=["user root"]) as uplink, \
            bench_ingest.broker(root / "local") as local:
        config = bench_ingest.service(root / "gw", local, uplink).config
        receiver = Receiver(uplink)
        traced = root / "traced.jsonl"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        with (root / "service.log").open("ab") as log:
            svc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(config), str(traced),
                                    "60"], stdout=log, stderr=log, cwd=config.parent,
                                   env=environment({**extra, "PYTHONPYCACHEPREFIX":
                                                    env["PYTHONPYCACHEPREFIX"]}))
        try:
            online(root / "service.log", svc)
            load = Load(root, config, local, uplink, seconds=seconds, env=env)
            samples: list[dict[str, float]] = []
            start = time.monotonic()
            for minute in range(1, int(minutes) + 1):
                time.sleep(max(0.0, start + minute * 60 - time.monotonic()))
                if svc.poll() is not None:
                    raise SystemExit(f"pigateway run exited with {svc.returncode}")
                samples.append({"minute": minute, **sample(svc.pid, root / "gw" /
                                                           "queue.db-wal", traced)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            api = load.join()
            if not uplink.running:
                uplink.start()
            sent = set(api) | set(load.cli) | set(load.z2m)
            settled = settle(receiver, sent, root / "gw" / "queue.db")
            missing = sent - receiver.keys
            if missing:  # when, in seconds of the load (n / 50 for api and ingest, 2 n for send)
                print("missing:", sorted(missing, key=lambda k: int(k.rsplit(":", 1)[1]))[:40],
                      file=sys.stderr)
            lost = {source: sum(1 for key in missing if key.startswith(source))
                    for source in ("api", "cli", "z2m")}
            receiver.close()
        finally:
            svc.terminate()
            svc.wait(60)
    return {"samples": samples, "lost": lost, "api": len(api), "cli": len(load.cli),
            "z2m": len(load.z2m), "left": settled}


def online(log: Path, svc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait until the service subscribed locally and linked up: a local message published
    before then has no subscriber, and the broker drops it (not the service's to lose)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "ingest: online" in text and "uplink: online" in text:
            return
        if svc.poll() is not None:
            raise SystemExit(f"pigateway run exited with {svc.returncode}: {text[-2000:]}")
        time.sleep(0.2)
    raise SystemExit("pigateway run did not come online")


def settle(receiver: Receiver, sent: set[str], queue: Path) -> dict[str, int]:
    """Wait (at most 10 minutes) until the receiver has everything sent, or the queue is
    empty and nothing more arrived for 30 s; the queue's rows left (queued, dead)."""
    deadline, last, since = time.monotonic() + 600, -1, time.monotonic()
    while True:
        with contextlib.closing(sqlite3.connect(queue, timeout=30)) as conn:
            left = {"queued": conn.execute("SELECT count(*) FROM outbox").fetchone()[0],
                    "dead": conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]}
        if sent <= receiver.keys or time.monotonic() > deadline:
            return left
        if receiver.count() != last:
            last, since = receiver.count(), time.monotonic()
        elif left["queued"] == 0 and time.monotonic() - since > 30:
            return left
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes (a smoke run)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for the service (e.g. MALLOC_ARENA_MAX=2)")
    args = parser.parse_args()
    minutes = 3.0 if args.quick else args.minutes
    extra = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        result = soak(Path(tmp), minutes, extra)
    report(result, minutes, extra)
    return 0


def report(result: dict[str, Any], minutes: float, extra: dict[str, str]) -> None:
    samples, lost = result["samples"], result["lost"]
    print(f"# soak: {minutes:g} min, ~50 API puts/s, a send every 2 s, ~50 local msgs/s, "
          f"the uplink down 10 s a minute; service env {extra or 'as the unit'}")
    print(f"{'min':>4}{'RSS MB':>9}{'traced MB':>11}{'fds':>6}{'threads':>9}{'WAL MB':>9}")
    for s in samples:
        print(f"{s['minute']:>4}{s['rss_mb']:>9.1f}{s['traced_mb']:>11.2f}{s['fds']:>6.0f}"
              f"{s['threads']:>9.0f}{s['wal_mb']:>9.1f}")
    after = [s for s in samples if s["minute"] >= 10]
    if len(after) < 2:  # a short run: its second half
        after = samples[max(0, (len(samples) - 1) // 2):]
    rss = slope_per_hour([(s["minute"], s["rss_mb"]) for s in after])
    traced = slope_per_hour([(s["minute"], s["traced_mb"]) for s in after])
    first = after[0]["minute"] if after else 0
    print(f"\n{'target':<52}{'measured':<40}{'wanted':<12}verdict")
    print(f"{'RSS slope from minute ' + format(first, '.0f'):<52}"
          f"{f'{rss:+.2f} MB/h (8 h: {rss * 8:+.1f} MB)':<40}{'8 h <= 5 MB':<12}"
          f"{'MET' if abs(rss * 8) <= 5 else 'MISSED'}")
    print(f"{'traced (Python heap) slope':<52}{f'{traced:+.2f} MB/h':<40}{'-':<12}-")
    counts = f"lost (of api {result['api']}, send {result['cli']}, ingest {result['z2m']})"
    where = (f"{lost['api']}, {lost['cli']}, {lost['z2m']} (queue left: "
             f"{result['left']['queued']} queued, {result['left']['dead']} dead)")
    total = sum(lost.values())
    print(f"{counts:<52}{where:<40} {'0':<11}{'MET' if total == 0 else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
