"""The command line is a contract: verbs, output and exit codes (0 ok, 2 bad input, 3 refused,
78 a config error).

Most checks call :func:`pigateway.cli.main` in this process (same code, no interpreter
start-up); the ones whose point is the real process (``python -m pigateway``, exit codes
seen by a shell, ``$PIGATEWAY_CONFIG``) run it as a child. Every store is a real file in
the test's folder, and every refusal is checked to have left the queue as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Run
from harness import gateway
from pigateway import config as configuration
from pigateway.store import NewCommand, Store


def write_config(folder: Path, store_lines: str = "", extra: str = "") -> Path:
    """The CLI's config: ``store_lines`` (TOML) in [store], ``extra`` (TOML tables) beside it."""
    return gateway.write(folder / "config.toml", gateway.settings(
        folder, gateway_id="gw-cli", store=tomllib.loads(store_lines), **tomllib.loads(extra)))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def child(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pigateway", *argv], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def read_queue(config_file: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        store_config = configuration.load(config_file).store
        async with await Store.open(store_config, drainer=False) as store:
            return [c.as_dict() for c in await store.list_queued(1000)]
    return asyncio.run(read())


def dead_letter_all(config_file: Path, reason: str) -> list[str]:
    async def bury() -> list[str]:
        store_config = configuration.load(config_file).store
        async with await Store.open(store_config) as store:
            ids = [c.id for c in await store.list_queued(1000)]
            await store.dead_letter(ids, reason, "set up by the test")
        return ids
    return asyncio.run(bury())


def fill(config_file: Path, count: int) -> list[str]:
    async def put() -> list[str]:
        store_config = configuration.load(config_file).store
        async with await Store.open(store_config, drainer=False) as store:
            commands = await store.put_many([NewCommand(f"d{i}", "on", {"i": i})
                                             for i in range(count)])
        return [c.id for c in commands]
    return asyncio.run(put())


# --------------------------------------------------------------------------- send


def test_send_prints_the_id_of_a_durable_command(config_file: Path) -> None:
    done = child("send", "--config", str(config_file), "--device", "pump-1",
                 "--command", "start", "--param", "speed=3", "--param", "mode=eco",
                 "--params-json", '{"speed": 1, "extra": [1, 2]}', "--ttl", "60")
    assert (done.returncode, done.stderr) == (0, "")
    [row] = read_queue(config_file)
    assert done.stdout == f"{row['id']}\n"
    assert (row["device"], row["name"]) == ("pump-1", "start")
    assert row["params"] == {"speed": 3, "mode": "eco", "extra": [1, 2]}
    assert row["expires_at"] - row["queued_at"] == pytest.approx(60)


def test_send_reads_pigateway_config_from_the_environment(config_file: Path) -> None:
    env = {**os.environ, "PIGATEWAY_CONFIG": str(config_file)}
    done = child("send", "--device", "lamp", "--command", "on", env=env)
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_queue(config_file)] == [done.stdout.strip()]


@pytest.mark.parametrize(("value", "expected"), [
    ("5", 5), ("2.5", 2.5), ("true", True), ("null", None), ('"5"', "5"), ("hello", "hello"),
    ("[1,2]", [1, 2]), ("", ""), ("a=b", "a=b"),
])
def test_param_values_that_read_as_json_are_json(cli: Run, config_file: Path, value: str,
                                                 expected: Any) -> None:
    code, out, _ = cli("send", "--config", str(config_file), "--device", "d", "--command", "c",
                       "--param", f"key={value}")
    assert code == 0
    [row] = read_queue(config_file)
    assert (row["id"], row["params"]) == (out.strip(), {"key": expected})


