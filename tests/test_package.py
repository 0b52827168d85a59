"""The Debian package (``scripts/package``, ``packaging/debian/``): built once per session into
a temporary folder, then checked with Debian's own tools: lintian (no error, no warning beyond
the overrides, each of which gives its reason), dpkg-deb (what is in it and where), systemd's
verify on the unit with the package's drop-in, and shellcheck on the maintainer scripts.

Installing it on a booted Debian (READY, a reboot with a queue, remove and purge) is
``scripts/e2e``'s part. The build tools come from Debian (``scripts/setup-env`` installs
debhelper, dh-virtualenv and lintian); the build fetches the pinned dependencies from the
package index.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pigateway.config import parse

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "packaging" / "debian"
VENV = "opt/pigateway/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-buildpackage") is None or shutil.which("dh_virtualenv") is None,
    reason="not a Debian machine with dpkg-dev and dh-virtualenv (scripts/setup-env installs them)",
)


@dataclass(frozen=True)
class Built:
    deb: Path
    files: dict[str, str]  # path in the package (no leading ./) -> the dpkg-deb -c line
    tree: Path  # the package's files, extracted
    control: Path  # its control files, extracted


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    out = tmp_path_factory.mktemp("package")
    done = subprocess.run([str(ROOT / "scripts" / "package"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    deb = Path(done.stdout.strip().splitlines()[-1])
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    files = {}
    for line in listing.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        files[name.removeprefix("./").rstrip("/")] = line
    tree, control = out / "tree", out / "control"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], timeout=60, check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], timeout=60, check=True)
    yield Built(deb, files, tree, control)


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


# --------------------------------------------------------------------------- the file


def test_named_for_version_and_architecture(built: Built) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
    assert built.deb.name == f"pigateway_{version}-1_{arch}.deb"
    assert _field(built.deb, "Version") == f"{version}-1"
    assert _field(built.deb, "Architecture") == arch
    depends = _field(built.deb, "Depends")
    assert "python3.11" in depends and "adduser" in depends


def test_lintian_finds_no_error_and_no_unexplained_warning(built: Built) -> None:
    done = subprocess.run(["lintian", "--fail-on", "error,warning", str(built.deb)],
                          capture_output=True, text=True, timeout=600, check=False)
    problems = [line for line in done.stdout.splitlines() if line[:2] in {"E:", "W:"}]
    assert problems == [] and done.returncode == 0, done.stdout + done.stderr


def test_every_lintian_override_gives_its_reason() -> None:
    lines = (DEBIAN / "pigateway.lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("pigateway:"):
            assert i > 0 and lines[i - 1].startswith("#"), f"no reason above: {line}"


# --------------------------------------------------------------------------- what is in it


def test_the_venv_the_unit_and_the_command(built: Built) -> None:
    files = built.files
    assert f"{VENV}/bin/pigateway" in files
    assert f"{SITE}/pigateway/store/__init__.py" in files
    assert "usr/bin/pigateway" in files
    assert files["usr/bin/pigateway"].split(" -> ")[1] == f"/{VENV}/bin/pigateway"
    assert os.readlink(built.tree / VENV / "bin" / "python3.11") == "/usr/bin/python3.11"
    unit = built.tree / "lib/systemd/system/pigateway.service"
    assert unit.read_bytes() == (ROOT / "systemd" / "pigateway.service").read_bytes()
    assert "usr/share/man/man1/pigateway.1.gz" in files


def test_no_byte_code_and_no_pip_in_the_package(built: Built) -> None:
    assert not [f for f in built.files if f.endswith(".pyc") or "__pycache__" in f]
    assert not [f for f in built.files if f.startswith((f"{SITE}/pip/", f"{VENV}/bin/pip"))]
    assert "compileall" in (built.control / "postinst").read_text()


def test_the_venv_holds_exactly_the_pinned_dependencies(built: Built) -> None:
    """pyproject.toml gives ranges; the package installs the one pinned set, nothing more."""
    pins = {}
    text = (DEBIAN / "requirements.txt").read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        line, *hashes = line.split(" --hash=")
        assert hashes, f"no hash: {line}"
        requirement, _, marker = line.partition(";")
        if "platform_machine" in marker and os.uname().machine not in marker:
            continue
        name, _, version = requirement.strip().partition("==")
        assert version, f"not pinned: {line}"
        pins[_normal(name)] = version
    installed = {}
    for path in built.files:
        match = re.fullmatch(rf"{re.escape(SITE)}/([^/]+)-([^-/]+)\.(dist|egg)-info", path)
        if match:
            installed[_normal(match.group(1))] = match.group(2)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert installed == {**pins, "pigateway": version}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_config_is_a_conffile_with_a_commented_example(built: Built) -> None:
    conffiles = (built.control / "conffiles").read_text().split()
    assert sorted(conffiles) == ["/etc/mosquitto/conf.d/pigateway-ingest.conf",
                                 "/etc/pigateway/config.toml"]
    text = (built.tree / "etc/pigateway/config.toml").read_text()
    assert re.search(r"^#gateway_id = ", text, re.M), "gateway_id is commented out"
    assert not re.search(r"^\s*gateway_id\s*=", text, re.M)


def test_the_example_config_is_valid_once_uncommented() -> None:
    """Every commented example line, uncommented, is a config pigateway accepts: the example
    cannot drift from the code's keys."""
    lines = []
    for line in (DEBIAN / "extra" / "config.toml").read_text().splitlines():
        candidate = line[1:] if line.startswith("#") else line
        lines.append(candidate if re.match(r"^(\[[\w.]+\]|\w+ = )", candidate) else "")
    config = parse("\n".join(lines))
    assert config.gateway_id == "gw-north-01"
    assert config.devices["pump"].handler == "gpio"


