"""A careless config: a value pasted twice over, a path no file system takes, a socket path
too long for a unix socket. Each is a config error naming its key, short enough for a
terminal and the journal, from ``config check`` and from the service's start alike (exit
78, which systemd does not restart), never a traceback or a restart every five seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Run
from harness import gateway
from harness.service import environment

#: A value pasted by mistake: a megabyte (a 10 MB one costs the same checks, slower).
HUGE = "a" * 1_000_000
#: What an error may print at most, whatever the value: a few lines of a terminal.
MAX_ERROR = 2000

#: (what, TOML text after gateway_id, the key the error must name)
HUGE_VALUES = [
    ("gateway_id", f'gateway_id = "{HUGE}"\n', "gateway_id"),
    ("unknown key", f'gateway_id = "gw"\n{HUGE} = 1\n', "aaaa"),
    ("unknown table", f'gateway_id = "gw"\n[{HUGE}]\nx = 1\n', "aaaa"),
    ("metrics.listen", f'gateway_id = "gw"\n[metrics]\nlisten = "{HUGE}"\n', "metrics.listen"),
    ("manage.allow", f'gateway_id = "gw"\n[manage]\nenabled = true\nallow = ["{HUGE}"]\n',
     "manage.allow"),
    ("a device's handler", f'gateway_id = "gw"\n[devices.x]\nhandler = "{HUGE}"\n',
     "devices.x.handler"),
    ("a device's name", f'gateway_id = "gw"\n[devices."{HUGE}"]\nhandler = "log"\n',
     "devices."),
    ("mqtt.password_file", f'gateway_id = "gw"\n[mqtt]\npassword_file = "/{HUGE}"\n',
     "mqtt.password_file"),
]


@pytest.mark.parametrize(("text", "key"), [(t, k) for _, t, k in HUGE_VALUES],
                         ids=[what for what, _, _ in HUGE_VALUES])
def test_a_huge_value_is_a_short_error_naming_its_key(
        tmp_path: Path, cli: Run, text: str, key: str) -> None:
    """Each of these printed the whole megabyte back (and the service's start would have
    written it to the journal at crit, once every restart)."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    code, out, err = cli("config", "check", "--config", str(path))
    assert code == 78, err[:300]
    assert key in err
    assert len(out) + len(err) <= MAX_ERROR, f"{len(err):,} characters: {err[:200]}..."


NAME_MAX = 255  # bytes of one name in a path, on every Linux file system a Pi uses


def long_name(folder: Path) -> str:
    return str(folder / ("n" * (NAME_MAX + 1)) / "file")


def config_with(folder: Path, table: str, key: str, value: str) -> Path:
    data = gateway.settings(folder, gateway_id="gw-careless", gpio={"enabled": False})
    data[table] = {**data.get(table, {}), key: value}
    return gateway.write(folder / "config.toml", data)


PATH_KEYS = [("store", "path"), ("metrics", "textfile"), ("mqtt", "password_file"),
             ("control", "socket"), ("manage", "overlay")]


@pytest.mark.parametrize(("table", "key"), PATH_KEYS, ids=[f"{t}.{k}" for t, k in PATH_KEYS])
def test_a_path_with_a_name_too_long_for_a_file_system_is_a_config_error(
        tmp_path: Path, cli: Run, table: str, key: str) -> None:
    """A name over 255 bytes passed the validator; ``config check``, ``status`` and
    ``queue stats`` then ended in an OSError traceback, and the service's start failed with
    exit 1, restarted every 5 s forever."""
    path = config_with(tmp_path, table, key, long_name(tmp_path))
    code, _, err = cli("config", "check", "--config", str(path))
    assert code == 78, err[-600:]
    assert f"{table}.{key}" in err and "255" in err, err[-600:]
    for verb in (["status"], ["queue", "stats"]):
        code, _, err = cli(*verb, "--config", str(path))
        assert code == 78 and "Traceback" not in err, (verb, err[-600:])


def test_a_path_longer_than_linux_takes_is_a_config_error(tmp_path: Path, cli: Run) -> None:
    deep = str(tmp_path / "/".join(["d" * 200] * 21) / "queue.db")  # over 4,095 bytes
    code, _, err = cli("config", "check", "--config",
                       str(config_with(tmp_path, "store", "path", deep)))
    assert code == 78 and "store.path" in err and "4095" in err, err[-600:]