@pytest.mark.parametrize(("args", "needle"), [
    (["--param", "novalue"], "KEY=VALUE"),
    (["--param", "=5"], "KEY=VALUE"),
    (["--params-json", "[1, 2]"], "must be a JSON object"),
    (["--params-json", '"text"'], "must be a JSON object"),
    (["--params-json", "{bad"], "not valid JSON"),
    (["--param", "x=NaN"], "not JSON"),
    (["--params-json", '{"x": Infinity}'], "not JSON"),
    (["--ttl", "-5"], "ttl"),
    (["--ttl", "inf"], "ttl"),
    (["--device", ""], "device"),
    (["--param", "n=" + "9" * 5000], "5000 digits"),
    (["--param", "n=-" + "9" * 5000], "5000 digits"),
    (["--params-json", '{"a": ' + "[" * 4000 + "]" * 4000 + "}"], "nested 4001 deep"),
    (["--params-json", "[" * 100_000], "nested"),
    (["--param", "a=" + "{" * 5000], "nested"),
    (["--params-json", '{"a": 1e400}'], "not finite"),
    (["--params-json", '{"a": -1e999}'], "not finite"),
    (["--param", "a=1e400"], "not finite"),
    (["--params-json", '{"a": "\\ud800"}'], "surrogate"),
    (["--params-json", '{"\\udfff": 1}'], "surrogate"),
    (["--param", "k=\udcff"], "surrogate"),  # a byte that is not UTF-8, as argv decodes it
    (["--param", "\udcff=1"], "surrogate"),
    (["--params-json", '{"a": 1}'.encode("utf-16").decode("latin-1")], "not valid JSON"),
    (["--device", "lamp\n1"], "control character"),
    (["--device", "lamp\x1b[31m"], "control character"),
    (["--command", "on\x00"], "control character"),
    (["--command", "on\x85"], "control character"),
    (["--device", "\udcff"], "surrogate"),
    (["--command", "x" * 100_000], "at most 128"),
])
def test_bad_input_exits_2_and_queues_nothing(cli: Run, config_file: Path, args: list[str],
                                              needle: str) -> None:
    first = fill(config_file, 1)
    argv = ["send", "--config", str(config_file), "--device", "d", "--command", "c", *args]
    code, out, err = cli(*argv)
    assert (code, out) == (2, "")
    assert needle in err and err.startswith("pigateway: ")
    assert len(err) < 1000 and err.count("\n") == 1, "one bounded line"
    assert [r["id"] for r in read_queue(config_file)] == first


def test_input_python_cannot_hold_exits_2_without_a_traceback(config_file: Path) -> None:
    """The real process: what json.loads turns into a builtin exception is a message."""
    base = ["send", "--config", str(config_file), "--device", "d", "--command", "c"]
    for extra in (["--param", "n=" + "7" * 5000], ["--params-json", "[" * 5000],
                  ["--params-json", '{"x": ' + '{"y": ' * 3000 + "1" + "}" * 3001]):
        done = child(*base, *extra)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr[-2000:]
        assert "Traceback" not in done.stderr and done.stderr.startswith("pigateway: ")
    assert read_queue(config_file) == []


def test_usage_errors_of_argparse_exit_2(cli: Run, config_file: Path) -> None:
    assert cli("send", "--config", str(config_file), "--command", "c")[0] == 2
    assert cli("send", "--config", str(config_file), "--device", "d", "--command", "c",
               "--ttl", "soon")[0] == 2
    assert read_queue(config_file) == []


def test_oversize_params_exit_2_naming_the_limit(tmp_path: Path, cli: Run) -> None:
    config_file = write_config(tmp_path, "max_params_bytes = 64")
    code, _, err = cli("send", "--config", str(config_file), "--device", "d", "--command", "c",
                       "--param", f"blob={'x' * 100}")
    assert code == 2
    assert "store.max_params_bytes" in err and "64" in err
    assert read_queue(config_file) == []


def test_a_full_queue_exits_3_and_keeps_what_it_has(tmp_path: Path) -> None:
    config_file = write_config(tmp_path, 'max_commands = 2\noverflow = "reject"')
    kept = fill(config_file, 2)
    done = child("send", "--config", str(config_file), "--device", "d", "--command", "c")
    assert (done.returncode, done.stdout) == (3, "")
    assert "the queue is full (2 commands, 14 B; store.max_commands = 2, store.max_bytes = " \
        "512 MiB)" in done.stderr
    assert [r["id"] for r in read_queue(config_file)] == kept


