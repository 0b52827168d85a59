"""Benchmark, part 5: the SD card's flush. The store, drain and ingest figures with a fixed
delay added to every fsync/fdatasync (``bench_flush``: 5 ms, and 20 ms for a poor card),
beside raw sqlite3 one-row commits, persist-queue and a mosquitto bridge with persistence
on, in the same run under the same model; then the figures of this machine's own disk
(bytes written per command, one producer and ``put_many`` against raw sqlite3).

Each model runs in a child process with the shim preloaded (its brokers, service and
receivers inherit it). Ratios are from one run; the rates themselves are noisy on a shared
machine, the flush counts are not. Without a C compiler the part is skipped, saying why.

Run through ``scripts/bench sdcard`` (``--quick``: smaller backlogs and message counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_flush
import bench_ingest
import bench_store
import bench_uplink

from harness import gateway
from harness.netproxy import Proxy
from harness.service import Service
from pigateway.store import NewCommand, Store
from pigateway.uplink import Uplink

MODELS_MS = (5.0, 20.0)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def row(name: str, measured: str, wanted: str, ok: bool | None) -> None:
    print(f"{name:<52}{measured:<44}{wanted:<12}{'-' if ok is None else verdict(ok)}")


# --------------------------------------------------------------------------- under a model


async def raw_commits(folder: Path) -> tuple[float, float]:
    """Raw sqlite3 one-row commits (WAL, FULL): per second, and flushes per commit."""
    before = bench_flush.flushes()
    rate = bench_store.raw_sqlite_commits(folder)
    spent = bench_flush.flushes() - before
    return rate, spent / max(1.0, rate * bench_store.WINDOW)


async def producers(store: Store, count: int) -> tuple[float, float]:
    """``count`` concurrent producers putting for one window: puts/s and flushes per put."""
    stop = time.perf_counter() + bench_store.WINDOW
    done = [0]

    async def producer(index: int) -> None:
        while time.perf_counter() < stop:
            await store.put(f"dev-{index % 50}", "set", bench_store.PARAMS)
            done[0] += 1

    before, start = bench_flush.flushes(), time.perf_counter()
    await asyncio.gather(*(producer(i) for i in range(count)))
    took = time.perf_counter() - start
    return done[0] / took, (bench_flush.flushes() - before) / max(1, done[0])


async def drain(folder: Path, count: int) -> tuple[float, float]:
    """A backlog of ``count`` drained by the uplink to a real broker: commands/s at the
    receiver, and the drainer's flushes per delivered command (fill not counted)."""
    with bench_uplink.broker(folder / "broker") as mosq:
        cfg = bench_uplink.gateway_config(folder, mosq.port)
        await bench_uplink.fill(cfg.store.path, count)
        receiver = bench_uplink.Receiver(mosq.port, f"{bench_uplink.PREFIX}/"
                                         f"{bench_uplink.GATEWAY}/actions", count, "batch", 600)
        async with await Store.open(cfg.store) as store:
            before = bench_flush.flushes()
            uplink = Uplink(cfg, store, bench_uplink.GatewayState())
            task = asyncio.create_task(uplink.run())
            seen = await asyncio.to_thread(receiver.result, 610)
            while (await store.stats()).depth:  # noqa: ASYNC110 - the last acks' deletes, counted
                await asyncio.sleep(0.05)
            spent = bench_flush.flushes() - before
            await uplink.stop(5)
            await asyncio.wait({task}, timeout=5)
            task.cancel()
    if seen["count"] < count:
        raise SystemExit(f"the drain delivered only {seen['count']} of {count}")
    return bench_uplink.rate(seen), spent / count


