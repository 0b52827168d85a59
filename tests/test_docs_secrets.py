"""Secrets live in one place: systemd's credential store, which the shipped unit loads.

Every credential the service reads by name is one the unit's ``LoadCredential=`` lines load
(the role installs the same ones: tests/test_ansible_role.py), and no page of the docs shows
a password in a file of the config folder instead.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "pigateway.service"


def test_every_credential_the_service_reads_is_one_the_unit_loads() -> None:
    read = {name for path in sorted((ROOT / "service" / "pigateway").rglob("*.py"))
            for name in re.findall(r'\bcredential\("([^"]+)"\)', path.read_text())}
    loaded = set(re.findall(r"^LoadCredential=([^:\s]+):", UNIT.read_text(), re.M))
    assert read >= {"mqtt-password", "mqtt-key", "local-password"}
    assert read - loaded == set(), "the unit never loads these, so the service never sees them"
    for name in loaded:
        assert f"/etc/credstore/pigateway.{name}" in (ROOT / "docs" / "operations.md").read_text()


def test_no_page_puts_a_password_in_a_file_beside_the_config() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "ansible").rglob("README.md")),
             ROOT / "packaging" / "debian" / "extra" / "config.toml"]
    shown = [f"{page.name}: {line.strip()}" for page in pages
             for line in page.read_text().splitlines()
             if re.match(r"^\s*password_file\s*=", line)]
    assert shown == [], "a password goes to /etc/credstore/pigateway.<credential>"