def test_the_disk_guard_exits_3(tmp_path: Path, cli: Run) -> None:
    config_file = write_config(tmp_path)
    text = config_file.read_text().replace("min_free_bytes = 0",
                                           f"min_free_bytes = {2 ** 50}")  # 1 PiB
    config_file.write_text(text)
    code, out, err = cli("send", "--config", str(config_file), "--device", "d",
                         "--command", "c")
    assert (code, out) == (3, "")
    # sizes with units, as df -h shows them: never a raw byte count
    assert re.search(r"only [\d.]+ [KMGT]iB free under .*store.min_free_bytes = 1024 TiB free",
                     err), err
    assert not re.search(r"\d{5}", err.replace(str(tmp_path), "")), err
    assert read_queue(config_file) == []


def test_a_config_error_exits_78_and_names_the_key(tmp_path: Path, cli: Run) -> None:
    """A config error is not the producer's bad input (2): it has its own code, EX_CONFIG."""
    config_file = write_config(tmp_path, "max_commands = 0")
    code, out, err = cli("send", "--config", str(config_file), "--device", "d",
                         "--command", "c")
    assert (code, out) == (78, "")
    assert "store.max_commands" in err and "0" in err and "least allowed is 1" in err


def test_a_missing_config_file_exits_78(tmp_path: Path, cli: Run) -> None:
    code, _, err = cli("send", "--config", str(tmp_path / "nope.toml"), "--device", "d",
                       "--command", "c")
    assert code == 78
    assert "nope.toml" in err and "does not exist" in err


def test_send_queues_whatever_a_section_it_does_not_use_says(tmp_path: Path, cli: Run) -> None:
    """A typo in [uplink] is the service's problem; a producer still queues (exit 0)."""
    config_file = write_config(tmp_path, extra="[uplink]\nbatch_dealy = 0.5\n"
                                               '[mqtt]\nport = "not a port"')
    code, out, err = cli("send", "--config", str(config_file), "--device", "d",
                         "--command", "c")
    assert (code, err) == (0, "")
    assert [row["id"] for row in read_queue_store(config_file)] == [out.strip()]


@pytest.mark.parametrize("profile", ["[]", "{}", "[1, [2]]"])
def test_a_profile_that_is_no_name_is_a_config_error_not_a_crash(
        tmp_path: Path, cli: Run, profile: str) -> None:
    """``mqtt.profile`` set to a list or a table (a careless edit) is the service's config
    error, named by ``config check``; a send, which reads [store] alone, still queues."""
    config_file = write_config(tmp_path, extra=f"[mqtt]\nprofile = {profile}\n")
    code, out, err = cli("send", "--config", str(config_file), "--device", "d",
                         "--command", "c")
    assert (code, err) == (0, "")
    assert [row["id"] for row in read_queue_store(config_file)] == [out.strip()]
    code, _, err = cli("config", "check", "--config", str(config_file))
    assert code == 78 and "mqtt.profile" in err


@pytest.mark.parametrize("path", ["/", "/.", "//"])
def test_a_store_path_that_names_no_file_is_a_config_error(
        tmp_path: Path, cli: Run, path: str) -> None:
    """``store.path = "/"`` (a careless edit) names a folder, no file: send and config check
    say so (exit 78, naming the key), not a ValueError traceback out of the store."""
    config_file = write_config(tmp_path, f'path = "{path}"')
    for argv in (("send", "--device", "d", "--command", "c"), ("config", "check")):
        code, _, err = cli(*argv, "--config", str(config_file))
        assert code == 78 and "store.path" in err, err


