"""Every command the runbooks (docs/operations.md) tell an operator to type works verbatim.

The fenced ``sh``/``console`` blocks are read as an operator reads them (``$ `` marks a
command in a console block; a line ending ``\\`` goes on), and each command is one of two:

- it runs outside systemd: it is run, each block in one ``bash`` (a ``cd`` carries on), with
  ``pipefail``, against a real ``pigateway run`` on a real mosquitto and a real queue file
  (commands queued, dead letters, a quarantined copy that is really corrupt), and must exit
  0. Only the places move: ``/var/lib/pigateway`` and ``/root`` into the test's folder, the
  package's ``/opt/pigateway/venv`` to this venv, ``sudo``/``sudo -u pigateway`` dropped
  (the test is its own user), the config given by ``$PIGATEWAY_CONFIG``.
- it needs systemd, the journal, root on a real gateway, a package build or the network
  (:data:`SYSTEM`, by its first word): ``bash -n`` checks its syntax, and the options of a
  ``journalctl`` or ``systemctl`` must be ones the installed tool's ``--help`` lists.

A new command in the runbooks is one or the other, or this test names it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.broker import Mosquitto
from harness.gateway import settings, write
from harness.ingest_helpers import as_us
from harness.service import Service
from harness.waits import wait_until
from pigateway import config as configuration
from pigateway.store import NewCommand, Store

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "docs" / "operations.md"

#: First words of commands that need a real gateway's systemd, journal, root, apt, a package
#: build or Ansible's targets: checked for syntax only.
SYSTEM = frozenset({"journalctl", "systemctl", "apt", "apt-get", "sudoedit", "dpkg",
                    "ansible-playbook", "ansible-vault", "scripts/package", "debootstrap",
                    "chroot", "mosquitto_pub", "mosquitto_sub",
                    # a restore's steps, after the service's stop (here it keeps running)
                    "rm", "install"})
#: First words of commands run here, against a real service and queue file.
RUNS = frozenset({"pigateway", "sqlite3", "cd", "ls", "df", "/opt/pigateway/venv/bin/python"})
#: The quarantined file the runbook names.
QUARANTINED = "queue.db.corrupt-20260101T120000"


def blocks() -> list[tuple[int, list[str]]]:
    """Each fenced sh/console block of the runbook: (its first line, its commands)."""
    found: list[tuple[int, list[str]]] = []
    lines = RUNBOOK.read_text().splitlines()
    number = 0
    while number < len(lines):
        fence = re.match(r"^```(sh|console)\s*$", lines[number])
        number += 1
        if not fence:
            continue
        start, commands, pending = number, [], ""
        while not lines[number].startswith("```"):
            line = lines[number]
            number += 1
            if fence.group(1) == "console":
                if not line.startswith("$ ") and not pending:
                    continue  # what the command printed
                line = line.removeprefix("$ ")
            if pending or (line.strip() and not line.lstrip().startswith("#")):
                pending += line
                if pending.endswith("\\"):
                    pending = pending[:-1]
                    continue
                commands.append(pending.strip())
                pending = ""
        found.append((start, commands))
    return found


def first_word(command: str) -> str:
    words = shlex.split(command, comments=True)
    while words and words[0] in ("sudo",):
        words = words[3:] if words[1:2] == ["-u"] else words[1:]
    return words[0] if words else ""


def pipeline(command: str) -> list[list[str]]:
    """The words of each command of a pipeline (quotes kept whole, as bash reads them)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in ("|", "||", "&&", ";", ">", "<"):
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def every_command() -> list[tuple[int, str]]:
    return [(start, command) for start, commands in blocks() for command in commands]


def test_every_runbook_command_is_run_or_known_to_need_a_real_gateway() -> None:
    unknown = [(line, command) for line, command in every_command()
               if first_word(command) not in SYSTEM | RUNS]
    assert unknown == [], "classify these in tests/test_runbooks.py (SYSTEM or RUNS)"
    assert len(every_command()) > 20  # the reader found the blocks


@pytest.mark.parametrize(("line", "command"),
                         [c for c in every_command() if first_word(c[1]) in SYSTEM],
                         ids=lambda value: str(value)[:50])
def test_a_command_that_needs_a_real_gateway_is_well_formed(line: int, command: str) -> None:
    done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True,
                          timeout=10, check=False)
    assert done.returncode == 0, f"operations.md:{line}: {done.stderr}"
    for part in pipeline(command):
        words = part[1:] if part[:1] == ["sudo"] else part
        if not words or words[0] not in ("journalctl", "systemctl"):
            continue
        if shutil.which(words[0]) is None:
            pytest.skip(f"{words[0]} is not installed")
        known = subprocess.run([words[0], "--help"], capture_output=True, text=True,
                               timeout=10, check=False).stdout
        for option in (w.split("=")[0] for w in words[1:] if re.match(r"^--?[a-zA-Z]", w)):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s=\[,]|$)", known, re.M), (
                f"operations.md:{line}: {words[0]} has no option {option}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running service on a real mosquitto; its queue with commands and dead letters
    (paused, so they stay); a really corrupt quarantined copy beside it. The environment
    the runbook's commands run in."""
    top = tmp_path_factory.mktemp("runbook")
    lib = top / "var" / "lib" / "pigateway"
    (top / "root").mkdir()
    lib.mkdir(parents=True)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"pgw-rb-{os.getpid()}"
    folder.mkdir(exist_ok=True)  # a short path for the control socket
    with Mosquitto(top / "broker", extra=as_us()) as broker:
        data = settings(folder, port=broker.port)
        data["store"]["path"] = str(lib / "queue.db")
        data["gpio"] = {"enabled": False}
        config = write(top / "config.toml", data)
        asyncio.run(_fill(config, lib))
        env = {**os.environ, "PIGATEWAY_CONFIG": str(config),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LESS": "",
               "TOP": str(top)}
        with Service(config, top / "service.log"):
            subprocess.run(["pigateway", "pause"], env=env, check=False, capture_output=True)
            ready = asyncio.run(wait_until(lambda: subprocess.run(
                ["pigateway", "pause"], env=env, capture_output=True,
                check=False).returncode == 0, 20))
            assert ready, (top / "service.log").read_text()
            yield env
    shutil.rmtree(folder, ignore_errors=True)


