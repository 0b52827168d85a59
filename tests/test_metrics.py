"""Metrics: the numbers move with what happens, and the real tools accept them.

Real parts only: mosquitto, SQLite files, Debian's ``prometheus-node-exporter`` reading the
textfile over its own HTTP, and ``promtool`` (Debian's ``prometheus``) checking the exposition
and the alert rules. The Debian tools skip with a reason when missing by hand, and fail on CI
(``CI=true``), where ``scripts/setup-env`` installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import backdoor
from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import config as gateway_config
from harness.gateway import plain, to_toml
from harness.ports import free_port
from harness.service import running_gateway
from harness.uplink_helpers import GATEWAY, drained, make_config, running_uplink, wait_until
from pigateway import config as configuration
from pigateway.app import Gateway
from pigateway.config import MetricsConfig, StoreConfig
from pigateway.errors import ConfigError
from pigateway.inbound import Inbound
from pigateway.listeners.metrics import COUNTERS, Exporter, render, snapshot, write_atomically
from pigateway.state import GatewayState, Link
from pigateway.store import Store

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "pigateway.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# --------------------------------------------------------------------------- helpers


def debian_tool(name: str, package: str) -> str:
    """The tool's path; a skip naming the package by hand, a failure on CI."""
    path = shutil.which(name)
    if path is not None:
        return path
    why = f"{name} is missing (Debian package {package}; scripts/setup-env installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: on CI it must be there")
    pytest.skip(why)


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition, parsed by prometheus-client's own parser."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def promtool_accepts(text: bytes) -> None:
    promtool = debian_tool("promtool", "prometheus")
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def http_get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - loopback http only
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


async def scrape(url: str) -> Samples:
    status, _, body = await asyncio.to_thread(http_get, url)
    assert status == 200, body
    return samples(body)


def cli(config: Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pigateway", *argv, "--config", str(config)],
                          capture_output=True, timeout=60, check=False)


def toml_config(path: Path, cfg: configuration.Config) -> Path:
    """``cfg`` as a TOML file, for the CLI in a child process."""
    path.write_text(to_toml(plain(cfg)))
    return path


def files_of(folder: Path) -> dict[str, str]:
    """Each file's name and content hash: what must not change."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@contextlib.contextmanager
def node_exporter(textfiles: Path) -> Iterator[str]:
    """Debian's node_exporter with only its textfile collector, on a free loopback port."""
    binary = debian_tool("prometheus-node-exporter", "prometheus-node-exporter")
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={textfiles}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