@pytest.mark.parametrize("key", ["max_attempts", "max_commands", "max_dead_letters"])
def test_a_whole_number_past_64_bits_is_a_config_error(tmp_path: Path, cli: Run,
                                                        key: str) -> None:
    """TOML's integers are 64-bit, and so are SQLite's: ``store.max_attempts =
    100000000000000000000000`` passed every check, then each attempt counted by the service
    raised OverflowError out of SQLite. It is refused where it is read, naming its key."""
    config_file = write_config(tmp_path, f"{key} = 100000000000000000000000")
    code, _, err = cli("config", "check", "--config", str(config_file))
    assert code == 78 and f"store.{key}" in err, err


@pytest.mark.parametrize("table", ["mqtt", "local"])
def test_a_session_expiry_past_mqtts_four_bytes_is_a_config_error(
        tmp_path: Path, cli: Run, table: str) -> None:
    """MQTT's Session Expiry Interval is four bytes (4294967295: never expires). A longer
    one (a thousand years in seconds) passed config check, then every CONNECT failed to
    pack (struct.error): the link never came up. It is refused, naming its key."""
    config_file = write_config(tmp_path, extra=f"[{table}]\nsession_expiry = 31536000000\n")
    code, _, err = cli("config", "check", "--config", str(config_file))
    assert code == 78 and f"{table}.session_expiry" in err, err


@pytest.mark.parametrize(("table", "key"), [("mqtt", "topic_prefix"), ("mqtt", "username"),
                                            ("local", "username")])
def test_a_string_past_what_mqtt_carries_is_a_config_error(
        tmp_path: Path, cli: Run, table: str, key: str) -> None:
    """An MQTT string is at most 65535 bytes. A longer user name passed config check, then
    every CONNECT failed to pack (struct.error); a longer topic prefix made every topic
    too long: each command dead-lettered too-large. Each is refused, naming its key."""
    config_file = write_config(tmp_path, extra=f'[{table}]\n{key} = "{"p" * 70000}"\n')
    code, _, err = cli("config", "check", "--config", str(config_file))
    assert code == 78 and f"{table}.{key}" in err, err


def read_queue_store(config_file: Path) -> list[dict[str, Any]]:
    """The queued rows, reading [store] alone (the rest of the file may be broken)."""
    async def read() -> list[dict[str, Any]]:
        store_config = configuration.load_store(config_file)
        async with await Store.open(store_config, drainer=False) as store:
            return [c.as_dict() for c in await store.list_queued(1000)]
    return asyncio.run(read())


#: Every verb, with what it needs besides --config.
EVERY_VERB = (["send", "--device", "d", "--command", "c"], ["queue", "ls"],
              ["queue", "stats"], ["queue", "show", "01J"], ["queue", "requeue-dead"],
              ["queue", "purge", "--dead", "--yes"], ["status"], ["metrics"], ["pause"],
              ["resume"], ["flush"], ["config", "check"], ["inbox", "ls"], ["run"])


@pytest.mark.parametrize("argv", EVERY_VERB, ids=" ".join)
def test_every_verb_exits_78_for_a_config_error(tmp_path: Path, argv: list[str]) -> None:
    """sysexits' EX_CONFIG, in a real process as a shell and systemd see it."""
    config_file = write_config(tmp_path, "max_commands = 0")
    done = child(*argv, "--config", str(config_file))
    assert done.returncode == 78, done.stderr
    assert "store.max_commands" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- queue


def test_queue_ls_as_a_table_and_as_json(cli: Run, config_file: Path) -> None:
    ids = fill(config_file, 3)
    code, out, _ = cli("queue", "ls", "--config", str(config_file))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "DEVICE", "NAME"]
    assert [line.split()[0] for line in lines[1:]] == ids
    code, out, _ = cli("queue", "ls", "--json", "--limit", "2", "--config", str(config_file))
    assert code == 0
    assert [row["id"] for row in json.loads(out)] == ids[:2]


def test_queue_ls_of_an_empty_queue(cli: Run, config_file: Path) -> None:
    assert cli("queue", "ls", "--config", str(config_file))[:2] == (0, "(none)\n")
    code, out, _ = cli("queue", "ls", "--dead", "--json", "--config", str(config_file))
    assert (code, json.loads(out)) == (0, [])