async def _pigateway(root: Path, local: Any, uplink: Any, count: int, *,
                     code: str | None = None, via: int | None = None
                     ) -> tuple[float, int, float]:
    """``pigateway run`` forwarding ``count`` messages: msg/s, its pid, its CPU seconds.
    ``code``: the ``service`` folder of another checkout to run instead of this one;
    ``via``: the port it publishes to (a delaying proxy in front of ``uplink``)."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    data = bench_ingest.settings(root, uplink_port=via or uplink.port, local_host=local.host,
                                 local_port=local.port)
    svc = Service(gateway.write(root / "config.toml", data), root / "service.log")
    if code is not None:
        svc.env = {"PYTHONPATH": code}
    svc.start()
    assert svc.process is not None
    pid = svc.process.pid
    try:
        await bench_ingest.online(svc)
        cpu = bench_ingest._cpu_seconds(pid)
        rate, _ = await asyncio.to_thread(bench_ingest._c_clients, root, local, uplink,
                                          bench_ingest.FORWARDED + "z2m/", count)
        cpu = bench_ingest._cpu_seconds(pid) - cpu
    finally:
        svc.stop()
    return rate, pid, cpu


def _paho_rate(root: Path, local: Any, uplink: Any, count: int, via: int) -> float:
    """The bare paho forwarder publishing to port ``via``, read on ``uplink``."""
    bare = subprocess.Popen([sys.executable, str(Path(bench_ingest.__file__).with_name(
        "bare_forwarder.py")), "paho", str(local.port), str(via), "paho/"],
        stdout=subprocess.PIPE)
    try:
        assert bare.stdout is not None
        bare.stdout.readline()  # subscribed
        return bench_ingest._c_clients(root, local, uplink, "paho/z2m/", count)[0]
    finally:
        bare.kill()
        bare.wait()


async def ingest(root: Path, count: int, log: Path, *, bridge: bool = True,
                 paho_first: bool = False, before: str | None = None,
                 rtt_ms: float = 0.0) -> dict[str, float]:
    """Forward rates: pigateway (and its flushes per message), a bare paho forwarder with no
    store, a mosquitto bridge with persistence on; same brokers, one after the other
    (``paho_first``: the bare forwarder first, so that a load that moves during a run
    favours neither side every time; ``before``: another checkout's ``service`` folder,
    its pigateway measured too, in the same round; ``rtt_ms``: the forwarders publish
    through a proxy that holds what the uplink broker sends back that long, a cloud
    broker's round trip)."""
    up = bench_ingest.broker(root / "up")
    local = bench_ingest.broker(root / "local")
    figures: dict[str, float] = {}
    with up as uplink, local:
        proxy = await Proxy(uplink.port, delay=rtt_ms / 1000).start() if rtt_ms else None
        try:
            await _sides(root, count, log, (local, uplink, proxy.port if proxy else uplink.port),
                         figures, paho_first=paho_first, before=before)
        finally:
            if proxy is not None:
                await proxy.close()
        figures["bridge"] = 0.0
        if bridge:
            with bench_ingest.bridged(root / "bridged", uplink, persistence=True) as bridging:
                figures["bridge"], _ = await asyncio.to_thread(
                    bench_ingest._c_clients, root, bridging, uplink, "bridge/z2m/", count)
    figures["flushes_per_message"] = figures["pigateway_flushes"]
    return figures


async def _sides(root: Path, count: int, log: Path, brokers: tuple[Any, Any, int],
                 figures: dict[str, float], *, paho_first: bool, before: str | None) -> None:
    """Each side of a round, one after the other, into ``figures``; ``brokers``: the local
    broker, the uplink broker, and the port the forwarders publish to."""
    local, uplink, via = brokers
    sides = ["before", "pigateway", "paho"] if before else ["pigateway", "paho"]
    for side in reversed(sides) if paho_first else sides:
        if side == "paho":
            figures["paho"] = await asyncio.to_thread(_paho_rate, root, local, uplink, count,
                                                      via)
            continue
        rate, pid, cpu = await _pigateway(root / side, local, uplink, count,
                                          code=before if side == "before" else None, via=via)
        figures.update({side: rate, f"{side}_cpu_ms": cpu * 1e6 / count,
                        f"{side}_flushes": bench_flush.flushes_of(log, pid) / count})


async def ingest_rounds(delay_ms: float, rounds: int, quick: bool,
                        before: str | None, rtt_ms: float) -> dict[str, Any]:
    """Only the ingest figures, ``rounds`` times (pigateway, bare paho and ``before``'s
    pigateway in each, their order alternating), each round with the load average beside
    it: the ratio's spread, and before/after from the same rounds."""
    log = Path(os.environ["PIBENCH_FLUSH_LOG"])
    done = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for n in range(rounds):
            figures = await ingest(Path(tmp) / f"round{n}", 5000 if quick else 20_000, log,
                                   bridge=False, paho_first=n % 2 == 1, before=before,
                                   rtt_ms=rtt_ms)
            done.append({**figures, "load": os.getloadavg()[0]})
    return {"delay_ms": delay_ms, "rounds": done, "rtt_ms": rtt_ms}


def report_rounds(m: dict[str, Any]) -> None:
    print(f"\n# {m['delay_ms']:g} ms per fsync/fdatasync: ingest forward vs bare paho, "
          f"{len(m['rounds'])} rounds (each figure of a round from that round)"
          + (f", the uplink's answers {m['rtt_ms']:g} ms late" if m["rtt_ms"] else ""))
    sides = ["before", "pigateway"] if "before" in m["rounds"][0] else ["pigateway"]
    ratios: dict[str, list[float]] = {side: [] for side in sides}
    for n, r in enumerate(m["rounds"]):
        said = []
        for side in sides:
            ratios[side].append(r[side] / r["paho"])
            said.append(f"{'before' if side == 'before' else 'pigateway'} {r[side]:,.0f} msg/s "
                        f"= {ratios[side][-1]:.2f}x ({r[side + '_flushes']:.3f} fl/msg, CPU "
                        f"{r[side + '_cpu_ms']:.0f} ms/1,000)")
        print(f"round {n + 1}: {'; '.join(said)}; bare paho {r['paho']:,.0f} msg/s "
              f"(load average {r['load']:.1f})")
    for side in sides:
        got = sorted(ratios[side])
        median = got[len(got) // 2]
        row("ingest forward vs bare paho (no store)" + (", before" if side == "before" else ""),
            f"{got[0]:.2f}x-{got[-1]:.2f}x, median {median:.2f}x", ">= 0.9x", median >= 0.9)


async def under_model(delay_ms: float, quick: bool) -> dict[str, Any]:
    if not bench_flush.loaded():
        raise SystemExit("bench_sdcard: the flush shim is not loaded in this process")
    log = Path(os.environ["PIBENCH_FLUSH_LOG"])
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        raw, raw_flushes = await raw_commits(folder)
        pq_put, _ = bench_store.persist_queue_rates(folder)
        store = await Store.open(bench_store.bench_config(folder / "queue.db"))
        one, one_flushes = await producers(store, 1)
        many, many_flushes = await producers(store, 64)
        await store.close()
        drained, drain_flushes = await drain(folder / "drain", 20_000 if quick else 100_000)
        forward = await ingest(folder / "ingest", 5000 if quick else 20_000, log)
    return {"delay_ms": delay_ms, "raw": raw, "raw_flushes": raw_flushes, "pq_put": pq_put,
            "one": one, "one_flushes": one_flushes, "many": many, "many_flushes": many_flushes,
            "drain": drained, "drain_flushes": drain_flushes, "drain_count":
            20_000 if quick else 100_000, **{f"fwd_{k}": v for k, v in forward.items()}}


def report_model(m: dict[str, Any]) -> None:
    d = m["delay_ms"]
    print(f"\n# {d:g} ms per fsync/fdatasync (each figure from this run, under this model)")
    print(f"{'baseline':<52}{'rate':<44}")
    row("raw sqlite3 one-row commits (WAL, FULL)",
        f"{m['raw']:,.0f}/s ({m['raw_flushes']:.2f} flushes each)", "", None)
    if m["pq_put"] is not None:
        row("persist-queue SQLiteAckQueue put", f"{m['pq_put']:,.0f}/s", "", None)
    row("mosquitto bridge, persistence on (forward)", f"{m['fwd_bridge']:,.0f} msg/s "
        "(mosquitto never fsyncs)", "", None)
    row("bare paho forwarder, no store", f"{m['fwd_paho']:,.0f} msg/s", "", None)
    print(f"\n{'target':<52}{'measured':<44}{'wanted':<12}verdict")
    bound = 64 * m["raw"]
    row("put, 64 producers vs 64 x raw commits (flush bound)",
        f"{m['many']:,.0f}/s = {m['many'] / bound:.2f}x ({m['many_flushes']:.3f} fl/put)",
        ">= 0.8x", m["many"] / bound >= 0.8)
    row("put, 1 producer vs raw commits", f"{m['one']:,.0f}/s = {m['one'] / m['raw']:.2f}x "
        f"({m['one_flushes']:.2f} fl/put)", ">= 0.9x", m["one"] / m["raw"] >= 0.9)
    row(f"drain {m['drain_count']:,}: flushes per delivered command",
        f"{m['drain_flushes']:.4f} ({m['drain']:,.0f} cmd/s)", "<= 0.05",
        m["drain_flushes"] <= 0.05)
    fwd = m["fwd_pigateway"]
    row("ingest forward", f"{fwd:,.0f} msg/s ({m['fwd_flushes_per_message']:.3f} fl/msg)",
        ">= 1,000/s" if d <= 5 else "-", fwd >= 1000 if d <= 5 else None)
    row("ingest forward vs bare paho (no store)", f"{fwd / m['fwd_paho']:.2f}x", ">= 0.9x",
        fwd / m["fwd_paho"] >= 0.9)


# --------------------------------------------------------------------------- this disk


async def raw_executemany(folder: Path, rows: list[tuple[Any, ...]], columns: list[str],
                          ddl: list[str]) -> float:
    """Rows/s of raw sqlite3 ``executemany`` of ``rows`` (fresh ids each batch) into the
    outbox's own table and indexes, one transaction a batch, WAL and FULL as the store."""
    conn = sqlite3.connect(folder / "raw-many.db", isolation_level=None)
    conn.execute("PRAGMA page_size = 2048")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for statement in ddl:
        conn.execute(statement)
    at = columns.index("id")
    sql = f"INSERT INTO outbox ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    best = 0.0
    for attempt in range(bench_store.REPEATS):
        done, start, batch = 0, time.perf_counter(), 0
        while time.perf_counter() - start < bench_store.WINDOW:
            fresh = [(*r[:at], f"{attempt:02d}{batch:08d}{n:016d}", *r[at + 1:])
                     for n, r in enumerate(rows)]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, fresh)
            conn.execute("COMMIT")
            done, batch = done + len(rows), batch + 1
        best = max(best, done / (time.perf_counter() - start))
    conn.close()
    return best


async def this_disk(quick: bool) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        raw = 0.0
        for attempt in range(bench_store.REPEATS):
            (folder / f"raw{attempt}").mkdir()
            raw = max(raw, bench_store.raw_sqlite_commits(folder / f"raw{attempt}"))
        store = await Store.open(bench_store.bench_config(folder / "queue.db"))
        one = max([await bench_store.one_producer(store) for _ in range(bench_store.REPEATS)])
        await store.purge(queued=True)
        many = max([await bench_store.put_many(store) for _ in range(bench_store.REPEATS)])
        await store.put_many([NewCommand(f"dev-{i % 50}", "set", bench_store.PARAMS)
                              for i in range(1000)])
        await store.close()
        conn = sqlite3.connect(folder / "queue.db")
        ddl = [sql for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'outbox' AND sql IS NOT NULL "
            "AND type IN ('table', 'index') ORDER BY type DESC")]
        cursor = conn.execute("SELECT * FROM outbox ORDER BY seq DESC LIMIT 1000")
        columns = [c[0] for c in cursor.description if c[0] != "seq"]
        rows = [r[1:] for r in cursor.fetchall()]
        conn.close()
        raw_many = await raw_executemany(folder, rows, columns, ddl)
        backlog = 20_000 if quick else 100_000
        wear = await bench_store.bytes_per_command(folder, backlog)
        per_command, json_size = wear.per_command, wear.json_size
    print("\n# this machine's disk, no delay model (best of "
          f"{bench_store.REPEATS} {bench_store.WINDOW}s windows)")
    print(f"\n{'target':<52}{'measured':<44}{'wanted':<12}verdict")
    row(f"bytes per command over its life, {backlog:,} backlog", f"{per_command:,.0f} B = "
        f"{per_command / json_size:.2f}x its JSON ({json_size} B)", "<= 5x",
        per_command / json_size <= 5)
    print("\n".join(bench_store.wear_lines(wear)))
    row("put, 1 producer vs raw commits", f"{one:,.0f}/s vs {raw:,.0f}/s = {one / raw:.2f}x",
        ">= 0.5x", one / raw >= 0.5)
    row("put_many(1000) vs raw executemany, same table",
        f"{many:,.0f}/s vs {raw_many:,.0f}/s = {many / raw_many:.2f}x", ">= 0.6x",
        many / raw_many >= 0.6)
    print("(the inbound round trip p99 < 50 ms is the inbound part's: scripts/bench inbound)")


