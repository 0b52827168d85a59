"""Benchmark, part 6: a Pi's CPU. What pigateway costs in CPU, beside a mosquitto bridge in
the same run, and how it holds under a CPU quota that models a Pi's core.

- CPU time (user + system, from /proc) of ``pigateway run`` per 1,000 delivered commands
  (a backlog drained to a real broker) and per 1,000 forwarded messages (ingest), of the
  bridging mosquitto per 1,000 messages it forwards, and of one ``pigateway send``;
- instructions (valgrind's callgrind, not noisy like time on a shared machine) of
  ``pigateway send`` against a bare ``python3 -c 'import sqlite3, json, argparse'``, both
  with bytecode cached as an installed package has it;
- under a CPU quota on one core (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` where
  only v1 is mounted; 25% models a Pi 4's core, 10% a Pi Zero 2 W's): the service and the
  ``send`` producers inside, the brokers and load generators outside; the drain rate of a
  backlog, the ingest forward rate, ``send`` p50/p99, nothing lost, and the longest gap
  between the service's watchdog pings against the unit's ``WatchdogSec`` (30 s).

Run through ``scripts/bench cpu`` (``--quick``: smaller counts; ``--quotas 25,10``;
``--instructions``: the callgrind count alone, on the same gateway's config, in a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench_ingest
import bench_uplink

from harness.broker import Mosquitto
from harness.service import CONSOLE_SCRIPT, Service
from harness.sockets import DatagramListener

WATCHDOG_SEC = 30.0  # systemd/pigateway.service
QUOTAS = (25, 10)
PERIOD_US = 100_000


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def row(name: str, measured: str, wanted: str, ok: bool | None) -> None:
    print(f"{name:<52}{measured:<46}{wanted:<14}{'-' if ok is None else verdict(ok)}")


def cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid``'s live threads, in nanoseconds' precision (schedstat;
    /proc/PID/stat counts 10 ms ticks, too coarse for a few thousand messages), else ticks."""
    try:
        return sum(int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
                   for task in os.listdir(f"/proc/{pid}/task")) / 1e9
    except (OSError, ValueError, IndexError):
        return bench_ingest._cpu_seconds(pid)