def test_queue_ls_dead_shows_the_reason(cli: Run, config_file: Path) -> None:
    fill(config_file, 2)
    ids = dead_letter_all(config_file, "rejected-by-broker")
    code, out, _ = cli("queue", "ls", "--dead", "--json", "--config", str(config_file))
    assert code == 0
    rows = json.loads(out)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert {(r["reason"], r["detail"]) for r in rows} == \
        {("rejected-by-broker", "set up by the test")}
    code, out, _ = cli("queue", "ls", "--dead", "--config", str(config_file))
    assert "REASON" in out.splitlines()[0] and "rejected-by-broker" in out


def test_queue_stats(cli: Run, config_file: Path) -> None:
    fill(config_file, 3)
    code, out, _ = cli("queue", "stats", "--json", "--config", str(config_file))
    assert code == 0
    stats = json.loads(out)
    assert (stats["depth"], stats["in_flight"], stats["dead"]) == (3, 0, {})
    assert stats["bytes"] == sum(len(json.dumps({"i": i}, separators=(",", ":")))
                                 for i in range(3))
    code, out, _ = cli("queue", "stats", "--config", str(config_file))
    assert code == 0 and "Queued: 3 commands, 21 B" in out


def test_requeue_dead_by_id_and_all(cli: Run, config_file: Path) -> None:
    fill(config_file, 3)
    ids = dead_letter_all(config_file, "max-attempts")
    code, out, _ = cli("queue", "requeue-dead", "--id", ids[1], "--config", str(config_file))
    assert (code, out) == (0, "requeued 1 dead letter\n")
    assert [r["id"] for r in read_queue(config_file)] == [ids[1]]
    code, _, err = cli("queue", "requeue-dead", "--id", "NOPE", "--config", str(config_file))
    assert code == 2 and "NOPE" in err
    code, out, _ = cli("queue", "requeue-dead", "--config", str(config_file))
    assert (code, out) == (0, "requeued 2 dead letters\n")
    assert sorted(r["id"] for r in read_queue(config_file)) == sorted(ids)


def test_purge_needs_yes_and_deletes_what_it_says(cli: Run, config_file: Path) -> None:
    fill(config_file, 2)
    dead_letter_all(config_file, "expired")
    kept = fill(config_file, 3)
    code, _, err = cli("queue", "purge", "--dead", "--config", str(config_file))
    assert code == 2 and "--yes" in err
    code, _, err = cli("queue", "purge", "--all", "--config", str(config_file))
    assert code == 2 and "--yes" in err
    assert [r["id"] for r in read_queue(config_file)] == kept  # nothing deleted
    assert cli("queue", "purge", "--yes", "--config", str(config_file))[0] == 2  # which?
    code, out, _ = cli("queue", "purge", "--dead", "--yes", "--config", str(config_file))
    assert (code, out) == (0, "deleted 2 rows: every dead letter\n")
    assert [r["id"] for r in read_queue(config_file)] == kept
    code, out, _ = cli("queue", "purge", "--all", "--yes", "--config", str(config_file))
    assert code == 0 and out.startswith("deleted 3 rows")
    assert read_queue(config_file) == []


# --------------------------------------------------------------------------- config, status


def test_config_check_prints_the_effective_config(tmp_path: Path, cli: Run) -> None:
    config_file = write_config(tmp_path, "max_commands = 500",
                               extra='[mqtt]\nhost = "broker.example"\nport = 8883')
    code, out, err = cli("config", "check", "--config", str(config_file))
    assert (code, err) == (0, "")
    head, _, body = out.partition("\n")
    assert head.startswith(f"# {config_file}: valid")
    effective = json.loads(body)
    assert effective["gateway_id"] == "gw-cli"
    assert effective["store"]["max_commands"] == 500
    assert effective["store"]["overflow"] == "reject"  # a default, shown as in effect
    assert (effective["mqtt"]["host"], effective["mqtt"]["port"]) == ("broker.example", 8883)
    assert effective["mqtt"]["topic_prefix"] == "pigateway"