# ------------------------------------------------------------------- start only with a gateway_id


@pytest.mark.parametrize(("text", "code"), [
    ('gateway_id = "gw-1"\n', 0),
    ('  gateway_id="gw-1"\n[mqtt]\n', 0),
    ('#gateway_id = "gw-1"\n[mqtt]\nhost = "x"\n', 1),
    ("[mqtt]\ngateway_id_note = 1\n", 1),
    (None, 255),
])
def test_the_start_condition(tmp_path: Path, text: str | None, code: int) -> None:
    """ExecCondition: 0 starts, 1 skips quietly (no gateway_id yet), 255 fails (no file)."""
    config = tmp_path / "config.toml"
    if text is not None:
        config.write_text(text)
    done = subprocess.run([str(DEBIAN / "extra" / "has-gateway-id")],
                          env={**os.environ, "PIGATEWAY_CONFIG": str(config)},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == code, done.stderr
    # its priority for the journal (the unit reads bare stderr at err): a wait is a notice
    assert done.stderr[:3] == {0: "", 1: "<5>", 255: "<3>"}[code][:3], done.stderr


def test_systemd_verifies_the_unit_with_the_drop_in(built: Built, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None or not Path("/lib/systemd/system").is_dir():
        pytest.skip("systemd is not installed here")
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for part in ("lib/systemd/system", f"{VENV}/bin", "usr/libexec/pigateway"):
        shutil.copytree(built.tree / part, root / part, symlinks=True, dirs_exist_ok=True)
    done = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                           "/lib/systemd/system/pigateway.service"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr
    dropin = (built.tree / "lib/systemd/system/pigateway.service.d/gateway-id.conf").read_text()
    assert "ExecCondition=/usr/libexec/pigateway/has-gateway-id" in dropin
    assert (built.tree / "usr/libexec/pigateway/has-gateway-id").stat().st_mode & 0o111


# --------------------------------------------------------------------------- maintainer scripts


def test_maintainer_scripts(built: Built) -> None:
    postinst = (built.control / "postinst").read_text()
    postrm = "\n".join(line for line in (built.control / "postrm").read_text().splitlines()
                       if not line.lstrip().startswith("#"))
    assert "adduser --system" in postinst and "adduser --quiet pigateway gpio" in postinst
    assert "addgroup --system --quiet gpio" in postinst
    assert "deb-systemd-helper enable 'pigateway.service'" in postinst
    # the queue goes only on purge; nothing is asked (no debconf)
    purge = postrm.split('if [ "$1" = purge ]; then', 1)[1]
    assert "/var/lib/pigateway" in purge
    assert "/var/lib/pigateway" not in postrm.split('if [ "$1" = purge ]; then', 1)[0]
    assert "config" not in built.files and not (built.control / "templates").exists()


def test_maintainer_scripts_pass_shellcheck() -> None:
    """Ours, as written (debhelper's and dh-virtualenv's snippets are theirs)."""
    shellcheck = shutil.which("shellcheck") or str(ROOT / "build/e2e-venv/bin/shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("no shellcheck (scripts/e2e-venv installs it)")
    scripts = [str(DEBIAN / f"pigateway.{name}") for name in ("postinst", "prerm", "postrm")]
    done = subprocess.run(
        [shellcheck, "-s", "sh", *scripts,
         str(DEBIAN / "extra" / "has-gateway-id")],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:]
    done = subprocess.run([shellcheck, str(ROOT / "scripts" / "package")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:]


def test_the_local_mosquitto_gets_the_ingest_drop_in_as_a_conffile(built: Built) -> None:
    """Ingest's settings for the gateway's own mosquitto (docs/ingest.md): in conf.d, kept
    as the operator edits it (a conffile), the same file the Ansible role installs."""
    name = "etc/mosquitto/conf.d/pigateway-ingest.conf"
    assert name in built.files
    assert (built.tree / name).read_bytes() == (DEBIAN / "extra" / "pigateway-ingest.conf") \
        .read_bytes()
    assert f"/{name}" in (built.control / "conffiles").read_text().split()