async def until_up(url: str, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await scrape(url)
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def with_metrics(cfg: configuration.Config, **metrics: Any) -> configuration.Config:
    return configuration.from_dict(plain(cfg) | {"metrics": metrics,
                                                 "inbound": {"enabled": False}})


# --------------------------------------------------------------------------- counters move


@pytest.mark.broker
async def test_counters_move_as_commands_are_put_delivered_and_dead_lettered(
        tmp_path: Path, mosquitto: Mosquitto, unique_prefix: str) -> None:
    port = free_port()
    cfg = with_metrics(make_config(tmp_path, mosquitto.port, unique_prefix),
                       listen=f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    async with running_gateway(cfg) as gateway:
        assert await wait_until(lambda: gateway.state.link == Link.ONLINE, 10)
        before = await until_up(url)
        assert value(before, "pigateway_link_up", link="uplink") == 1
        assert value(before, "pigateway_running") == 1
        assert gateway.store is not None
        for n in range(3):
            await gateway.store.put("heater", "set", {"n": n})
        assert await drained(gateway.store, 10)

        def moved(name: str, now: Samples, **labels: str) -> float:
            return (value(now, name, **labels) or 0) - (value(before, name, **labels) or 0)

        assert await wait_until(lambda: gateway.state.depth == 0, 5)
        after = await scrape(url)
        assert moved("pigateway_commands_total", after, outcome="delivered", reason="acked") == 3
        assert moved("pigateway_batches_total", after) >= 1
        assert moved("pigateway_bytes_published_total", after) > 3 * len('"heater"')
        assert moved("pigateway_store_commit_seconds_count", after) >= 4  # 3 puts and an ack
        assert value(after, "pigateway_queue_depth") == 0

        gateway.pause()  # a command that runs out of time while queued is dead-lettered
        await gateway.store.put("gate", "open", ttl=0.05)
        await asyncio.sleep(0.3)
        gateway.resume()
        assert await drained(gateway.store, 10)
        dead = await scrape(url)
        assert value(dead, "pigateway_commands_total", outcome="dead", reason="expired") == 1

        mosquitto.restart()
        assert await wait_until(lambda: gateway.state.link != Link.ONLINE, 10)
        assert await wait_until(lambda: gateway.state.link == Link.ONLINE, 15)
        again = await scrape(url)
        assert moved("pigateway_reconnects_total", again) == 1
        # the retained state document carries the same counters
        assert gateway.uplink is not None
        document = gateway.uplink.state_document()["counters"]
        assert document["delivered"] == value(again, "pigateway_commands_total",
                                              outcome="delivered", reason="acked")
        assert document["reconnects"] == value(again, "pigateway_reconnects_total")
        status, kind, body = await asyncio.to_thread(http_get, url)
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        promtool_accepts(body)

        # pigateway metrics asks the running service (its counters come over the socket)
        config_file = toml_config(tmp_path / "config.toml", cfg)
        done = await asyncio.to_thread(cli, config_file, "metrics")
        assert done.returncode == 0, done.stderr.decode()
        asked = samples(done.stdout)
        assert value(asked, "pigateway_running") == 1
        assert value(asked, "pigateway_commands_total", outcome="delivered",
                     reason="acked") == COUNTERS.delivered

    # stopped: what the store holds survives, what the process counted is gone with it
    queue_files = files_of(tmp_path)
    done = await asyncio.to_thread(cli, config_file, "metrics")
    assert done.returncode == 0, done.stderr.decode()
    stopped = samples(done.stdout)
    assert value(stopped, "pigateway_running") == 0
    assert value(stopped, "pigateway_commands_total", outcome="dead", reason="expired") == 1
    assert value(stopped, "pigateway_commands_total", outcome="delivered", reason="acked") is None
    assert files_of(tmp_path) == queue_files  # read-only: no -wal, no -shm, no change
    promtool_accepts(done.stdout)


@pytest.mark.broker
async def test_a_refused_publish_counts_by_reason_code_and_as_a_dead_letter(
        tmp_path: Path, unique_prefix: str) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed; scripts/setup-env installs it")
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {unique_prefix}/+/state\n")  # actions: not authorised
    with Mosquitto(tmp_path / "broker", extra=["user root", f"acl_file {acl}"]) as broker:
        cfg = make_config(tmp_path, broker.port, unique_prefix)
        async with running_uplink(cfg) as run:
            before = samples(render(await snapshot(run.state, run.store)))
            await run.store.put("vault", "open")
            assert await drained(run.store, 10)
            after = samples(render(await snapshot(run.state, run.store)))
    refused = [(value(s, "pigateway_publish_refusals_total", code="135") or 0)
               for s in (before, after)]
    assert refused[1] - refused[0] == 1
    assert value(after, "pigateway_commands_total", outcome="dead",
                 reason="rejected-by-broker") == 1


async def test_inbound_results_count_by_status(tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path, gateway_id=GATEWAY, devices={"lamp": {"handler": "log"}})
    async with await Store.open(cfg.store) as store, Inbound(cfg, store) as inbound:
        before = samples(render(await snapshot(GatewayState(), store)))
        pool = asyncio.create_task(inbound.run())
        try:
            for payload in ({"id": "c1", "device": "lamp", "name": "on"},    # ok
                            {"id": "c2", "device": "ghost", "name": "on"},   # rejected
                            {"id": "c3", "device": "lamp", "name": "on", "ttl": 1e-6}):
                await inbound.accept(json.dumps({"v": 1, "params": {}, **payload}).encode())
            await inbound.accept(b"not json, so no id to answer")         # dropped
            await asyncio.sleep(0.05)

            for _ in range(200):  # up to 10 s for the three results
                rows = await backdoor.read(store, "SELECT count(*) FROM inbox WHERE state = 'done'")
                if rows[0][0] >= 3:
                    break
                await asyncio.sleep(0.05)
            after = samples(render(await snapshot(GatewayState(), store)))
        finally:
            pool.cancel()
            await asyncio.gather(pool, return_exceptions=True)
    moved = {status: (value(after, "pigateway_inbound_total", status=status) or 0)
             - (value(before, "pigateway_inbound_total", status=status) or 0)
             for status in ("ok", "rejected", "expired", "dropped", "error")}
    assert moved == {"ok": 1, "rejected": 1, "expired": 1, "dropped": 1, "error": 0}


# --------------------------------------------------------------------------- the textfile


async def test_node_exporter_reads_the_textfile(tmp_path: Path) -> None:
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    target = textfiles / "pigateway.prom"
    # no broker listens on this port: the link stays down, which the metrics must say
    cfg = with_metrics(make_config(tmp_path, free_port(), "t"), textfile=str(target),
                       interval=1.0)
    async with running_gateway(cfg) as gateway:
        assert gateway.store is not None
        await gateway.store.put("pump", "start")
        await gateway.store.put("pump", "stop")

        def depth_written() -> bool:
            return target.exists() and "pigateway_queue_depth 2.0" in target.read_text()

        assert await wait_until(depth_written, 10)
        with node_exporter(textfiles) as url:
            scraped = await until_up(url)
        assert value(scraped, "node_textfile_scrape_error") == 0
        assert value(scraped, "pigateway_queue_depth") == 2
        assert value(scraped, "pigateway_link_up", link="uplink") == 0
        assert value(scraped, "pigateway_running") == 1
        assert any(name == "pigateway_build_info" for name, _ in scraped)
        assert value(scraped, "pigateway_store_commit_seconds_count") is not None
        promtool_accepts(target.read_bytes())
    assert [p.name for p in textfiles.iterdir()] == ["pigateway.prom"]  # no temp file left
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_textfile_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "pigateway.prom"
    target.write_bytes(b"old\n")
    inode = target.stat().st_ino
    write_atomically(target, b"new\n" * 1000)
    assert target.read_bytes() == b"new\n" * 1000
    assert target.stat().st_ino != inode  # a rename, not a rewrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["pigateway.prom"]


# --------------------------------------------------------------------------- the endpoint


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "192.0.2.7:9108", "[::]:9108",
                                    "gateway.example:9108"])
