"""The remote overlay's start rules, on real files: a pending overlay is tried once, and
one the checks refuse, or one a start already tried, is rolled back at the start, so the
service starts on its base config instead of exiting 78 (a config error, never restarted)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import gateway as harness_gateway
from pigateway.manage import remoteconfig


def base(tmp_path: Path, **manage: object) -> tuple[Path, Path]:
    overlay = tmp_path / "state" / "remote.toml"
    path = harness_gateway.write(tmp_path / "config.toml", harness_gateway.settings(
        tmp_path, port=1883, manage={"enabled": True, "overlay": str(overlay), **manage},
        gpio={"pin_factory": "mock"}))
    return path, overlay


def test_a_pending_overlay_is_tried_once_then_rolled_back(tmp_path: Path) -> None:
    path, overlay = base(tmp_path)
    remoteconfig.stage(overlay, "cs-1", "[uplink]\nbatch_delay = 0.5\n")
    config, trial = remoteconfig.service_config(path)
    assert trial is not None and trial.id == "cs-1"
    assert config.uplink.batch_delay == 0.5
    # the trial died before it was online: the next start rolls it back
    config, trial = remoteconfig.service_config(path)
    assert trial is None and config.uplink.batch_delay != 0.5
    outcome = remoteconfig.outcome(overlay)
    assert outcome is not None and outcome["id"] == "cs-1" and not outcome["applied"]
    assert not remoteconfig.pending_path(overlay).exists() and not overlay.exists()


def test_a_refused_pending_overlay_is_rolled_back_naming_the_key(tmp_path: Path) -> None:
    path, overlay = base(tmp_path)
    remoteconfig.stage(overlay, "cs-2", "[mqtt]\nport = 0\n")
    config, trial = remoteconfig.service_config(path)
    assert trial is None and config.mqtt.port == 1883
    outcome = remoteconfig.outcome(overlay)
    assert outcome is not None and "mqtt.port" in outcome["reason"]


def test_a_committed_overlay_overrides_the_file_and_only_while_enabled(tmp_path: Path) -> None:
    path, overlay = base(tmp_path)
    remoteconfig.stage(overlay, "cs-3", "[mqtt]\nport = 1884\n")
    config, trial = remoteconfig.service_config(path)
    assert trial is not None
    trial.commit()
    assert remoteconfig.outcome(overlay) == {"id": "cs-3", "applied": True}
    config, trial = remoteconfig.service_config(path)
    assert trial is None and config.mqtt.port == 1884
    path, _ = base(tmp_path, enabled=False)  # Ansible turns it off: the file alone rules
    config, _ = remoteconfig.service_config(path)
    assert config.mqtt.port == 1883


def test_the_service_starts_on_its_base_config_when_the_overlay_is_refused(
        tmp_path: Path) -> None:
    """Not exit 78: `pigateway config check` of the base passes, and the run gets past the
    config (it is stopped by the test at once after it said it runs)."""
    path, overlay = base(tmp_path)
    remoteconfig.stage(overlay, "cs-4", "[mqtt]\nport = 0\n")
    process = subprocess.Popen([sys.executable, "-m", "pigateway", "run", "--config",
                                str(path)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        out = b""
        assert process.stdout is not None
        for line in process.stdout:
            out += line
            if b"open and recovered" in line or len(out) > 100_000:
                break
        assert b"open and recovered" in out, out.decode(errors="replace")
        assert b"config-set cs-4 rolled back" in out
    finally:
        process.terminate()
        process.wait(20)
    assert process.returncode == 0
    assert json.loads((overlay.parent / "remote.outcome.json").read_text())["applied"] is False


class _Cut(BaseException):
    """A stop (kill -9, a power cut) at one step of a commit."""


@pytest.mark.parametrize("cut_at", range(5))
def test_a_commit_cut_short_at_any_step_answers_what_the_gateway_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int) -> None:
    """Whatever step of a commit a stop cuts, the next start's outcome (the command's one
    result) agrees with the config that start runs: never "rolled back" while the overlay
    is in force, never "applied" while it is not."""
    path, overlay = base(tmp_path)
    remoteconfig.stage(overlay, "cs-cut", "[mqtt]\nport = 1884\n")
    _, trial = remoteconfig.service_config(path)
    assert trial is not None
    real_sync, calls = remoteconfig._sync_folder, [0]

    def cut(folder: Path) -> None:
        if calls[0] == cut_at:
            raise _Cut  # the steps before this sync are on disk, nothing after them
        calls[0] += 1
        real_sync(folder)

    monkeypatch.setattr(remoteconfig, "_sync_folder", cut)
    with contextlib.suppress(_Cut):
        trial.commit()
    monkeypatch.setattr(remoteconfig, "_sync_folder", real_sync)
    config, again = remoteconfig.service_config(path)
    outcome = remoteconfig.outcome(overlay)
    assert again is None
    assert outcome is not None and outcome["id"] == "cs-cut"
    assert outcome["applied"] == (config.mqtt.port == 1884), outcome
    assert remoteconfig.pending_id(overlay) is None
