"""Who owns the queue file: a producer run as root (the README's own order: install, write
the config, ``sudo pigateway send`` before the first start) must not leave a ``queue.db``
the service's user cannot write, and a service that meets one says whose it is and the
``chown`` that fixes it, instead of looping on "attempt to write a readonly database".

Real files and a real second user: the service's side runs as ``nobody`` (as the unit
runs it as ``pigateway``), through util-linux's setpriv, in a folder ``nobody`` owns (as
systemd's ``StateDirectory=`` gives it to the service's user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.sockets import short_dir
from pigateway.config import StoreConfig
from pigateway.store.producer import Producer

SERVICE = "nobody"


@pytest.fixture
def state_directory() -> Iterator[Path]:
    """/var/lib/pigateway as systemd makes it: the service user's, mode 0770."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("a second user needs root and setpriv (util-linux)")
    place = short_dir()
    place.chmod(0o755)
    folder = place / "state"
    folder.mkdir(mode=0o770)
    shutil.chown(folder, SERVICE, "nogroup")
    yield folder
    shutil.rmtree(place, ignore_errors=True)


def as_the_service(script: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``script`` (with ``config``, a StoreConfig of ``path``) run as the service's user."""
    code = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from pigateway.config import StoreConfig
        config = StoreConfig(path=Path({str(path)!r}), min_free_bytes=0)
    """) + textwrap.dedent(script)
    return subprocess.run(["setpriv", f"--reuid={SERVICE}", "--regid=nogroup",
                           "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, check=False)


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def test_a_send_as_root_gives_the_new_queue_file_to_the_folders_owner(
        state_directory: Path) -> None:
    config = StoreConfig(path=state_directory / "queue.db", min_free_bytes=0)
    with Producer.open(config) as producer:  # root, before the service ever started
        sent = producer.put("lamp", "on").id
        made = [config.path, *(Path(f"{config.path}{tail}") for tail in ("-wal", "-shm"))]
        assert {p.name: owner(p) for p in made if p.exists()} == {
            p.name: SERVICE for p in made if p.exists()}
    done = as_the_service("""
        from pigateway.store import Store
        async def main():
            async with await Store.open(config) as store:
                [claimed] = await store.claim(10)
                await store.ack([claimed.id])
                print(claimed.id)
        asyncio.run(main())
    """, config.path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sent


def test_the_service_names_the_owner_and_the_chown_of_a_queue_it_cannot_write(
        state_directory: Path) -> None:
    config = StoreConfig(path=state_directory / "queue.db", min_free_bytes=0)
    with Producer.open(config) as producer:
        producer.put("lamp", "on")
    for made in state_directory.iterdir():  # as a send of an older version left it
        shutil.chown(made, "root", "root")
        made.chmod(0o644)
    done = as_the_service("""
        from pigateway.store import Store
        from pigateway.errors import StoreError
        async def main():
            try:
                async with await Store.open(config) as store:
                    await store.put("lamp", "off")
            except StoreError as exc:
                print(exc)
                raise SystemExit(1)
        asyncio.run(main())
    """, config.path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    said = done.stdout
    assert "owner root" in said and f"chown {SERVICE}: {config.path}" in said, said
    assert "readonly" not in said
