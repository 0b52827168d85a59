"""What people read (``pigateway status``, ``queue stats/ls/show``, ``inbox ls``) is words,
not Python: no ``None``, no dict repr, no epoch seconds, no raw byte counts, no errno.

The renderers are pure (:mod:`pigateway.cli.report`), so they are called here directly with
fixed times, in UTC. The end-to-end forms (a real service, a real queue file) are in
tests/test_cli.py and tests/test_cli_live.py.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Run
from pigateway.cli import report
from pigateway.text import json_kind

NOW = 1_796_641_068.0  # Mon 2026-12-07 10:57:48 UTC

#: What Python leaks into text when a value is printed as it is.
PYTHON = re.compile(r"\bNone\b|\bTrue\b|\bFalse\b|\{'|\[Errno|\b1[6-9]\d{8}(\.\d+)?\b")


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def state(**changes: Any) -> dict[str, Any]:
    """The control socket's state of an online, idle gateway without ingest, changed."""
    base: dict[str, Any] = {
        "running": True, "link": "online", "local": None, "paused": False, "draining": False,
        "depth": 0, "oldest_age": None, "in_flight": 0, "dead_letters": 0,
        "last_error": None, "fault": None,
        "limits": {"max_inflight": 8, "receive_maximum": 20, "maximum_qos": 2,
                   "retain_available": True, "max_packet_size": None,
                   "max_batch_bytes": 262144, "max_messages_per_second": None,
                   "max_bytes_per_second": None},
        "retry_at": None, "link_since": NOW - 180, "started_at": NOW - 3600, "version": 4,
        "retry_in": None, "uptime": 3600.0,
    }
    return {**base, **changes}


def lines(text: str) -> dict[str, str]:
    """The ``Label: value`` lines of a block, by label."""
    return {label.strip(): value for label, _, value in
            (line.partition(": ") for line in text.splitlines()[1:])}


def test_status_of_an_online_gateway_reads_like_systemctl() -> None:
    text = report.status_running(state(), "online · queue 0 · dead 0", NOW)
    assert text.splitlines()[0] == "● pigateway - online · queue 0 · dead 0"
    shown = lines(text)
    assert shown["Active"] == "running since Mon 2026-12-07 09:57:48 UTC; 1h 0m ago"
    assert shown["Link"] == "online since Mon 2026-12-07 10:54:48 UTC; 3m ago"
    assert shown["Local"].startswith("not configured")
    assert shown["Queue"] == "0 commands"
    assert shown["Dead"] == "none"
    assert shown["Limits"] == ("8 batches in flight, 256 KiB a batch, broker receive maximum "
                               "20, QoS up to 2, not paced")
    assert "Fault" not in shown and "Last error" not in shown
    assert not PYTHON.search(text), text


def test_status_shows_the_fault_and_the_last_error_first() -> None:
    text = report.status_running(state(
        link="offline", fault="login refused by the broker: not authorised",
        last_error="[Errno 111] Connection refused", retry_at=NOW + 117, limits=None,
    ), "FAULT login refused · offline 3m · queue 0 · retrying in 1m", NOW)
    first = text.splitlines()[1:3]
    assert first[0].strip() == ("Fault: login refused by the broker: not authorised "
                                "(an operator must act)")
    assert first[1].strip() == "Last error: Connection refused"
    shown = lines(text)
    assert shown["Link"].endswith("; next try in 1m")
    assert shown["Limits"] == "not known until the first connection"
    later = lines(report.status_running(state(link="offline", retry_at=NOW - 0.8), "", NOW))
    assert later["Link"].endswith("; trying now")  # never "next try 0s ago"
    assert later["Limits"].endswith("not paced (as of the last connection)")
    assert not PYTHON.search(text), text


def test_status_says_the_pins_are_mock_and_why() -> None:
    """pin_factory = "auto" without a gpiochip: the service runs, lights and relays do not;
    status says so (a real Pi's gpiochip gives no such line)."""
    assert "Pins" not in lines(report.status_running(state(), "online", NOW))
    text = report.status_running(state(pins="lgpio cannot open a gpiochip: [Errno 2] no such "
                                            "file"), "online", NOW)
    assert lines(text)["Pins"] == ("mock: lgpio cannot open a gpiochip: no such file (the "
                                   "panel and gpio devices drive nothing)")