async def _fill(config: Path, lib: Path) -> None:
    """Commands and dead letters in the queue; a corrupt copy of a bigger one, quarantined."""
    store_config = configuration.load(config).store
    async with await Store.open(store_config) as store:
        commands = await store.put_many([NewCommand(f"pump{i}", "start", {"speed": i})
                                         for i in range(5)])
        await store.dead_letter([commands[0].id], "max-attempts", "set up by the test")
    big = configuration.StoreConfig(**{**store_config.__dict__,
                                       "path": lib / "big.db"})
    async with await Store.open(big) as store:
        await store.put_many([NewCommand(f"valve{i % 7}", "open", {"i": i, "pad": "x" * 200})
                              for i in range(2000)])
    damaged = (lib / "big.db").read_bytes()
    page = 4096
    middle = len(damaged) // page // 2 * page
    damaged = damaged[:middle] + b"\xde\xad\xbe\xef" * (page // 4) + damaged[middle + page:]
    (lib / QUARANTINED).write_bytes(damaged)
    for name in ("big.db", "big.db-wal", "big.db-shm"):
        (lib / name).unlink(missing_ok=True)


def localized(command: str, top: str) -> str:
    """The command as it runs here: the gateway's places moved into the test's folder."""
    command = re.sub(r"\bsudo -u pigateway ", "", command)
    command = re.sub(r"\bsudo ", "", command)
    command = command.replace("/opt/pigateway/venv/bin/python", sys.executable)
    command = command.replace("/var/lib/pigateway", f"{top}/var/lib/pigateway")
    return command.replace("/root/", f"{top}/root/")


#: Each block's commands that run here; a block whose only such command is a ``cd`` (into
#: a clone, for the Ansible commands after it) has none.
RUNNABLE = [(start, runs) for start, commands in blocks()
            if (runs := [c for c in commands if first_word(c) in RUNS])
            and any(first_word(c) != "cd" for c in runs)]


@pytest.mark.broker
@pytest.mark.parametrize(("line", "commands"), [b for b in RUNNABLE if b[1]],
                         ids=lambda value: str(value)[:60])
def test_a_runbook_command_works_verbatim(gateway: dict[str, str], line: int,
                                          commands: list[str]) -> None:
    script = ["set -o pipefail"]
    for command in commands:
        script.append(f"{localized(command, gateway['TOP'])} || "
                      f"{{ echo \"exit $? from: \"{shlex.quote(command)} >&2; exit 1; }}")
    done = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True,
                          timeout=60, env=gateway, cwd=gateway["TOP"], check=False)
    assert done.returncode == 0, f"operations.md:{line}: {done.stderr}\n{done.stdout}"


@pytest.mark.broker
def test_the_recovery_runbook_gets_the_commands_back_from_a_corrupt_file(
        gateway: dict[str, str]) -> None:
    [(_, commands)] = [b for b in RUNNABLE if any(QUARANTINED in c for c in b[1])]
    recovered = Path(gateway["TOP"]) / "root" / "recovered.db"
    recovered.unlink(missing_ok=True)
    script = "set -o pipefail\n" + "\n".join(localized(c, gateway["TOP"]) for c in commands)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env=gateway, cwd=gateway["TOP"], check=False)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert 1000 < len(rows) < 2000, "a damaged page loses some rows, never all"
    assert all("|valve" in row and "|open|" in row for row in rows)


#: journald's priorities, most severe first (``journalctl -p X`` shows X and those before it).
PRIORITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def sections() -> list[tuple[str, str, list[str]]]:
    """Each ``##`` section of the runbook: (its title, its prose, its commands)."""
    text = RUNBOOK.read_text()
    found = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0]
        prose = re.sub(r"^```.*?^```", "", part, flags=re.M | re.S)
        found.append((title, prose, [c for _, block in blocks() for c in block if c in part]))
    return found


def test_a_runbook_filters_the_journal_wide_enough_for_the_records_it_says_to_look_for() -> None:
    """A section that says its records are logged "at warning" must not filter them away
    with ``journalctl -p err``: the operator following it verbatim would see nothing."""
    checked = 0
    for title, prose, commands in sections():
        said = [PRIORITIES.index(p.lower()) for p in
                re.findall(r"\bat (emerg|alert|crit|err|warning|notice|info)\b", prose, re.I)]
        for command in commands:
            shown = re.search(r"journalctl .*-p (\w+)", command)
            if shown and said:
                checked += 1
                assert PRIORITIES.index(shown.group(1)) >= max(said), (title, command)
    assert checked
