"""The Ansible role: its interface (argument specs == defaults), its lint gates, and the config
it renders, which must be one that pigateway itself accepts.

The lint and render tests need ansible-core, ansible-lint and yamllint, which live in their own
venv (``scripts/e2e-venv`` builds it into ``build/e2e-venv``), never in ``.venv``. They skip,
saying why, only when that venv cannot be built (no network for pip, say).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pigateway.config import Config, parse

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
ROLE = ANSIBLE / "roles" / "pigateway"
EXAMPLE_INVENTORY = ANSIBLE / "inventory" / "example" / "hosts.yml"


@pytest.fixture(scope="session")
def e2e_venv() -> Path:
    """The venv with the Ansible tools, built on first use by ``scripts/e2e-venv``."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "e2e-venv")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"scripts/e2e-venv could not build the Ansible venv: {done.stderr[-600:]}")
    return ROOT / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def yaml_of(e2e_venv: Path) -> Callable[[Path], Any]:
    """Parse YAML with the Ansible venv's PyYAML (the service's own venv does not need it)."""
    def load(path: Path) -> Any:
        done = subprocess.run(
            [str(e2e_venv / "bin" / "python"), "-c", _YAML_TO_JSON, str(path)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return json.loads(done.stdout)
    return load


_YAML_TO_JSON = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"


def _run(venv: Path, *argv: str, cwd: Path = ANSIBLE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "NO_COLOR": "1", "ANSIBLE_DEPRECATION_WARNINGS": "0"}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


# --------------------------------------------------------------------------- the interface


def test_argument_specs_equal_defaults(yaml_of: Callable[[Path], Any]) -> None:
    """Every default is declared, with the same default, and nothing else is declared."""
    defaults = yaml_of(ROLE / "defaults" / "main.yml")
    options = yaml_of(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    assert list(options) == list(defaults), "same variables, in the same order"
    for name, spec in options.items():
        assert spec["default"] == defaults[name], name
        assert spec.get("description"), f"{name} has no description"


def test_every_variable_is_prefixed(yaml_of: Callable[[Path], Any]) -> None:
    defaults = yaml_of(ROLE / "defaults" / "main.yml")
    internal = yaml_of(ROLE / "vars" / "main.yml")
    assert all(name.startswith("pigateway_") for name in defaults)
    assert all(name.startswith("__pigateway_") for name in internal)


def test_declared_types_match_the_defaults(yaml_of: Callable[[Path], Any]) -> None:
    """A spec that says int for a string default would reject the role's own default."""
    python_type = {"str": str, "int": int, "bool": bool, "dict": dict, "list": list}
    options = yaml_of(ROLE / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
    for name, spec in options.items():
        assert isinstance(spec["default"], python_type[spec["type"]]), name
        if "choices" in spec:
            assert spec["default"] in spec["choices"], name


def test_main_only_calls_preflight_install_configure(yaml_of: Callable[[Path], Any]) -> None:
    tasks = yaml_of(ROLE / "tasks" / "main.yml")
    called = [task["ansible.builtin.import_tasks"] for task in tasks]
    assert called == ["preflight.yml", "install.yml", "configure.yml"]
    assert all(set(task) == {"name", "ansible.builtin.import_tasks"} for task in tasks)


def test_every_change_restarts_through_the_handler(yaml_of: Callable[[Path], Any]) -> None:
    """The wheel, the venv, the unit, the config and the secrets all notify the one handler,
    and the handlers are flushed before the first start."""
    install = yaml_of(ROLE / "tasks" / "install.yml")
    configure = yaml_of(ROLE / "tasks" / "configure.yml")
    handlers = yaml_of(ROLE / "handlers" / "main.yml")
    assert [h["name"] for h in handlers] == ["Restart pigateway", "Restart mosquitto"]
    mosquitto = [t["name"] for t in install + configure if t.get("notify") == "Restart mosquitto"]
    assert mosquitto == ["Set up the local mosquitto for ingest"]
    notifying = {t["name"] for t in install + configure if t.get("notify") == "Restart pigateway"}
    for needle in ("wheel", "Debian package", "unit", "config", "secrets", "dependencies"):
        assert any(needle in name for name in notifying), needle
    names = [t["name"] for t in configure]
    flush = next(
        i for i, t in enumerate(configure) if t.get("ansible.builtin.meta") == "flush_handlers"
    )
    assert flush < names.index("Enable and start pigateway")


def test_install_methods(yaml_of: Callable[[Path], Any]) -> None:
    """deb by default; every task that installs one way runs only for that way, and switching
    removes the other way's install first."""
    defaults = yaml_of(ROLE / "defaults" / "main.yml")
    assert defaults["pigateway_install_method"] == "deb"
    install = {t["name"]: t for t in yaml_of(ROLE / "tasks" / "install.yml")}

    def only(method: str, name: str) -> None:
        when = install[name].get("when", "")
        text = " ".join(when) if isinstance(when, list) else when
        assert f'pigateway_install_method == "{method}"' in text, name

    for name in ("Install python3-venv", "Copy the wheel", "Install the unit file as it is",
                 "Install pigateway and its dependencies into the venv",
                 "Put the pigateway command on the PATH",
                 "Remove the Debian package before a wheel install"):
        only("wheel", name)
    for name in ("Copy the Debian package", "Remove a wheel install",
                 "Stop and disable a wheel install before the package replaces it",
                 "Install the Debian package (pigateway, its venv and its dependencies)"):
        only("deb", name)
    names = list(install)
    assert names.index("Remove a wheel install") < names.index("Copy the Debian package")
    assert names.index("Remove the Debian package before a wheel install") < names.index(
        "Install pigateway and its dependencies into the venv")
    apt = install["Install the Debian package (pigateway, its venv and its dependencies)"]
    argv = apt["ansible.builtin.command"]["argv"]
    assert "Dpkg::Options::=--force-confold" in argv, "the role's config stays the config"


def test_site_rolls_out_in_batches(yaml_of: Callable[[Path], Any]) -> None:
    (play,) = yaml_of(ANSIBLE / "site.yml")
    assert "pigateway_serial" in play["serial"]
    assert "pigateway_max_fail_percentage" in play["max_fail_percentage"]


def test_the_unit_loads_the_credentials_the_role_installs(yaml_of: Callable[[Path], Any]) -> None:
    """The role reads LoadCredential= from the unit; both must name the same credentials."""
    unit = ROOT / "systemd" / "pigateway.service"
    if not unit.exists():
        pytest.fail("systemd/pigateway.service is missing: the role installs it as it is")
    lines = [line for line in unit.read_text().splitlines() if line.startswith("LoadCredential")]
    loaded = {line.split("=", 1)[1].split(":", 1)[0] for line in lines}
    wanted = {item["id"] for item in yaml_of(ROLE / "vars" / "main.yml")["__pigateway_credentials"]}
    assert wanted <= loaded


# --------------------------------------------------------------------------- lint gates


def test_yamllint(e2e_venv: Path) -> None:
    done = _run(e2e_venv, "yamllint", "--strict", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_lint_production_profile(e2e_venv: Path) -> None:
    done = _run(e2e_venv, "ansible-lint", "--profile", "production", "--offline")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_playbook_syntax(e2e_venv: Path) -> None:
    done = _run(e2e_venv, "ansible-playbook", "--syntax-check", "-i", str(EXAMPLE_INVENTORY),
                "site.yml")
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- the rendered config


def _render(venv: Path, tmp_path: Path, inventory: Path, defaults: dict[str, Any],
            extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the role's template for every gateway of ``inventory``, the way the role does:
    the role's defaults under the inventory's group and host variables."""
    lowest = tmp_path / "defaults-inventory.yml"
    lowest.write_text(json.dumps({"all": {"vars": defaults}}))
    playbook = tmp_path / "render.yml"
    out = tmp_path / "out"
    playbook.write_text(json.dumps([{
        "name": "Render", "hosts": "gateways", "gather_facts": False,
        "tasks": [{"name": "Render the config", "ansible.builtin.template": {
            "src": str(ROLE / "templates" / "config.toml.j2"),
            "dest": f"{out}/{{{{ inventory_hostname }}}}.toml", "mode": "0600"}}],
    }]))
    out.mkdir()
    argv = ["ansible-playbook", "-i", str(lowest), "-i", str(inventory), str(playbook),
            "-e", "ansible_connection=local", "-e", f"playbook_dir={ANSIBLE}"]
    if extra:
        argv += ["-e", json.dumps(extra)]
    done = _run(venv, *argv)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {path.stem: path.read_text() for path in out.glob("*.toml")}


def test_example_fleet_renders_configs_pigateway_accepts(
    e2e_venv: Path, yaml_of: Callable[[Path], Any], tmp_path: Path
) -> None:
    defaults = yaml_of(ROLE / "defaults" / "main.yml")
    rendered = _render(e2e_venv, tmp_path, EXAMPLE_INVENTORY, defaults)
    assert set(rendered) == {"gw-north-01", "gw-north-02", "gw-south-01"}
    configs: dict[str, Config] = {host: parse(text) for host, text in rendered.items()}
    north, south = configs["gw-north-01"], configs["gw-south-01"]
    assert north.gateway_id == "gw-north-01"
    assert north.mqtt.host == "mqtt.example.net" and north.mqtt.tls.enabled
    assert north.mqtt.username == "gw-north-01"
    assert north.store.overflow == "drop-oldest" and north.store.max_commands == 200_000
    assert north.gpio.green_led == 22 and north.devices["pump"].options == {"pin": 24}
    assert north.uplink.batch_delay == 0.2
    assert south.uplink.batch_delay == 1.0 and south.uplink.max_inflight == 2
    assert [(r.topic, r.mode) for r in south.ingest] == [("zigbee2mqtt/+", "forward")]
    assert south.local.port == 1883 and north.ingest == []
    assert "Ansible managed" in rendered["gw-north-01"]


def test_awkward_values_survive_rendering(
    e2e_venv: Path, yaml_of: Callable[[Path], Any], tmp_path: Path
) -> None:
    """Quotes, backslashes, non-ASCII, floats, lists and nested options come out as the same
    values, so the template never changes what the operator wrote."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"children": {"gateways": {"hosts": {"gw-x": {}}}}}}))
    devices = {"sign": {"handler": "log", "text": 'say "hi" \\ ünï', "levels": [1, 2.5, True],
                        "nested": {"a": {"b": "c"}, "z": []}}}
    extra = {"pigateway_gateway_id": "gw.x_1", "pigateway_mqtt_topic_prefix": "acme/eu",
             "pigateway_gpio": {"pin_factory": "mock", "bargraph": [20, 21, 22]},
             "pigateway_store": {"default_ttl": 0.5, "overflow": "reject"},
             "pigateway_devices": devices, "pigateway_mqtt_username": "user \"q\"",
             "pigateway_manage": {"enabled": True, "allow": ["status", "config-set"],
                                  "rollback_after": 60}}
    defaults = yaml_of(ROLE / "defaults" / "main.yml")
    text = _render(e2e_venv, tmp_path, inventory, defaults, extra)["gw-x"]
    data = tomllib.loads(text)
    assert data["devices"] == devices
    assert data["gpio"] == {"pin_factory": "mock", "bargraph": [20, 21, 22]}
    assert data["mqtt"]["username"] == 'user "q"'
    config = parse(text)
    assert config.gateway_id == "gw.x_1" and config.store.default_ttl == 0.5
    assert config.mqtt.topic_prefix == "acme/eu"
    assert config.manage.enabled and config.manage.allow == ["status", "config-set"]


# --------------------------------------------------------------------------- the Debian package


def _find_deb(venv: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The role's find-deb.yml alone, on this machine as the gateway."""
    playbook = tmp_path / "find.yml"
    playbook.write_text(json.dumps([{
        "name": "Find", "hosts": "localhost", "gather_facts": False,
        "vars": {"pigateway_install_method": "deb", "pigateway_deb": "",
                 "pigateway_deb_dir": str(tmp_path / "debs")},
        "tasks": [
            {"name": "Find", "ansible.builtin.import_tasks": str(ROLE / "tasks" / "find-deb.yml")},
            {"name": "Show", "ansible.builtin.debug": {"var": "__pigateway_deb_file"}},
        ],
    }]))
    return _run(venv, "ansible-playbook", "-i", "localhost,", "-c", "local", str(playbook),
                "-e", "ansible_python_interpreter=/usr/bin/python3", *extra)


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="not a Debian machine")
def test_the_role_takes_the_package_of_the_gateways_architecture(
    e2e_venv: Path, tmp_path: Path
) -> None:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
    other = "armhf" if arch != "armhf" else "arm64"
    debs = tmp_path / "debs"
    debs.mkdir()
    done = _find_deb(e2e_venv, tmp_path)
    assert done.returncode != 0 and "run scripts/package on a" in done.stdout, done.stdout

    for i, name in enumerate((f"pigateway_0.1.0-1_{other}.deb", f"pigateway_0.0.9-1_{arch}.deb",
                              f"pigateway_0.1.0-1_{arch}.deb")):
        (debs / name).write_bytes(b"")
        os.utime(debs / name, (1_700_000_000 + i, 1_700_000_000 + i))
    done = _find_deb(e2e_venv, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f'"__pigateway_deb_file": "{debs}/pigateway_0.1.0-1_{arch}.deb"' in done.stdout

    given = f"pigateway_deb={debs}/pigateway_0.1.0-1_{other}.deb"
    done = _find_deb(e2e_venv, tmp_path, "-e", given)
    assert done.returncode != 0 and f"No Debian package of pigateway for {arch}" in done.stdout


# --------------------------------------------------------------------------- scripts/e2e


def test_e2e_scripts_pass_shellcheck(e2e_venv: Path) -> None:
    done = _run(e2e_venv, "shellcheck", "scripts/e2e", "scripts/e2e-venv", "scripts/arch-rootfs",
                cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.root
@pytest.mark.parametrize(("ci", "code", "word"), [("", 0, "SKIPPED"), ("true", 1, "FAILED")])
def test_e2e_skips_without_root_but_never_on_ci(ci: str, code: int, word: str) -> None:
    """Not root: a clear skip by hand, a failure on CI (where it must run)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run scripts/e2e as another user")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    done = subprocess.run(
        ["runuser", "-u", "nobody", "--", "bash", str(ROOT / "scripts" / "e2e")],
        cwd="/", env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == code, done.stderr
    assert f"e2e: {word}" in done.stderr and "needs root" in done.stderr


def test_the_role_installs_the_packaged_mosquitto_drop_in() -> None:
    """One drop-in for the local mosquitto: the role's copy is the package's."""
    packaged = ROOT / "packaging" / "debian" / "extra" / "pigateway-ingest.conf"
    assert (ROLE / "files" / "pigateway-ingest.conf").read_bytes() == packaged.read_bytes()
