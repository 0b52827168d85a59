"""systemd/pigateway.service: systemd's own tools are the gate.

``systemd-analyze verify`` must be clean (in a throw-away root that holds the ExecStart
binary and systemd's units, since verify checks that ExecStart exists) and
``systemd-analyze security --offline=yes --threshold=20`` must pass (exposure at most 2.0).
Both also run against a broken unit to prove that they can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pigateway.cli import EXIT_CONFIG, EXIT_NOT_RESTARTED

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pigateway.service"
EXEC_START = "/opt/pigateway/venv/bin/pigateway"
HOST_UNITS = Path("/lib/systemd/system")

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (systemd allows a key many times)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A root tree for ``verify --root``: the ExecStart binary and systemd's units."""
    if not (HOST_UNITS / "sysinit.target").exists():
        pytest.skip("systemd's unit files are not installed here")
    binary = tmp_path / EXEC_START.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    shutil.copytree(HOST_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    yield tmp_path


def verify(root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    target = root / "etc/systemd/system/pigateway.service"
    target.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/pigateway.service"],
        capture_output=True, text=True, timeout=60, check=False,
    )


def security(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def exposure(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", output)
    assert match, output
    return float(match.group(1))


def test_verify_is_clean(root: Path) -> None:
    result = verify(root, UNIT.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_would_catch_a_broken_unit(root: Path) -> None:
    broken = UNIT.read_text().replace("Type=notify", "Type=notify\nWatchdogSecs=30s")
    result = verify(root, broken)
    assert "Unknown key 'WatchdogSecs'" in result.stderr


def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    result = security(UNIT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert exposure(result.stdout) <= 2.0
    assert "Invalid syntax" not in result.stderr
    assert "Unknown" not in result.stderr


def test_the_security_gate_fails_a_bare_unit(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nType=notify\nExecStart={EXEC_START} run\n")
    result = security(bare)
    assert result.returncode != 0
    assert exposure(result.stdout) > 2.0


def test_the_contract_of_the_unit() -> None:
    unit = directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": [f"{EXEC_START} run"],
        "Restart": ["on-failure"],
        "User": ["pigateway"],
        "SupplementaryGroups": ["gpio"],
        "StateDirectory": ["pigateway"],
        "RuntimeDirectory": ["pigateway"],
        "ConfigurationDirectory": ["pigateway"],
        "WorkingDirectory": ["/run/pigateway"],
        "DevicePolicy": ["closed"],
        "DeviceAllow": ["char-gpiochip rw"],
        "LoadCredential": ["mqtt-password:pigateway.mqtt-password",
                           "mqtt-key:pigateway.mqtt-key",
                           "local-password:pigateway.local-password"],
    }
    for key, values in expected.items():
        assert unit.get(key) == values, key
    for key in ("WatchdogSec", "TimeoutStopSec"):
        assert key in unit, key


def test_a_config_error_is_not_restarted_and_no_restart_is_ever_refused() -> None:
    """The service's config-error exit (78) and its exit on a queue a newer package
    migrated (65) are the ones the unit does not restart on (so neither loops), and there
    is no start limit: an operator's ``systemctl restart``
    after a fix is never refused, and never leaves the old process running."""
    unit = directives(UNIT.read_text())
    assert unit["RestartPreventExitStatus"] == [" ".join(map(str, EXIT_NOT_RESTARTED))]
    assert EXIT_CONFIG in EXIT_NOT_RESTARTED
    assert unit["StartLimitIntervalSec"] == ["0"]
    assert "StartLimitBurst" not in unit, "no limit: a burst would mean nothing"
    assert unit["RestartSec"] == ["5s"], "a crash loop is paced, not a busy loop"


def test_what_reaches_the_stream_unprefixed_is_an_error() -> None:
    """Our records carry their priority (native journal, or ``<N>`` prefixes); anything
    else on stdout/stderr (a traceback before logging exists, a crash of the interpreter)
    is trouble, and must show under ``journalctl -p err``."""
    unit = directives(UNIT.read_text())
    assert unit["SyslogLevel"] == ["err"]
    assert unit.get("SyslogLevelPrefix", ["yes"]) == ["yes"]


#: Descriptors the service holds besides its listeners' connections (store files and
#: connections, MQTT, the journal, gpiozero's, the listening sockets): a few dozen, doubled.
OWN_DESCRIPTORS = 128


def test_the_descriptor_limit_holds_every_listener_at_its_cap() -> None:
    """LimitNOFILE= is a number (soft = hard), and every listener full still leaves the
    service its own descriptors (a flood is refused at the cap, never at EMFILE)."""
    from pigateway.listeners import control, metrics  # noqa: PLC0415 - what the unit must hold

    (limit,) = directives(UNIT.read_text())["LimitNOFILE"]
    assert limit.isdigit(), f"LimitNOFILE={limit}: one number, not infinity or soft:hard"
    caps = metrics.BOUNDS.connections + control.BOUNDS.connections
    assert caps + OWN_DESCRIPTORS <= int(limit) <= 65536


def test_gpio_stays_reachable() -> None:
    """PrivateDevices= would hide /dev/gpiochip*; ProcSubset=pid hides /proc/device-tree."""
    unit = directives(UNIT.read_text())
    assert "PrivateDevices" not in unit
    assert "ProcSubset" not in unit
    assert "PrivateUsers" not in unit, "it would unmap the gpio group"


def test_config_check_checks_files_as_the_units_user() -> None:
    """``pigateway config check`` checks every file as the unit's ``User=`` would meet it."""
    from pigateway.cli.access import SERVICE_USER  # noqa: PLC0415

    assert directives(UNIT.read_text())["User"] == [SERVICE_USER]