def test_a_control_socket_path_too_long_for_a_unix_socket_is_a_config_error(
        tmp_path: Path, cli: Run) -> None:
    """A unix socket's path has 107 bytes at most. A longer one passed ``config check``,
    and the service's start failed with exit 1 ("AF_UNIX path too long"), restarted every
    5 s forever: a config error exits 78, which the unit does not restart."""
    socket_path = str(tmp_path / ("s" * 120 + ".sock"))
    config = config_with(tmp_path, "control", "socket", socket_path)
    code, _, err = cli("config", "check", "--config", str(config))
    assert code == 78 and "control.socket" in err and "107" in err, err[-600:]
    run = subprocess.run([sys.executable, "-m", "pigateway", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=environment(),
                         check=False)
    assert run.returncode == 78, run.stderr[-600:]


UNIT_FILE = Path(__file__).parents[1] / "systemd" / "pigateway.service"


@pytest.fixture
def installed_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package's unit as it is, installed in a systemd folder of the test's own."""
    from pigateway.cli import access  # noqa: PLC0415 - the module under test

    folder = tmp_path / "systemd"
    folder.mkdir()
    (folder / access.UNIT).write_text(UNIT_FILE.read_text())
    monkeypatch.setattr(access, "UNIT_DIRS", (folder,))
    return folder


def check_warnings(cli: Run, folder: Path, table: str, key: str, value: str) -> str:
    """The warnings of ``config check`` on the default paths but ``table.key = value``."""
    data = gateway.settings(None, gateway_id="gw-careless")
    data[table] = {key: value}
    code, _, err = cli("config", "check", "--config",
                       str(gateway.write(folder / "config.toml", data)))
    assert code == 0, err[-600:]
    return "\n".join(line for line in err.splitlines() if line.startswith("warning:"))


@pytest.mark.parametrize(("table", "key", "value"), [
    ("store", "path", "/srv/pigateway/queue.db"),
    ("control", "socket", "/var/run-not/pigateway.sock"),
    ("metrics", "textfile", "/var/lib/prometheus/node-exporter/pigateway.prom"),
], ids=["store.path", "control.socket", "metrics.textfile"])
def test_a_file_the_units_sandbox_makes_read_only_is_warned_of(
        tmp_path: Path, cli: Run, installed_unit: Path, table: str, key: str, *,
        value: str) -> None:
    """Under the unit's ProtectSystem=strict only the folders it lists are writable: a queue
    in /srv passed ``config check`` (the modes were right) and the service then failed
    every start with "attempt to write a readonly database"."""
    folder = str(Path(value).parent)
    warned = check_warnings(cli, tmp_path, table, key, value)
    assert f"{table}.{key}" in warned and "ProtectSystem=strict" in warned, warned
    assert f"ReadWritePaths={folder}" in warned
    drop_in = installed_unit / "pigateway.service.d"
    drop_in.mkdir()
    (drop_in / "paths.conf").write_text(f"[Service]\nReadWritePaths={folder}\n")
    assert check_warnings(cli, tmp_path, table, key, value) == ""


@pytest.mark.parametrize(("table", "key", "value"), [
    ("store", "path", "/tmp/pigateway/queue.db"),
    ("control", "socket", "/tmp/pigateway.sock"),
], ids=["store.path", "control.socket"])
def test_a_file_in_the_units_private_tmp_is_warned_of(
        tmp_path: Path, cli: Run, installed_unit: Path, table: str, key: str, *,
        value: str) -> None:
    """Under PrivateTmp=yes the service's /tmp is its own: a queue there is not the one
    ``pigateway send`` fills (its commands would wait in a file the service never opens),
    a control socket there is one ``pigateway status`` never finds."""
    warned = check_warnings(cli, tmp_path, table, key, value)
    assert f"{table}.{key}" in warned and "PrivateTmp=yes" in warned, warned


def test_the_default_paths_fit_the_unit(tmp_path: Path, cli: Run, installed_unit: Path) -> None:
    data = gateway.settings(None, gateway_id="gw-careless")
    code, _, err = cli("config", "check", "--config",
                       str(gateway.write(tmp_path / "config.toml", data)))
    assert code == 0 and "warning:" not in err, err[-600:]


def test_without_the_unit_installed_nothing_is_said(tmp_path: Path, cli: Run,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pigateway.cli import access  # noqa: PLC0415 - the module under test

    monkeypatch.setattr(access, "UNIT_DIRS", (tmp_path / "no-systemd",))
    assert check_warnings(cli, tmp_path, "store", "path", "/srv/pigateway/queue.db") == ""


def clash_config(folder: Path, **tables: dict[str, object]) -> Path:
    data = gateway.settings(folder, gateway_id="gw-careless", gpio={"enabled": False})
    for table, values in tables.items():
        data[table] = {**data.get(table, {}), **values}
    return gateway.write(folder / "config.toml", data)


@pytest.mark.parametrize(("tables", "key"), [
    ({"metrics": {"textfile": "{queue}"}}, "metrics.textfile"),
    ({"metrics": {"textfile": "{queue}-wal"}}, "metrics.textfile"),
    ({"metrics": {"textfile": "{queue}.lock"}}, "metrics.textfile"),
    ({"control": {"socket": "{queue}-shm"}}, "control.socket"),
    ({"manage": {"enabled": True, "overlay": "{queue}"}}, "manage.overlay"),
    ({"metrics": {"textfile": "{config}"}}, "metrics.textfile"),
    ({"metrics": {"textfile": "{folder}/remote.toml"},
      "manage": {"enabled": True, "overlay": "{folder}/remote.toml"}}, "metrics.textfile"),
    ({"store": {"path": "{config}"}}, "store.path"),
    ({"metrics": {"textfile": "{folder}/password"},
      "mqtt": {"password_file": "{folder}/password"}}, "metrics.textfile"),
], ids=["textfile=queue.db", "textfile=its WAL", "textfile=its lock", "socket=its -shm",
        "overlay=queue.db", "textfile=the config", "textfile=overlay", "queue=the config",
        "textfile=password"])
def test_a_file_the_service_writes_over_one_it_keeps_is_a_config_error(
        tmp_path: Path, cli: Run, tables: dict[str, dict[str, object]], key: str) -> None:
    """``metrics.textfile`` set to the queue's path passed ``config check``, and the
    service then renamed its metrics over ``queue.db`` every interval: the queued commands
    gone, the file 'not a sound queue' (a remote config-set may change ``[metrics]`` too).
    A queue over the config file would be moved aside as corrupt, the config with it."""
    (tmp_path / "password").write_text("secret\n")
    places = {"queue": str(tmp_path / "queue.db"), "config": str(tmp_path / "config.toml"),
              "folder": str(tmp_path)}
    filled = {table: {k: v.format(**places) if isinstance(v, str) else v
                      for k, v in values.items()} for table, values in tables.items()}
    code, _, err = cli("config", "check", "--config", str(clash_config(tmp_path, **filled)))
    assert code == 78, err[-600:]
    assert key in err, err[-600:]


def test_a_store_path_that_names_a_folder_is_a_config_error(tmp_path: Path, cli: Run) -> None:
    """``store.path = "/var/lib/pigateway"`` (the folder, not the file in it) passed
    ``config check``; the service's start then failed with exit 1 ("Is a directory"),
    restarted every 5 s forever, and made a stray ``pigateway.lock`` beside the folder."""
    folder = tmp_path / "state"
    folder.mkdir()
    config = config_with(tmp_path, "store", "path", str(folder))
    for verb in (["config", "check"], ["send", "--device", "d", "--command", "set"],
                 ["queue", "stats"]):
        code, _, err = cli(*verb, "--config", str(config))
        assert code == 78 and "store.path" in err and "folder" in err, (verb, err[-600:])
    run = subprocess.run([sys.executable, "-m", "pigateway", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=environment(),
                         check=False)
    assert run.returncode == 78, run.stderr[-600:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("state")) == ["state"]


@pytest.mark.parametrize(("table", "key", "kind"), [
    ("mqtt", "password_file", "folder"), ("metrics", "textfile", "folder"),
    ("control", "socket", "folder"), ("control", "socket", "file")])
def test_a_path_of_the_wrong_kind_is_a_config_error(
        tmp_path: Path, cli: Run, table: str, key: str, kind: str) -> None:
    """A folder where a file belongs (the credential, the textfile) passed ``config check``
    and failed later, at each connect or each write; a control socket path holding a file
    or a folder failed every start with exit 1, restarted every 5 s forever."""
    there = tmp_path / "there"
    if kind == "folder":
        there.mkdir()
    else:
        there.write_text("not a socket\\n")
    config = config_with(tmp_path, table, key, str(there))
    code, _, err = cli("config", "check", "--config", str(config))
    assert code == 78 and f"{table}.{key}" in err, err[-600:]
    if table == "control":
        run = subprocess.run([sys.executable, "-m", "pigateway", "run", "--config",
                              str(config)], capture_output=True, text=True, timeout=60,
                             env=environment(), check=False)
        assert run.returncode == 78, run.stderr[-600:]