def test_config_check_of_a_bad_file_exits_78(tmp_path: Path, cli: Run) -> None:
    config_file = write_config(tmp_path, 'overflow = "drop-newest"')
    code, out, err = cli("config", "check", "--config", str(config_file))
    assert (code, out) == (78, "")
    assert "store.overflow" in err and "drop-newest" in err and "'drop-oldest'" in err


def test_status_without_a_service_says_so_and_shows_the_queue(cli: Run,
                                                             config_file: Path) -> None:
    fill(config_file, 4)
    code, out, _ = cli("status", "--config", str(config_file))
    assert code == 4  # as systemctl status exits non-zero for an inactive unit
    assert out.startswith("○ pigateway - not running")
    assert "Queue: 4 commands" in out
    code, out, _ = cli("status", "--json", "--config", str(config_file))
    state = json.loads(out)
    assert (code, state["running"], state["depth"]) == (4, False, 4)
    assert str(config_file.parent / "control.sock") in state["why"]


def test_status_with_a_stale_socket_says_not_running(cli: Run, config_file: Path) -> None:
    """A service killed with SIGKILL leaves its socket file; nothing listens on it."""
    path = config_file.parent / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.exists()
    code, out, _ = cli("status", "--json", "--config", str(config_file))
    assert code == 4
    assert json.loads(out)["running"] is False


def test_python_dash_m_and_version(config_file: Path) -> None:
    done = child("--version")
    assert done.returncode == 0 and done.stdout.startswith("pigateway ")
    done = child("queue", "stats", "--json", "--config", str(config_file))
    assert done.returncode == 0 and json.loads(done.stdout)["depth"] == 0


# --------------------------------------------------------------------------- for people


@pytest.mark.parametrize("verb", [("queue", "ls"), ("queue", "ls", "--dead"), ("inbox", "ls")],
                         ids=" ".join)
@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_a_limit_below_one_is_bad_input_not_an_empty_list(cli: Run, config_file: Path,
                                                          verb: tuple[str, ...],
                                                          limit: str) -> None:
    fill(config_file, 3)
    code, out, err = cli(*verb, "--limit", limit, "--config", str(config_file))
    assert (code, out) == (2, "")
    assert "--limit" in err and "(none)" not in err


def test_queue_ls_says_when_it_shows_only_part_of_the_queue(cli: Run,
                                                           config_file: Path) -> None:
    fill(config_file, 60)
    code, out, _ = cli("queue", "ls", "--config", str(config_file))
    rows = out.splitlines()
    assert code == 0 and len(rows) == 1 + 50 + 1
    assert rows[-1] == "(50 of 60 queued shown; --limit 100 for more, --json for every field)"
    code, out, err = cli("queue", "ls", "--json", "--config", str(config_file))
    assert len(json.loads(out)) == 50 and "50 of 60 queued shown" in err
    code, out, _ = cli("queue", "ls", "--limit", "60", "--config", str(config_file))
    assert len(out.splitlines()) == 61 and "shown" not in out


def test_send_with_a_used_key_for_another_command_is_refused(cli: Run,
                                                             config_file: Path) -> None:
    base = ("send", "--config", str(config_file), "--id", "k-1", "--device", "pump")
    code, first, _ = cli(*base, "--command", "start", "--param", "speed=3")
    assert code == 0
    code, again, err = cli(*base, "--command", "start", "--param", "speed=3")
    assert (code, again, err) == (0, first, "")  # a retry: the same command, the first id
    code, out, err = cli(*base, "--command", "stop")
    assert (code, out) == (6, "")
    assert first.strip() in err and "different command" in err and "nothing queued" in err
    assert [row["name"] for row in read_queue(config_file)] == ["start"]


@pytest.mark.parametrize("text", ["{bad", "[" * 100_000 + "]" * 100_000],
                         ids=["cut", "deep"])
