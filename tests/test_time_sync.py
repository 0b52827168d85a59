"""The service must start, and queue, before the wall clock is synchronised.

TTLs run on the gateway clock (pigateway.store.clock), so nothing needs NTP to have answered;
a gateway that boots offline must not wait for it. ``After=time-sync.target`` waits for
good when ``systemd-time-wait-sync.service`` is enabled and no time server answers.
"""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pigateway.service"
ROLE = Path(__file__).resolve().parent.parent / "ansible" / "roles" / "pigateway"
ORDERING = ("After", "Wants", "Requires", "Requisite", "BindsTo", "PartOf", "Upholds")
TIME_SYNC = ("time-sync.target", "systemd-time-wait-sync.service")


def unit_values(key: str) -> list[str]:
    """Every unit named by ``key`` in the unit file (a key may be given many times)."""
    names: list[str] = []
    for raw in UNIT.read_text().splitlines():
        name, sep, value = raw.strip().partition("=")
        if sep and name.strip() == key:
            names += value.split()
    return names


def test_the_unit_does_not_wait_for_time_sync() -> None:
    for key in ORDERING:
        assert not set(unit_values(key)) & set(TIME_SYNC), (key, unit_values(key))


def test_the_unit_still_waits_for_the_network_it_wants() -> None:
    """The parser above reads the unit (a test that can fail: it finds what is there)."""
    assert "network-online.target" in unit_values("After")


def test_the_role_does_not_make_the_boot_wait_for_time_sync() -> None:
    for path in sorted(ROLE.rglob("*")):
        if path.is_file():
            assert "time-wait-sync" not in path.read_text(errors="replace"), path
