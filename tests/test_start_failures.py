"""Every reason the service cannot start is in the journal at err or crit, so the documented
``journalctl -u pigateway -p warning`` (and ``-p err``) shows it, with the exit code the unit
acts on: 78 (EX_CONFIG) for a config error, which ``RestartPreventExitStatus=`` keeps from
looping.

``pigateway run`` is the console script in a child process as systemd starts it: its stderr
is the file ``JOURNAL_STREAM`` names, and the journal's native socket is a real datagram
socket. Where a root-owned file is the point, the child runs as the unprivileged ``nobody``
(as the unit runs the service as ``pigateway``), in a folder that user may enter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import gateway
from harness.service import argv, environment
from harness.sockets import DatagramListener, short_dir
from test_logs import parse_native

EX_CONFIG = 78
#: A stream line: its ``<N>`` priority (sd-daemon(3)), if any, and the text.
PREFIX = re.compile(r"^(?:<([0-7])>)?(.*)$")
#: Seconds a start that must fail may take at most.
FAIL_WITHIN = 30


@dataclass(frozen=True)
class Outcome:
    code: int
    records: list[dict[str, str]]  # what reached the journal's native socket, in order
    stderr: str  # the stream: journald reads a leading <N> as the line's priority

    def at_or_above(self, priority: int) -> list[str]:
        """What journald files at ``priority`` or above, from either way in (a bare stream
        line counts at err: the unit's SyslogLevel=err)."""
        native = [r["MESSAGE"] for r in self.records if int(r["PRIORITY"]) <= priority]
        lines = [PREFIX.match(line) for line in self.stderr.splitlines()]
        stream = [m.group(2) for m in lines if m and int(m.group(1) or 3) <= priority]
        return native + stream

    @property
    def bare(self) -> list[str]:
        """Stream lines without a priority of their own."""
        return [line for line in self.stderr.splitlines() if not PREFIX.match(line)[1]]


@pytest.fixture
def place() -> Iterator[Path]:
    """A folder every user may enter (tmp_path is root's alone), removed afterwards."""
    folder = short_dir()
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def journal(place: Path) -> Iterator[DatagramListener]:
    listener = DatagramListener("journal.sock")
    listener.folder.chmod(0o755)  # the unprivileged child sends to it too
    listener.path.chmod(0o777)
    yield listener
    listener.close()


def as_user(user: str | None) -> list[str]:
    """The prefix that runs a command as ``user`` alone (no other group), as systemd's
    ``User=`` does; util-linux's setpriv, since subprocess's ``user=`` cannot exec the
    interpreter here."""
    if user is None:
        return []
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("running as another user needs root and setpriv (util-linux)")
    return ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"]


def start(config: Path, journal: DatagramListener, *, user: str | None = None) -> Outcome:
    """``pigateway run --config config`` under a journal; it must end by itself."""
    err = config.parent / "stderr"
    with err.open("wb") as out:
        st = os.fstat(out.fileno())
        env = environment({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                           "PIGATEWAY_JOURNAL_SOCKET": str(journal.path)})
        done = subprocess.run([*as_user(user), *argv(config, console_script=True)],
                              stdout=out, stderr=out, env=env, cwd=config.parent,
                              timeout=FAIL_WITHIN, check=False)
    records = [parse_native(d.data) for d in journal.messages()]
    return Outcome(done.returncode, records, err.read_text(errors="replace"))


def service_config(place: Path, **tables: dict[str, object]) -> dict[str, object]:
    """A service that needs nothing but its files (GPIO mocked, no broker listening)."""
    data = gateway.settings(place, gateway_id="gw-start", port=1,
                            gpio={"pin_factory": "mock"}, **tables)
    runtime = place / "run"
    runtime.mkdir(exist_ok=True)
    shutil.chown(runtime, "nobody")
    data["control"] = {"socket": str(runtime / "control.sock")}
    return data


def test_a_typo_in_the_config_is_critical_and_exits_78(place: Path,
                                                       journal: DatagramListener) -> None:
    config = gateway.write(place / "config.toml",
                           service_config(place, uplink={"batch_dealy": 0.5}))
    outcome = start(config, journal)
    assert outcome.code == EX_CONFIG, outcome.stderr
    (said,) = outcome.at_or_above(2)
    assert "uplink.batch_dealy" in said and "unknown key" in said
    assert "systemctl restart pigateway" in said, "it says what to run once fixed"
    assert "pigateway config check" in said
    assert outcome.bare == [], "every line on the stream carries its priority"
    assert not outcome.at_or_above(3)[1:], "said once"


def test_a_missing_config_is_critical_and_exits_78(place: Path,
                                                   journal: DatagramListener) -> None:
    outcome = start(place / "absent.toml", journal)
    assert outcome.code == EX_CONFIG, outcome.stderr
    (said,) = outcome.at_or_above(2)
    assert "absent.toml" in said and "does not exist" in said


def test_a_config_the_service_user_cannot_read_is_critical_and_exits_78(
    place: Path, journal: DatagramListener
) -> None:
    config = gateway.write(place / "config.toml", service_config(place))
    config.chmod(0o600)  # root's alone, as `sudo install -m 600` leaves it
    outcome = start(config, journal, user="nobody")
    assert outcome.code == EX_CONFIG, outcome.stderr
    (said,) = outcome.at_or_above(2)
    assert "Permission denied" in said and str(config) in said


def test_a_root_owned_queue_is_critical_and_says_how_to_fix_it(
    place: Path, journal: DatagramListener
) -> None:
    data = service_config(place)
    config = gateway.write(place / "config.toml", data)
    queue = place / "queue.db"
    queue.write_bytes(b"")  # root's, as a `sudo pigateway send` would leave it
    outcome = start(config, journal, user="nobody")
    assert outcome.code == 1, outcome.stderr
    said = outcome.at_or_above(3)
    assert said, [r["MESSAGE"] for r in outcome.records]
    assert any("Permission denied" in text and "chown" in text for text in said), said


def test_a_failure_before_logging_is_set_up_still_reaches_the_journal_at_crit(
    place: Path, journal: DatagramListener
) -> None:
    """Even a config whose [log] cannot be read: the report comes before the config."""
    config = place / "config.toml"
    config.write_text('gateway_id = "gw-start"\n[log]\nlevel = "loud"\n')
    outcome = start(config, journal)
    assert outcome.code == EX_CONFIG
    (said,) = outcome.at_or_above(2)
    assert "log.level" in said