def test_a_non_loopback_listen_needs_allow_remote(listen: str) -> None:
    with pytest.raises(ConfigError) as refused:
        configuration.from_dict({"gateway_id": GATEWAY, "metrics": {"listen": listen}})
    assert refused.value.key == "metrics.listen" and "allow_remote" in refused.value.problem
    allowed = configuration.from_dict(
        {"gateway_id": GATEWAY, "metrics": {"listen": listen, "allow_remote": True}})
    assert allowed.metrics.listen == listen


@pytest.mark.parametrize("listen", ["127.0.0.1:9108", "[::1]:9108", "localhost:9108",
                                    "127.0.0.53:9"])
def test_loopback_listen_is_accepted(listen: str) -> None:
    assert configuration.from_dict(
        {"gateway_id": GATEWAY, "metrics": {"listen": listen}}).metrics.listen == listen


@pytest.mark.parametrize("listen", ["9108", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999",
                                    ":9108", "127.0.0.1:http"])
def test_a_malformed_listen_names_the_key(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen: .* HOST:PORT"):
        configuration.from_dict({"gateway_id": GATEWAY, "metrics": {"listen": listen}})


async def test_the_endpoint_answers_metrics_only_and_refuses_remote_binds(
        store_config: Any) -> None:
    port = free_port()
    async with await Store.open(store_config) as store:
        await store.put("fan", "on")
        exporter = Exporter(MetricsConfig(listen=f"127.0.0.1:{port}"), GatewayState(), store)
        task = asyncio.create_task(exporter.run())
        try:
            url = f"http://127.0.0.1:{port}"
            found = await until_up(f"{url}/metrics")
            assert value(found, "pigateway_queue_depth") == 1
            assert (await asyncio.to_thread(http_get, f"{url}/"))[0] == 404
            assert (await asyncio.to_thread(http_get, f"{url}/metrics", "POST"))[0] == 405
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # the server checks again, whoever built its config
        sneaky = MetricsConfig(listen="127.0.0.1:1")
        object.__setattr__(sneaky, "listen", "0.0.0.0:9108")
        with pytest.raises(ConfigError, match="allow_remote"):
            await Exporter(sneaky, GatewayState(), store).bind()


async def test_a_busy_listen_address_stops_the_service_naming_the_key(tmp_path: Path) -> None:
    taken = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        port = taken.sockets[0].getsockname()[1]
        cfg = with_metrics(make_config(tmp_path, free_port(), "t"), listen=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError) as stopped:
            async with asyncio.timeout(20):
                await Gateway(cfg).run()
        assert stopped.value.key == "metrics.listen"
    finally:
        taken.close()
        await taken.wait_closed()


# --------------------------------------------------------------------------- pigateway metrics


def test_pigateway_metrics_never_creates_the_queue_file(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, free_port(), "t")
    config_file = toml_config(tmp_path / "config.toml", cfg)
    before = files_of(tmp_path)
    done = cli(config_file, "metrics")
    assert done.returncode == 0, done.stderr.decode()
    assert files_of(tmp_path) == before and not cfg.store.path.exists()
    found = samples(done.stdout)
    assert value(found, "pigateway_running") == 0
    assert value(found, "pigateway_queue_depth") == 0
    promtool_accepts(done.stdout)


def test_pigateway_metrics_on_a_broken_queue_file_names_it_and_leaves_it(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, free_port(), "t")
    cfg.store.path.write_bytes(b"not a database" * 100)
    config_file = toml_config(tmp_path / "config.toml", cfg)
    before = files_of(tmp_path)
    done = cli(config_file, "metrics")
    assert done.returncode == 1
    assert f"cannot read the queue {cfg.store.path}" in done.stderr.decode()
    assert files_of(tmp_path) == before


# --------------------------------------------------------------------------- rules, dashboard


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = debian_tool("promtool", "prometheus")
    for argv in (["check", "rules", "pigateway.rules.yml"],
                 ["test", "rules", "pigateway.rules.test.yml"]):
        done = subprocess.run([promtool, *argv], cwd=RULES, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def _exposed_names() -> set[str]:
    """Every series name pigateway can expose (a snapshot with all parts present)."""
    from pigateway.listeners.metrics import QueueReading, Snapshot  # noqa: PLC0415

    counters = COUNTERS.as_dict() | {"refusals": {"135": 1}, "inbound": {"ok": 1}}
    snap = Snapshot(queue=QueueReading(depth=1, dead={"expired": 1}),
                    state=GatewayState().as_dict(), counters=counters)
    return {name for name, _ in samples(render(snap))}


def test_rules_and_dashboard_name_only_series_that_exist() -> None:
    names = _exposed_names() | {"node_textfile_mtime_seconds"}
    rules = (RULES / "pigateway.rules.yml").read_text().splitlines()
    texts = [line for line in rules if not line.lstrip().startswith("#")]
    dashboard = json.loads(DASHBOARD.read_text())
    texts += [target["expr"] for panel in dashboard["panels"]
              for target in panel.get("targets", [])]
    used = {word for text in texts for word in re.findall(r"\b(?:pigateway|node)_\w+", text)}
    assert used - names == set()
    assert {"pigateway_queue_depth", "pigateway_link_up"} <= used


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 failed")])
def test_a_missing_debian_tool_skips_by_hand_but_fails_on_ci(ci: str, outcome: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's tools only: no promtool
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_alert_rules_pass_promtool_and_their_unit_tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert outcome in done.stdout, done.stdout[-2000:]
    assert "promtool is missing (Debian package prometheus" in done.stdout


async def test_a_textfile_that_cannot_be_written_is_one_warning_until_it_can(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The textfile's folder is on the gateway's disk: on a full one every write fails,
    every ``metrics.interval`` for as long as it lasts. One warning when the writes start
    failing, one info line when one succeeds again, not a warning per interval."""
    folder = tmp_path / "textfile"  # not there yet: each write fails, as on a full disk
    caplog.set_level(logging.INFO)
    async with await Store.open(StoreConfig(path=tmp_path / "queue.db",
                                            min_free_bytes=0)) as store:
        exporter = Exporter(MetricsConfig(textfile=folder / "pigateway.prom"),
                            GatewayState(), store)
        for _ in range(5):
            await exporter.write_textfile(folder / "pigateway.prom")
        folder.mkdir()
        for _ in range(2):
            await exporter.write_textfile(folder / "pigateway.prom")
    said = [r for r in caplog.records if r.name.startswith("pigateway")
            and "metrics" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], \
        [r.getMessage() for r in said]
    assert (folder / "pigateway.prom").exists()


async def test_scrapes_the_store_cannot_answer_are_one_warning_until_one_is_answered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Prometheus scrapes every 15-60 s whatever the store does: a store that cannot be
    read answers each 503 (which Prometheus records), said once at warning, not per scrape;
    an info line once a scrape is answered again."""
    caplog.set_level(logging.INFO)
    config = StoreConfig(path=tmp_path / "queue.db", min_free_bytes=0)
    closed = await Store.open(config)
    await closed.close()  # its reads fail: a store error, as a broken one's would
    exporter = Exporter(MetricsConfig(), GatewayState(), closed)
    answers = [(await exporter._answer(b"GET /metrics HTTP/1.1"))[0] for _ in range(4)]
    async with await Store.open(config) as store:
        exporter.store = store  # readable again
        answers.append((await exporter._answer(b"GET /metrics HTTP/1.1"))[0])
    assert answers == ["503 Service Unavailable"] * 4 + ["200 OK"]
    said = [r for r in caplog.records if r.name.startswith("pigateway")
            and "metrics" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], \
        [r.getMessage() for r in said]
