"""``scripts/package`` on a machine without the build tools says what to run."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_on_a_fresh_system_says_to_run_setup_env(tmp_path: Path) -> None:
    """A PATH with none of the build tools: the state of a fresh bookworm. The script used
    to get as far as "dpkg-buildpackage: No such file"."""
    done = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "package")], cwd=tmp_path,
                          env={"PATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert "dpkg-buildpackage" in done.stderr and "run scripts/setup-env first" in done.stderr
    assert not list(tmp_path.iterdir()), "it stopped before making anything"


def test_package_builds_only_for_raspberry_pi_os_architectures(tmp_path: Path) -> None:
    """``--arch`` takes arm64 or armhf (Pi OS bookworm's two, built under QEMU) or this
    machine's own: anything else is refused before a chroot is made or a file written."""
    done = subprocess.run(["/bin/bash", str(ROOT / "scripts" / "package"), "--arch", "mips64el",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "only arm64 and armhf" in done.stderr
    assert not list(tmp_path.iterdir()), "it stopped before making anything"