# --------------------------------------------------------------------------- parts


def run_models(quick: bool, models: list[float], ingest_only: int = 0,
               before: str | None = None, rtt: float = 0.0) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-sdcard-") as tmp:
        library, why = bench_flush.build(Path(tmp))
        if library is None:
            print(f"bench sdcard: SKIPPED: {why}")
            return 0
        for delay in models:
            log = Path(tmp) / f"flushes-{delay:g}.log"
            env = {**os.environ, **bench_flush.environment(library, delay, log)}
            done = subprocess.run([sys.executable, __file__, "--model", str(delay),
                                   *(["--quick"] if quick else []),
                                   *(["--ingest-rounds", str(ingest_only)] if ingest_only
                                     else []), *(["--before", before] if before else []),
                                   *(["--rtt", str(rtt)] if rtt else [])],
                                  env=env,
                                  stdout=subprocess.PIPE, text=True, check=False)
            if done.returncode != 0:
                print(f"bench sdcard: the {delay:g} ms model failed ({done.returncode})")
                return done.returncode
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            (report_rounds if ingest_only else report_model)(figures)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--model", type=float, help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--models", default=",".join(f"{m:g}" for m in MODELS_MS),
                        help="milliseconds per flush, comma-separated (default 5,20)")
    parser.add_argument("--ingest-rounds", type=int, default=0, metavar="N",
                        help="only ingest forward against bare paho, N rounds per model "
                             "(the spread of the ratio and the load average of each round)")
    parser.add_argument("--before", metavar="DIR",
                        help="with --ingest-rounds: also run the pigateway of another "
                             "checkout (its service/ folder) in each round")
    parser.add_argument("--rtt", type=float, default=0.0, metavar="MS",
                        help="with --ingest-rounds: the uplink broker's answers held MS "
                             "milliseconds by a proxy (a cloud broker's round trip)")
    args = parser.parse_args()
    if args.model is not None:
        print(json.dumps(asyncio.run(
            ingest_rounds(args.model, args.ingest_rounds, args.quick, args.before, args.rtt)
            if args.ingest_rounds
            else under_model(args.model, args.quick))))
        return 0
    print("# sdcard benchmark: fsync/fdatasync delayed by a preload shim; ~200-byte params")
    code = run_models(args.quick, [float(m) for m in args.models.split(",")],
                      args.ingest_rounds, args.before, args.rtt)
    if args.ingest_rounds:
        return code
    asyncio.run(this_disk(args.quick))
    return code


if __name__ == "__main__":
    sys.exit(main())