def test_status_says_paused_and_a_local_broker_that_is_down() -> None:
    text = report.status_running(state(paused=True, depth=1204, oldest_age=190.0,
                                       local="offline"), "online · paused", NOW)
    shown = lines(text)
    assert shown["Draining"].startswith("paused: queueing goes on, nothing is sent")
    assert shown["Queue"] == "1,204 commands, the oldest queued 3m ago"
    assert shown["Local"].startswith("offline (ingest reconnects by itself; not a fault")


def test_status_of_a_stopped_service_says_why_and_what_is_on_disk() -> None:
    text = report.status_stopped(
        {"depth": 3, "bytes": 33, "oldest_age": 45.0, "in_flight": 0,
         "dead": {"expired": 2}, "dead_total": 2},
        "pigateway is not running (nothing answers on /run/pigateway/control.sock)", NOW)
    assert text.splitlines()[0] == "○ pigateway - not running"
    shown = lines(text)
    assert shown["Active"].startswith("inactive: pigateway is not running")
    assert shown["Queue"] == ("3 commands, 33 B, the oldest queued 45s ago, on disk: they go "
                              "out once the service runs")
    assert shown["Dead"] == "2 dead letters (expired 2); pigateway queue ls --dead"
    assert not PYTHON.search(text), text


@pytest.mark.parametrize(("count", "shown"), [
    (0, "0 B"), (812, "812 B"), (1024, "1 KiB"), (262144, "256 KiB"),
    (1536 * 1024, "1.5 MiB"), (32 * 1024 * 1024, "32 MiB"), (3 * 1024 ** 4, "3 TiB"),
    (1 << 62, "4194304 TiB"),
])
def test_sizes_have_units(count: int, shown: str) -> None:
    assert report.size(count) == shown


def test_plurals() -> None:
    assert [report.plural(n, "command") for n in (0, 1, 2, 1204)] == [
        "0 commands", "1 command", "2 commands", "1,204 commands"]
    assert report.plural(1, "batch", "batches") == "1 batch"
    assert report.plural(3, "batch", "batches") == "3 batches"


def test_queue_stats_in_words_and_units() -> None:
    text = report.stats_text({"depth": 62, "bytes": 300_000, "oldest_age": 125.0,
                              "in_flight": 1, "dead": {"expired": 1, "overflow": 3},
                              "dead_total": 4, "forwarded": 2, "forwarded_bytes": 1000})
    shown = lines("\n" + text)
    assert shown["Queued"] == "60 commands, 292 KiB"
    assert shown["Forwarded"].startswith("2 messages, 1000 B")
    assert shown["In flight"].startswith("1 command sent")
    assert shown["Oldest"] == "queued 2m ago"
    assert shown["Dead"].startswith("4 dead letters (expired 1, overflow 3)")


def test_a_table_shows_local_times_with_their_age_and_dashes_for_nothing() -> None:
    text = report.table([{"id": "a", "queued_at": NOW - 65, "last_error": None,
                          "params": {"x": 1}},
                         {"id": "b", "queued_at": NOW, "last_error": "[Errno 113] No route",
                          "params": {}}],
                        ("id", "queued_at", "last_error", "params"), NOW)
    head, first, second = text.splitlines()
    assert head.split() == ["ID", "QUEUED", "AT", "LAST", "ERROR", "PARAMS"]
    assert "2026-12-07 10:56:43 (1m ago)" in first and " - " in first
    assert "No route" in second and "Errno" not in second
    assert report.table([], ("id",), NOW) == "(none)"


