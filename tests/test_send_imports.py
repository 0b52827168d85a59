"""``pigateway send`` imports only what it needs (<= 100 ms on an idle machine).

``send`` is run in a fresh interpreter, in each of its ways (plain, params, ``--id``,
``--wait``, a refusal); none of the service's heavy modules may come with it, nor asyncio
(~40 ms of imports: ssl, concurrent.futures, inspect, logging), which ``send`` does without
(:class:`~pigateway.store.producer.Producer`). A new import of one of these, at module
level or inside what ``send`` runs, directly or through another module, fails here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from pigateway import store

#: Modules ``send`` must never load: asyncio and what it brings, MQTT, GPIO, metrics,
#: retries, the service's parts and the Store's (its writer task and threads, the salvage
#: of a damaged file, which only the drainer makes), shutil (argparse's way to the
#: terminal's width, with bz2, lzma, pwd; the CLI reads the width itself,
#: :class:`~pigateway.cli.Help`), logging (~20 million instructions of a send's ~350
#: million: the modules that may log take it lazily, :mod:`pigateway.store.lazylog`),
#: threading (the producer's lock is :func:`_thread.allocate_lock`, threading's own).
FORBIDDEN = ("asyncio", "ssl", "logging", "shutil", "concurrent.futures", "aiomqtt", "paho",
             "threading",
             "gpiozero", "prometheus_client", "tenacity", "pigateway.listeners", "pigateway.ingest",
             "pigateway.mqtt", "pigateway.uplink", "pigateway.app",
             "pigateway.handlers", "pigateway.store.queue", "pigateway.store.writer",
             "pigateway.store.thread", "pigateway.store.reading", "pigateway.cli.manpage",
             "pigateway.store.salvage")

#: Modules only ``send --wait`` may load (it reads the whole config, for the control socket it
#: looks at): dataclasses (its import, with inspect and ast, and the code each dataclass
#: compiles made a send ~3.8 times a bare interpreter's instructions; send's records are
#: named tuples and plain classes, its config section
#: :class:`~pigateway.config.StoreConfig`) and the service's config sections.
WAIT_ONLY = ("dataclasses", "inspect", "ast", "pigateway.config.sections")

#: Each way ``send`` runs, and the exit code it must end with.
SENDS = (
    (["--param", "speed=3", "--params-json", '{"mode": "eco"}', "--ttl", "60"], 0),
    (["--priority", "high", "--id", "k-1"], 0),
    (["--id", "k-1"], 0),  # the key taken: the first command's id
    (["--wait", "--timeout", "0.1"], 5),  # no service: still queued
    (["--ttl", "-1"], 2),
)

PROBE = """
import json, sys
from pigateway.cli import main
config, sends = sys.argv[1], json.loads(sys.argv[2])
codes = [main(["send", "--config", config, "--device", "d", "--command", "on", *extra])
         for extra in sends]
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _probe(folder: Path, sends: Sequence[tuple[list[str], int]]) -> list[str]:
    """The modules loaded once ``send`` ran each way of ``sends``, in one interpreter."""
    config = folder / "config.toml"
    config.write_text(f'gateway_id = "gw1"\n[store]\npath = "{folder / "q.db"}"\n'
                      "min_free_bytes = 0\n")
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config), json.dumps([extra for extra, _ in sends])],
        check=True, capture_output=True, text=True, timeout=60)
    report = json.loads(done.stderr.splitlines()[-1])
    assert report["codes"] == [code for _, code in sends], done.stderr
    modules: list[str] = report["modules"]
    return modules


def _among(modules: list[str], names: Sequence[str]) -> list[str]:
    return sorted(name for name in modules
                  if any(name == bad or name.startswith(bad + ".") for bad in names))


@pytest.fixture(scope="module")
def loaded_by_send(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The modules loaded once ``send`` ran every way of :data:`SENDS`."""
    return _probe(tmp_path_factory.mktemp("send"), SENDS)


def test_send_without_wait_creates_no_dataclass(tmp_path: Path) -> None:
    loaded = _probe(tmp_path, [(extra, code) for extra, code in SENDS if "--wait" not in extra])
    assert "pigateway.config.schema" in loaded
    assert _among(loaded, WAIT_ONLY) == [], "`pigateway send` imports them: import lazily"


def test_send_imports_none_of_the_heavy_modules(loaded_by_send: list[str]) -> None:
    heavy = _among(loaded_by_send, FORBIDDEN)
    assert heavy == [], f"`pigateway send` imports {heavy}: import them lazily"


def test_the_probe_sees_what_send_imports(loaded_by_send: list[str]) -> None:
    """The probe is not empty-handed: the modules ``send`` does need are there."""
    for needed in ("pigateway.cli", "pigateway.config", "pigateway.store",
                   "pigateway.store.producer", "pigateway.store.commit", "sqlite3"):
        assert needed in loaded_by_send


def test_every_public_name_of_the_store_is_its_rooms() -> None:
    """The store's names are imported lazily, each from the room :data:`_ROOMS` names."""
    assert sorted(store._ROOMS) == sorted(store.__all__)
    for name in store.__all__:
        room = importlib.import_module(f"pigateway.store.{store._ROOMS[name]}")
        assert getattr(store, name) is getattr(room, name), name
    with pytest.raises(AttributeError, match="no attribute 'Stroe'"):
        getattr(store, "Stroe")  # noqa: B009 - the name is the point
