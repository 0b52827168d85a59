"""``pigateway send`` imports only what it needs (issue 11: <= 100 ms on an idle machine).

The CLI module and everything ``send`` runs (config, store) are imported in a fresh
interpreter; none of the service's heavy modules may come with them. A new module-level
import of one of these (directly or through another module) fails here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from pigateway import store

#: Modules ``send`` must never load: MQTT, GPIO, metrics, retries, the service's parts.
FORBIDDEN = ("aiomqtt", "paho", "gpiozero", "prometheus_client", "tenacity",
             "pigateway.metrics", "pigateway.ingest", "pigateway.mqtt", "pigateway.uplink",
             "pigateway.app", "pigateway.control", "pigateway.handlers")

PROBE = """
import json, sys
sys.argv = ["pigateway", "send", "--device", "d", "--command", "on"]
import pigateway.cli
from pigateway.cli import build_parser, cmd_send
build_parser().parse_args(sys.argv[1:])
import pigateway.store
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by_send() -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True, timeout=60)
    return json.loads(out.stdout)


def test_send_imports_none_of_the_heavy_modules() -> None:
    modules = loaded_by_send()
    heavy = sorted(name for name in modules
                   if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN))
    assert heavy == [], f"`pigateway send` imports {heavy}: import them lazily"


def test_the_probe_sees_what_send_imports() -> None:
    """The probe is not empty-handed: the modules ``send`` does need are there."""
    modules = loaded_by_send()
    assert "pigateway.cli" in modules
    assert "pigateway.store" in modules
    assert "pigateway.config" in modules


def test_every_public_name_of_the_store_is_its_rooms() -> None:
    """The store's names are imported lazily, each from the room :data:`_ROOMS` names."""
    assert sorted(store._ROOMS) == sorted(store.__all__)
    for name in store.__all__:
        room = importlib.import_module(f"pigateway.store.{store._ROOMS[name]}")
        assert getattr(store, name) is getattr(room, name), name
    with pytest.raises(AttributeError, match="no attribute 'Stroe'"):
        getattr(store, "Stroe")  # noqa: B009 - the name is the point