def test_where_a_command_is_in_words() -> None:
    queued = report.where_text({"id": "01A", "state": "queued", "position": 0,
                                "attempts": 0}, NOW)
    assert "queued, next to go" in queued
    delivered = report.where_text({"id": "01A", "state": "delivered", "batch": "01B",
                                   "at": NOW - 30, "key": "k-1"}, NOW)
    assert "delivered: the broker acknowledged it Mon 2026-12-07 10:57:18 UTC; 30s ago" in (
        delivered)
    assert "Producer key: k-1" in delivered
    dead = report.where_text({"id": "01A", "state": "dead", "reason": "expired",
                              "detail": "ttl 60s", "attempts": 3}, NOW)
    assert "dead-lettered: expired" in dead and "Why: ttl 60s" in dead
    assert not PYTHON.search(queued + delivered + dead)


def test_a_cut_listing_says_how_many_there_are() -> None:
    assert report.more(50, 60, "queued", 100) == (
        "(50 of 60 queued shown; --limit 100 for more, --json for every field)")
    assert report.more(60, 60, "queued", 100) is None
    assert "--limit 1200000 for more" in (report.more(50, 1_200_000, "queued", 1_200_000) or "")
    # (a hint is typed back: "1,200,000" is not a number to argparse)
    assert report.more(100, None, "inbox entries", 200).startswith("(the first 100 inbox")


def test_errors_lose_the_errno_and_stay_one_bounded_line() -> None:
    assert report.error("[Errno 111] Connection refused") == "Connection refused"
    assert report.error("[Errno -2] Name or service not known") == "Name or service not known"
    assert report.error("publish of batch 01B failed: OSError: [Errno 32] Broken pipe") == (
        "publish of batch 01B failed: Broken pipe")
    assert report.error("ssl.SSLError: certificate verify failed") == "certificate verify failed"
    assert report.error("TLS failed: the hostname does not match") == (
        "TLS failed: the hostname does not match")  # words with a colon stay
    assert report.error("a\nb" + "x" * 2000).startswith("a\\x0ab")
    assert len(report.error("x" * 2000)) == 500


def test_no_message_counts_with_an_s_in_brackets() -> None:
    """Counts are said with :func:`pigateway.text.plural` ("1 command", "2 commands"), in
    the journal and the CLI alike: no string of the service says "command(s)" (docstrings,
    which no one reads in a terminal, aside)."""
    root = Path(__file__).resolve().parent.parent / "service" / "pigateway"
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree)
                      if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
        found += [f"{path.relative_to(root)}:{node.lineno}: {node.value}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in docstrings and re.search(r"\w\((s|es)\)", node.value)]
    assert found == []


@pytest.mark.parametrize(("kind", "count", "said"), [
    ("actions", 1, "1 command"), ("actions", 12, "12 commands"), ("results", 1, "1 result"),
    ("forward", 3, "3 forwarded messages"),
])
def test_the_delivered_line_counts_what_a_batch_carries(kind: str, count: int,
                                                        said: str) -> None:
    """An "action" is one device and its commands (the wire format): the journal's line for
    an acknowledged batch counts commands, results or messages, never "1 actions"."""
    from pigateway.uplink import BATCH_MEMBERS  # noqa: PLC0415 - the service's modules

    assert report.plural(count, *BATCH_MEMBERS[kind]) == said
    assert set(BATCH_MEMBERS) == {"actions", "results", "forward"}


@pytest.mark.parametrize(("value", "said"), [
    ([1, 2], "an array"), ("x", "a string"), (5, "a number"), (2.5, "a number"),
    (True, "true"), (None, "null"), ({}, "an object"),
])
def test_json_values_are_named_in_json_words(value: Any, said: str) -> None:
    """A message says "not an array", never Python's "got list"."""
    assert json_kind(value) == said


def test_a_cli_error_names_no_python_type(cli: Run, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'gateway_id = "gw"\n[store]\npath = "{tmp_path / "q.db"}"\n'
                      "min_free_bytes = 0\n")
    code, _, err = cli("send", "--config", str(config), "--device", "d", "--command", "c",
                       "--params-json", "[1, 2]")
    assert code == 2 and "must be a JSON object, not an array" in err
    code, _, err = cli("send", "--config", str(tmp_path / "no" / "such.toml"), "--device", "d",
                       "--command", "c")
    assert "Errno" not in err and "Error:" not in err