def pct(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --------------------------------------------------------------------------- the quota


class Quota:
    """A cgroup with ``percent`` of one core's time, pinned to CPU 0; processes join it by
    PID (their children follow). ``None`` from :meth:`make` with the reason when there is
    no writable cgroup with a cpu controller."""

    def __init__(self, folder: Path, procs: Path) -> None:
        self.folder, self.procs = folder, procs

    @classmethod
    def make(cls, percent: int) -> tuple[Quota | None, str]:
        name = f"pibench-{os.getpid()}-{percent}"
        quota = int(PERIOD_US * percent / 100)
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/cpu")
        try:
            if "cpu" in (v2 / "cgroup.controllers").read_text().split() if (
                    v2 / "cgroup.controllers").exists() else False:
                folder = v2 / name
                folder.mkdir()
                (folder / "cpu.max").write_text(f"{quota} {PERIOD_US}")
                return cls(folder, folder / "cgroup.procs"), ""
            if (v1 / "cpu.cfs_quota_us").exists():
                folder = v1 / name
                folder.mkdir()
                (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (folder / "cpu.cfs_quota_us").write_text(str(quota))
                return cls(folder, folder / "cgroup.procs"), ""
        except OSError as exc:
            return None, f"no writable cgroup cpu controller ({exc})"
        return None, "no cgroup cpu controller mounted (v2 cpu.max or v1 cpu.cfs_quota_us)"

    def join(self, pid: int) -> None:
        self.procs.write_text(str(pid))
        os.sched_setaffinity(pid, {min(os.sched_getaffinity(0))})

    def join_self(self) -> None:
        """For ``preexec_fn``: the child joins before it execs."""
        self.join(os.getpid())

    def throttled_s(self) -> float:
        stat = (self.folder / "cpu.stat").read_text()
        found = re.search(r"throttled_(usec|time) (\d+)", stat)
        if not found:
            return 0.0
        return int(found.group(2)) / (1e6 if found.group(1) == "usec" else 1e9)

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.folder.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# --------------------------------------------------------------------------- sends


def bytecode_env(folder: Path) -> dict[str, str]:
    """Bytecode cached as an installed package has it (pip compiles at install), in a
    folder of this run's (never in the source tree)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
    return env


def send_argv(config: Path, n: int) -> list[str]:
    return [str(CONSOLE_SCRIPT), "send", "--config", str(config), "--device", f"d{n % 20}",
            "--command", "on"]


class Sends:
    """Wall and CPU times (user + system) of ``pigateway send`` runs, and the ones that
    failed (exit code and the end of stderr): a send refused is a figure too."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.failed: list[str] = []

    def run(self, argv: list[str], env: dict[str, str],
            preexec: Callable[[], None] | None = None, *, timed: bool = True) -> None:
        before = os.times()
        started = time.monotonic()
        done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env,
                              preexec_fn=preexec)
        wall = time.monotonic() - started
        after = os.times()
        if done.returncode != 0:
            self.failed.append(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
        elif timed:
            self.walls.append(wall)
            self.cpus.append(after.children_user + after.children_system
                             - before.children_user - before.children_system)

    def p50_ms(self) -> float:
        return statistics.median(self.walls) * 1000 if self.walls else float("nan")

    def p99_ms(self) -> float:
        return pct(self.walls, 0.99) * 1000 if self.walls else float("nan")


def sends(config: Path, runs: int, env: dict[str, str],
          preexec: Callable[[], None] | None = None) -> tuple[Sends, Sends]:
    """``runs`` sends after one untimed, and as many bare interpreters importing what the
    bare baseline imports (the same quota, the same moment: what the machine gives)."""
    ours, bare = Sends(), Sends()
    ours.run(send_argv(config, 0), env, preexec, timed=False)
    for n in range(runs):
        ours.run(send_argv(config, n), env, preexec)
        bare.run(BARE, env, preexec)
    return ours, bare


#: The bare interpreter ``send`` is measured against.
BARE = [sys.executable, "-c", "import sqlite3, json, argparse"]


def counted(config: Path, env: dict[str, str]) -> dict[str, int | None]:
    """Instructions of ``send`` and of the bare interpreter, the second of two rounds (the
    first compiles what each imports into the cache and creates the queue file)."""
    found: dict[str, int | None] = {"bare": None, "send": None}
    for _ in range(2):
        found = {"bare": instructions(BARE, env), "send": instructions(send_argv(config, 0), env)}
    return found


def instructions_only(root: Path, env: dict[str, str]) -> None:
    """The callgrind figure alone: the service's config of :func:`service` (its brokers are
    not started: ``send`` never speaks to one), its queue made by the first send."""
    folder = root / "gw"
    folder.mkdir(parents=True)
    data = bench_ingest.settings(folder, uplink_port=1883, local_host="127.0.0.1",
                                 local_port=1884)
    config = bench_ingest.gateway.write(folder / "config.toml", data)
    found = counted(config, env)
    send_i, bare_i = found["send"], found["bare"]
    if send_i is None or bare_i is None:
        row("send instructions vs bare interpreter", "no valgrind: not measured", "<= 2.5x",
            None)
        return
    print(f"{'target':<52}{'measured':<46}{'wanted':<14}verdict")
    row("send instructions vs bare python (imports)", f"{send_i / 1e6:,.0f}M vs "
        f"{bare_i / 1e6:,.0f}M = {send_i / bare_i:.2f}x", "<= 2.5x", send_i / bare_i <= 2.5)


def instructions(argv: list[str], env: dict[str, str]) -> int | None:
    """Instructions executed by ``argv`` (callgrind), or None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           *argv], env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    return int(found.group(1)) if found else None


# --------------------------------------------------------------------------- the service


def service(root: Path, local: Mosquitto, uplink: Mosquitto, notify: DatagramListener | None,
            backlog: int) -> Service:
    """The ingest bench's service (ingest z2m/# and the uplink), ``backlog`` commands queued
    first, with systemd's notify socket and the unit's watchdog when ``notify`` is given."""
    base = bench_ingest.service(root, local, uplink)
    if backlog:
        asyncio.run(bench_uplink.fill(root / "queue.db", backlog))
    env = {"NOTIFY_SOCKET": str(notify.path),
           "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6))} if notify else {}
    return Service(base.config, base.log, console_script=True, env=env)


@contextlib.contextmanager
def running(svc: Service, quota: Quota | None) -> Iterator[int]:
    svc.start()
    assert svc.process is not None
    if quota is not None:
        quota.join(svc.process.pid)
    try:
        yield svc.process.pid
    finally:
        svc.stop(timeout=60)


def wait_ready(svc: Service, notify: DatagramListener | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.alive:
            raise SystemExit(f"pigateway run exited: {bench_ingest._log(svc)[-2000:]}")
        if notify is not None and "READY=1" in notify.texts():
            return
        if notify is None and "ingest: " in bench_ingest._log(svc):
            return
        time.sleep(0.1)
    raise SystemExit("pigateway run was not ready in time")


def control(svc: Service, verb: str) -> None:
    subprocess.run([str(CONSOLE_SCRIPT), verb, "--config", str(svc.config)], check=True,
                   capture_output=True)


def drain(svc: Service, uplink: Mosquitto, count: int, pid: int) -> tuple[float, float, int]:
    """Start the uplink broker under a paused service that has ``count`` queued, and resume
    it once the receiver listens: commands/s at the receiver, the service's CPU seconds
    over it, the commands received."""
    uplink.start()
    receiver = bench_uplink.Receiver(uplink.port, f"{bench_uplink.PREFIX}/"
                                     f"{bench_uplink.GATEWAY}/actions", count, "batch", 900)
    before = cpu_seconds(pid)
    control(svc, "resume")
    seen = receiver.result(910)
    spent = cpu_seconds(pid) - before
    return bench_uplink.rate(seen), spent, int(seen["count"])


def forward(root: Path, local: Mosquitto, uplink: Mosquitto, prefix: str, *, count: int,
            pid: int) -> tuple[float, float]:
    """Messages/s forwarded from ``local`` to ``uplink`` and process ``pid``'s CPU seconds."""
    before = cpu_seconds(pid)
    rate, _ = bench_ingest._c_clients(root, local, uplink, prefix, count)
    return rate, cpu_seconds(pid) - before


def watchdog_gap(notify: DatagramListener) -> float:
    """The longest gap between READY and the pings after it, and the last ping to now."""
    ready = [d.at for d in notify.messages() if d.text == "READY=1"]
    pings = [d.at for d in notify.messages() if d.text == "WATCHDOG=1"]
    if not ready:
        return float("inf")
    marks = [ready[0], *(p for p in pings if p > ready[0]), time.monotonic()]
    return max(b - a for a, b in itertools.pairwise(marks))


def one_run(root: Path, *, count: int, messages: int, runs: int, quota: Quota | None,
            env: dict[str, str]) -> dict[str, Any]:
    """A service with ``count`` queued: drain them, forward ``messages``, time ``runs``
    sends (all with the service in ``quota`` when given); CPU and rates of each."""
    notify = DatagramListener()
    try:
        uplink = bench_ingest.broker(root / "up")
        with bench_ingest.broker(root / "local") as local:
            svc = service(root / "gw", local, uplink, notify, count)
            svc.env.update({k: v for k, v in env.items() if k == "PYTHONPYCACHEPREFIX"})
            try:
                with running(svc, quota) as pid:
                    wait_ready(svc, notify)
                    control(svc, "pause")
                    rate, drain_cpu, got = drain(svc, uplink, count, pid)
                    fwd, fwd_cpu = forward(root, local, uplink, bench_ingest.FORWARDED
                                           + "z2m/", count=messages, pid=pid)
                    ours, bare = sends(svc.config, runs, env,
                                        quota.join_self if quota else None)
                    alive = svc.alive
                    gap = watchdog_gap(notify)
                    throttled = quota.throttled_s() if quota else 0.0
            finally:
                uplink.stop()
    finally:
        notify.close()
        shutil.rmtree(notify.folder, ignore_errors=True)
    return {"drain_rate": rate, "drain_cpu_ms_per_1000": drain_cpu * 1e6 / count,
            "delivered": got, "count": count, "forward_rate": fwd,
            "forward_cpu_ms_per_1000": fwd_cpu * 1e6 / messages,
            "send_p50_ms": ours.p50_ms(), "send_p99_ms": ours.p99_ms(),
            "bare_p50_ms": bare.p50_ms(), "send_failed": ours.failed,
            "send_cpu_ms": statistics.median(ours.cpus or [math.nan]) * 1000,
            "bare_cpu_ms": statistics.median(bare.cpus or [math.nan]) * 1000, "alive": alive,
            "watchdog_gap_s": gap, "throttled_s": throttled}


def bridge_cpu(root: Path, messages: int) -> tuple[float, float]:
    """A mosquitto bridge (persistence on) forwarding ``messages``: msg/s and its CPU ms
    per 1,000 (the bridging broker's own process)."""
    with bench_ingest.broker(root / "bup") as uplink, \
            bench_ingest.bridged(root / "bridged", uplink, persistence=True) as bridge:
        assert bridge.process is not None
        time.sleep(1.0)  # the bridge connects
        rate, spent = forward(root, bridge, uplink, "bridge/z2m/", count=messages,
                               pid=bridge.process.pid)
    return rate, spent * 1e6 / messages


# --------------------------------------------------------------------------- report


def report_free(free: dict[str, Any], bridge: tuple[float, float], counts: dict[str, Any]
                ) -> None:
    print(f"\n# CPU time, no quota ({os.cpu_count()} cores, shared: CPU seconds from /proc, "
          "less noisy than wall time; instructions from callgrind)")
    print(f"{'figure':<52}{'measured':<46}")
    row("mosquitto bridge (persistence on) per 1,000 msgs", f"{bridge[1]:,.0f} ms "
        f"({bridge[0]:,.0f} msg/s)", "", None)
    row("pigateway per 1,000 forwarded messages", f"{free['forward_cpu_ms_per_1000']:,.0f} ms"
        f" ({free['forward_rate']:,.0f} msg/s)", "", None)
    row("pigateway per send (CPU)", f"{free['send_cpu_ms']:.0f} ms (wall p50 "
        f"{free['send_p50_ms']:.0f} ms)", "", None)
    row("bare python importing sqlite3, json, argparse", f"{free['bare_cpu_ms']:.0f} ms (wall "
        f"p50 {free['bare_p50_ms']:.0f} ms)", "", None)
    print(f"\n{'target':<52}{'measured':<46}{'wanted':<14}verdict")
    ours, theirs = free["drain_cpu_ms_per_1000"], bridge[1]
    row("pigateway CPU per 1,000 delivered commands", f"{ours:,.0f} ms ({free['drain_rate']:,.0f}"
        f" cmd/s) = {ours / theirs:.2f}x the bridge's", "<= 1.0x", ours <= theirs)
    send_i, bare_i = counts["send"], counts["bare"]
    if send_i is None or bare_i is None:
        row("send instructions vs bare interpreter", "no valgrind: not measured", "<= 2.5x",
            None)
    else:
        row("send instructions vs bare python (imports)", f"{send_i / 1e6:,.0f}M vs "
            f"{bare_i / 1e6:,.0f}M = {send_i / bare_i:.2f}x", "<= 2.5x", send_i / bare_i <= 2.5)


def report_quota(percent: int, r: dict[str, Any] | None, why: str) -> None:
    print(f"\n# CPU quota {percent}% of one core ({'Pi 4' if percent >= 25 else 'Pi Zero 2 W'}"
          "): the service and send inside, the brokers and load generators outside")
    if r is None:
        print(f"SKIPPED: {why}")
        return
    print(f"{'target':<52}{'measured':<46}{'wanted':<14}verdict")
    lost = r["count"] - r["delivered"]
    row(f"drain {r['count']:,} (lost {lost})", f"{r['drain_rate']:,.0f} cmd/s",
        ">= 1,000/s" if percent >= 25 else "-",
        r["drain_rate"] >= 1000 if percent >= 25 else None)
    row("ingest forward", f"{r['forward_rate']:,.0f} msg/s", "-", None)
    row("send p50", f"{r['send_p50_ms']:,.0f} ms", "<= 300 ms" if percent >= 25 else "-",
        r["send_p50_ms"] <= 300 if percent >= 25 else None)
    row("send p99", f"{r['send_p99_ms']:,.0f} ms", "-", None)
    row("bare python (imports) p50, same quota", f"{r['bare_p50_ms']:,.0f} ms (send "
        f"{r['send_p50_ms'] / r['bare_p50_ms']:.1f}x)", "-", None)
    failed = r["send_failed"]
    row("sends refused", f"{len(failed)}" + (f": {failed[0][:120]}" if failed else ""), "0",
        not failed)
    row("nothing lost", f"{lost} of {r['count']:,} (service alive: {r['alive']})", "0",
        lost == 0 and r["alive"])
    row("longest watchdog gap (WatchdogSec 30 s)", f"{r['watchdog_gap_s']:.1f} s (throttled "
        f"{r['throttled_s']:.0f} s)", "< 30 s", r["watchdog_gap_s"] < WATCHDOG_SEC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--quotas", default=",".join(map(str, QUOTAS)),
                        help="percent of one core, comma-separated ('' for none)")
    parser.add_argument("--instructions", action="store_true",
                        help="only the callgrind count of send against a bare interpreter")
    args = parser.parse_args()
    if args.instructions:
        with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
            instructions_only(Path(tmp), bytecode_env(Path(tmp)))
        return 0
    count, messages, runs = (5000, 2000, 10) if args.quick else (20_000, 10_000, 20)
    print("# cpu benchmark: ~200-byte params, real mosquittos on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        root = Path(tmp)
        env = bytecode_env(root)
        free = one_run(root / "free", count=count, messages=messages, runs=runs, quota=None,
                       env=env)
        bridge = bridge_cpu(root / "bridge", messages)
        config = next((root / "free" / "gw").glob("config.toml"))
        report_free(free, bridge, counted(config, env))
        for percent in (int(p) for p in args.quotas.split(",") if p):
            quota, why = Quota.make(percent)
            result = None
            if quota is not None:
                try:
                    result = one_run(root / f"q{percent}", count=count, messages=messages,
                                     runs=runs, quota=quota, env=env)
                finally:
                    quota.remove()
            report_quota(percent, result, why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
