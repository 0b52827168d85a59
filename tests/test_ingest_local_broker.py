"""The gateway's own mosquitto, set up the way the package sets it up, keeps what ingest
needs: more messages than mosquitto's default 1000 published while pigateway is stopped
all reach the uplink, through a restart of both pigateway and the broker.

The local broker here is configured like Debian's mosquitto.conf (persistence on, its
include_dir) with the drop-in the package installs in /etc/mosquitto/conf.d and nothing
else: mosquitto's own defaults for every other limit. ``pigateway run`` is a child process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Run
from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import settings, write
from harness.ingest_helpers import as_us, collecting, publish
from harness.service import Service
from harness.waits import wait_until
from pigateway.config import from_dict
from pigateway.ingest import localbroker

ROOT = Path(__file__).resolve().parents[1]
DROP_IN = ROOT / "packaging" / "debian" / "extra" / "pigateway-ingest.conf"
#: well past mosquitto's default max_queued_messages (1000)
SENT = 1500


class DebianMosquitto(Mosquitto):
    """mosquitto with Debian's mosquitto.conf (persistence, include_dir) and the drop-in."""

    def write_config(self) -> Path:
        conf_d = self.folder / "conf.d"
        conf_d.mkdir(exist_ok=True)
        (conf_d / DROP_IN.name).write_text(DROP_IN.read_text())
        path = self.folder / "mosquitto.conf"
        path.write_text("\n".join([
            f"listener {self.port} 127.0.0.1", "allow_anonymous true",
            "persistence true", f"persistence_location {self.folder}/",
            "log_dest stderr", "log_type error", "log_type warning", *as_us(),
            f"include_dir {conf_d}"]) + "\n")
        return path


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    with DebianMosquitto(tmp_path / "local") as local, \
            Mosquitto(tmp_path / "uplink", extra=as_us()) as uplink:
        yield local, uplink


async def test_more_than_the_default_queue_waits_for_a_stopped_pigateway(
        pair: tuple[Mosquitto, Mosquitto], folder: Path) -> None:
    local, uplink = pair
    data = settings(folder, port=uplink.port, prefix="pg", uplink={
        "batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.5})
    data["gpio"] = {"enabled": False}
    data["inbound"] = {"enabled": False}
    data["local"] = {"host": local.host, "port": local.port}
    data["ingest"] = [{"topic": "z2m/+/state"}]
    service = Service(write(folder / "config.toml", data), folder / "service.log")
    sent = [(f"z2m/dev{n % 10}/state", b"%d" % n) for n in range(SENT)]
    async with collecting(uplink, "pg/gw-test/forward/#") as collector:
        with service:  # the first start makes ingest's session on the local broker
            assert await wait_until(lambda: "ingest: online" in service.tail(100_000), 20), \
                service.tail()
            assert service.stop() == 0  # stopped, as for an upgrade
        assert await publish(local, sent) == SENT
        local.restart()  # and the broker restarted meanwhile (a clean stop saves its state)
        with service:
            assert await wait_until(lambda: len({g.payload for g in collector.got}) >= SENT,
                                    40), (len({g.payload for g in collector.got}),
                                          service.tail())
            service.stop()
    assert {g.payload for g in collector.got} == {p for _, p in sent}


def debian_conf(folder: Path, *drop_ins: str) -> Path:
    """Debian's /etc/mosquitto/mosquitto.conf as installed, with ``drop_ins`` in conf.d."""
    conf_d = folder / "conf.d"
    conf_d.mkdir(parents=True, exist_ok=True)
    (conf_d / "README").write_text("max_queued_messages 5\n")  # not *.conf: never read
    for index, text in enumerate(drop_ins):
        (conf_d / f"{index}.conf").write_text(text)
    path = folder / "mosquitto.conf"
    path.write_text("# Place your local configuration in /etc/mosquitto/conf.d/\n"
                    "pid_file /run/mosquitto/mosquitto.pid\n\npersistence true\n"
                    "persistence_location /var/lib/mosquitto/\n\n"
                    f"log_dest file /var/log/mosquitto/mosquitto.log\n\ninclude_dir {conf_d}\n")
    return path


def ingest_file(folder: Path, host: str = "127.0.0.1") -> Path:
    data = settings(folder, port=18830)
    data["local"] = {"host": host}
    data["ingest"] = [{"topic": "z2m/#"}]
    return write(folder / "config.toml", data)


def test_config_check_warns_of_the_default_local_broker_limits(
        tmp_path: Path, cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localbroker, "MOSQUITTO_CONF", debian_conf(tmp_path / "mosquitto"))
    code, out, err = cli("config", "check", "--config", str(ingest_file(tmp_path)))
    assert code == 0, err
    assert "valid" in out
    assert "keeps at most 1000 messages" in err and "1800 s" in err
    assert localbroker.DROP_IN in err


def test_the_shipped_drop_in_leaves_no_warning(tmp_path: Path) -> None:
    conf = debian_conf(tmp_path / "mosquitto", DROP_IN.read_text())
    config = from_dict(settings(tmp_path, port=18830) | {
        "local": {"host": "localhost"}, "ingest": [{"topic": "z2m/#"}]})
    assert localbroker.warnings(config, conf) == []


@pytest.mark.parametrize(("drop_in", "host", "warned"), [
    ("persistence false\nmax_queued_messages 5000\n", "127.0.0.1", "persistence off"),
    ("max_queued_messages 1000\nautosave_interval 60\n", "127.0.0.1", "at most 1000"),
    ("", "192.0.2.7", None),  # a broker on another host: its config is not this one
])
def test_what_the_local_broker_config_says(tmp_path: Path, drop_in: str, host: str,
                                           warned: str | None) -> None:
    conf = debian_conf(tmp_path / "mosquitto", drop_in)
    config = from_dict(settings(tmp_path, port=18830) | {
        "local": {"host": host}, "ingest": [{"topic": "z2m/#"}]})
    found = localbroker.warnings(config, conf)
    if warned is None:
        assert found == []
    else:
        assert any(warned in line for line in found), found


def test_an_unreadable_broker_config_is_no_warning(tmp_path: Path) -> None:
    config = from_dict(settings(tmp_path, port=18830) | {"ingest": [{"topic": "z2m/#"}]})
    assert localbroker.warnings(config, tmp_path / "absent.conf") == []


@pytest.mark.parametrize(("later", "warned"), [
    ("max_queued_messages 100\n", "at most 100 messages"),  # below the default: worse
    ("max_queued_bytes 65536\n", "at most 64 KiB"),  # a bytes bound that drops messages
    ("autosave_interval 0\n", "only when it exits"),  # 0: saved at exit only
    ("autosave_interval 86400\n", "every 86400 s"),  # longer than the default: worse
])
def test_a_local_broker_worse_than_its_defaults_is_warned_of(tmp_path: Path, later: str,
                                                              warned: str) -> None:
    """A careless operator's later drop-in that keeps *fewer* messages, or saves them less
    often, than mosquitto's defaults loses more of ingest's messages than the defaults
    the check warns of: it is warned of too, never taken for the shipped drop-in."""
    conf = debian_conf(tmp_path / "mosquitto", DROP_IN.read_text(), later)
    config = from_dict(settings(tmp_path, port=18830) | {
        "local": {"host": "127.0.0.1"}, "ingest": [{"topic": "z2m/#"}]})
    found = localbroker.warnings(config, conf)
    assert any(warned in line for line in found), found
    assert any(localbroker.DROP_IN in line for line in found), found