def test_send_with_a_key_whose_first_command_no_longer_reads_is_refused(
        cli: Run, config_file: Path, text: str) -> None:
    """The first command's stored params no longer read (bit rot, a hand-edited file): the
    retry cannot be compared with it, so it is refused naming why (exit 6), never a
    traceback; the first stays queued (the drain dead-letters it, as any unreadable row)."""
    import sqlite3  # noqa: PLC0415

    base = ("send", "--config", str(config_file), "--id", "k-2", "--device", "pump",
            "--command", "start")
    code, first, _ = cli(*base)
    assert code == 0
    path = configuration.load(config_file).store.path
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE outbox SET params = ?", (text,))
    code, out, err = cli(*base)
    assert (code, out) == (6, "")
    assert first.strip() in err and "cannot be read" in err and "nothing queued" in err


def test_queue_show_finds_a_command_by_its_producer_key(cli: Run, config_file: Path) -> None:
    code, first, _ = cli("send", "--config", str(config_file), "--id", "order-17",
                         "--device", "pump", "--command", "start")
    code, out, _ = cli("queue", "show", "--key", "order-17", "--config", str(config_file))
    assert code == 0
    assert f"Command: {first.strip()}" in out and "Producer key: order-17" in out
    assert "queued, next to go" in out
    code, out, _ = cli("queue", "show", "--key", "order-17", "--json", "--config",
                       str(config_file))
    assert json.loads(out)["id"] == first.strip()
    code, _, err = cli("queue", "show", "--key", "nope", "--config", str(config_file))
    assert code == 2 and "no command was sent with --id 'nope'" in err
    code, _, err = cli("queue", "show", "--config", str(config_file))
    assert code == 2 and "a command id or --key" in err


def test_send_wait_says_at_once_that_the_service_is_not_running(config_file: Path) -> None:
    done = child("send", "--config", str(config_file), "--device", "d", "--command", "c",
                 "--wait", "--timeout", "0.2")
    assert done.returncode == 5 and done.stdout == ""
    note, last = done.stderr.splitlines()
    [row] = read_queue(config_file)
    assert note.startswith(f"{row['id']} queued; pigateway is not running")
    assert "goes out once the service runs" in note
    assert last.startswith(f"{row['id']} queued, not yet delivered")


