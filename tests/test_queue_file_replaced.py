"""The queue file removed or replaced under the running service (an operator's ``rm`` to
start afresh, a backup moved over it): the service's connections keep the old file, every
``pigateway send`` after it creates or fills the new one, and nothing drained the new one
until a restart that might come months later, while every view showed the old file's
figures. Now the service says so (CRITICAL, and its store fault in every view), drains what
the old file still holds, then exits to be restarted (75, as after a remote config-set)
onto the new one: nothing printed by a send waits for a restart nobody asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import settings, to_toml
from harness.service import environment, spawn
from harness.waits import wait_until
from harness.wire_subscriber import WireSubscriber
from pigateway.manage.remoteconfig import EXIT_RESTART

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]
GATEWAY, PREFIX = "gw-replaced", "rq"


def send(config: Path, n: int) -> str:
    done = subprocess.run([sys.executable, "-m", "pigateway", "send", "--config", str(config),
                           "--device", "d", "--command", "set", "--param", f"n={n}"],
                          capture_output=True, text=True, timeout=60, env=environment(),
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


async def test_a_queue_file_removed_under_the_service_is_drained_after_a_restart(
        tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        data = settings(tmp_path, gateway_id=GATEWAY, port=broker.port, prefix=PREFIX,
                        uplink={"batch_delay": 0.01, "backoff_initial": 0.05,
                                "backoff_max": 0.3})
        data["gpio"] = {"enabled": False}
        config = tmp_path / "config.toml"
        config.write_text(to_toml(data))
        cloud = WireSubscriber(broker.host, broker.port, PREFIX, GATEWAY)
        watching = asyncio.create_task(cloud.run())
        log = tmp_path / "service.log"
        service = spawn(config, log)
        try:
            await asyncio.wait_for(cloud.connected.wait(), 10)
            first = await asyncio.to_thread(send, config, 0)
            assert await wait_until(lambda: first in cloud.ids(), 20)
            for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            later = [await asyncio.to_thread(send, config, n) for n in range(1, 4)]
            assert await wait_until(lambda: service.poll() is not None, 20), \
                "the service kept the removed file and never drained the new one"
            assert service.returncode == EXIT_RESTART
            assert "removed or replaced" in log.read_text()
            service = spawn(config, log)  # what systemd's Restart= does
            assert await wait_until(lambda: set(later) <= cloud.ids(), 20), log.read_text()
        finally:
            if service.poll() is None:
                service.terminate()
                service.wait(30)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