# --------------------------------------------------------------------------- config check: files


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may enter (tmp_path is root's alone)."""
    from harness.sockets import short_dir  # noqa: PLC0415

    folder = short_dir()
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def nobody_config(folder: Path, **tables: Any) -> Path:
    """A config whose queue folder belongs to ``nobody``, as the service's would to it."""
    queue = folder / "q"
    queue.mkdir()
    shutil.chown(queue, "nobody", "nogroup")
    data = gateway.settings(folder, gateway_id="gw-cli", **tables)
    data["store"]["path"] = str(queue / "queue.db")
    return gateway.write(folder / "config.toml", data)


def test_config_check_passes_what_the_service_user_can_use(cli: Run, open_folder: Path) -> None:
    config_file = nobody_config(open_folder)
    code, out, err = cli("config", "check", "--user", "nobody", "--config", str(config_file))
    assert (code, err) == (0, "")
    assert out.startswith(f"# {config_file}: valid, its files usable by user nobody\n")


def test_config_check_fails_a_config_the_service_user_cannot_read(cli: Run,
                                                                  open_folder: Path) -> None:
    config_file = nobody_config(open_folder)
    config_file.chmod(0o600)  # root's alone: root reads it, the service cannot
    code, out, err = cli("config", "check", "--user", "nobody", "--config", str(config_file))
    assert (code, out) == (78, "")
    assert f"user nobody cannot read {config_file}" in err
    assert "mode 0600" in err and "chmod 640" in err


def test_config_check_of_a_staged_copy_leaves_its_mode_to_the_installer(
        cli: Run, open_folder: Path) -> None:
    config_file = nobody_config(open_folder)
    config_file.chmod(0o600)  # Ansible's validate: a temporary copy, root's
    code, _, err = cli("config", "check", "--staged", "--user", "nobody",
                       "--config", str(config_file))
    assert (code, err) == (0, "")


def test_config_check_fails_a_missing_password_file(cli: Run, open_folder: Path) -> None:
    missing = open_folder / "mqtt-password"
    config_file = nobody_config(open_folder, mqtt={"username": "gw", "password_file":
                                                   str(missing)})
    code, _, err = cli("config", "check", "--config", str(config_file))
    assert code == 78
    assert f"mqtt.password_file: {missing} does not exist" in err


def test_config_check_fails_a_queue_the_service_user_cannot_write(cli: Run,
                                                                  open_folder: Path) -> None:
    config_file = nobody_config(open_folder)
    queue = open_folder / "q" / "queue.db"
    queue.write_bytes(b"")  # root's, as a `sudo pigateway send` leaves it
    code, _, err = cli("config", "check", "--user", "nobody", "--config", str(config_file))
    assert code == 78
    assert f"store.path: user nobody cannot read and write {queue}" in err
    assert f"chown pigateway: {queue}" in err


def test_config_check_names_a_folder_the_service_user_cannot_enter(cli: Run,
                                                                   tmp_path: Path) -> None:
    config_file = write_config(tmp_path)  # pytest's tmp_path: 0700, root's
    code, _, err = cli("config", "check", "--user", "nobody", "--config", str(config_file))
    assert code == 78
    assert "user nobody cannot enter" in err


def test_config_check_of_an_unknown_user_is_bad_input(cli: Run, config_file: Path) -> None:
    code, _, err = cli("config", "check", "--user", "no-such-user-here", "--config",
                       str(config_file))
    assert code == 2 and "no-such-user-here" in err


def test_inbox_ls_is_a_table_for_people(cli: Run, config_file: Path) -> None:
    """One pending command and one rejected at once: the state, the outcome in a word, the
    time received as local time with its age, and the reason; no JSON document, no None."""
    from pigateway.wire import result_document  # noqa: PLC0415

    async def receive() -> None:
        store_config = configuration.load(config_file).store
        async with await Store.open(store_config) as store:
            now = time.time()
            await store.inbox.receive("c1", "lamp", "on", {}, expires_at=None, ttl=None,
                                      now=now, headroom=0)
            await store.inbox.reject("c2", "fan", result_document(
                "c2", "rejected", "no device 'fan'", max_bytes=1000, now=now),
                now=now, done_on=store.clock.now())
    asyncio.run(receive())
    code, out, _ = cli("inbox", "ls", "--config", str(config_file))
    head, first, second = out.splitlines()
    assert code == 0
    assert head.split() == ["ID", "DEVICE", "NAME", "STATE", "STATUS", "ATTEMPTS", "RECEIVED",
                            "AT", "LAST", "ERROR"]
    assert first.split()[:6] == ["c1", "lamp", "on", "pending", "-", "0"]
    assert first.rstrip().endswith("s ago)  -")
    assert second.split()[:5] == ["c2", "fan", "-", "done", "rejected"]
    assert second.endswith("no device 'fan'")
    assert "None" not in out and "{" not in out


def test_only_no_socket_or_nobody_listening_means_not_running(folder: Path) -> None:
    """``send --wait``'s look: a missing socket or one nobody listens on (a killed service)
    is "not running"; a socket that cannot be reached for another reason (no permission,
    here a path the kernel refuses) is no proof, so nothing false is said."""
    from pigateway.cli import _service_answers  # noqa: PLC0415

    assert _service_answers(folder / "none.sock") is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(folder / "dead.sock"))
        assert _service_answers(folder / "dead.sock") is False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(str(folder / "live.sock"))
            live.listen()
            assert _service_answers(folder / "live.sock") is True
    assert _service_answers(folder / ("x" * 200)) is True  # ENAMETOOLONG: unknown, not down
