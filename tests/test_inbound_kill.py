"""``kill -9`` of ``pigateway run`` while commands arrive from the cloud: the inbound path
(receipt into the inbox, the acknowledgement after our commit, an idle lane's command
received already running, a busy lane's queued behind, the run, the result through the
queue) cut at random moments under load, bounded in kills and time.

The cuts are SIGKILLs at random moments (some timed from outside: up to 5 ms after the
proxy passed a command picked at random to the service), so the product runs unchanged:
no hook in the service says where it is. Where each kill fell is read back from what it
left (the inbox's rows, the acknowledgements the proxy saw, the runs the device saw, the
results at the cloud): :class:`harness.inbound_cuts.Windows`, and the test asserts that
the kills fell into the windows between every await of the path. The invariants after
each kill and at the end are :class:`harness.inbound_cuts.Ledger`'s: every command the
gateway acknowledged is in the inbox, none has run more times than the inbox counts its
starts, none runs again once its result is recorded, every command the broker
acknowledged to the cloud gets its one result, and nothing is quarantined.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.broker import Mosquitto, mosquitto_binary
from harness.gateway import settings, to_toml
from harness.inbound_cuts import (
    AckWatch,
    Cloud,
    Ledger,
    Runs,
    devices,
    make_uplink_session,
)
from harness.service import spawn, terminate

pytestmark = [pytest.mark.slow, pytest.mark.broker,
              pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")]

GATEWAY, PREFIX = "gw-kill", "ik"
#: kills at least; then more, until the kills have fallen into every window, at most
KILLS, MAX_KILLS = 16, 40
SEED = 20261207
#: the kinds of kill, in turn: during start-up (the recovery, the first load, the
#: session's queued commands arriving at once, so lanes are busy and commands queue);
#: a few milliseconds after a command picked at random passed to the service (the
#: receipt's commit and acknowledgement); at a random time once results flow; and again
#: after a command, the cloud quiet until the service caught up, so its lanes are idle
KINDS = ("start-up", "after a command", "at random", "after a command, lanes idle")
#: a kill after a command falls on one of the first this many commands of its start (or,
#: lanes idle, of those after the cloud spoke again: its first bursts)
MAX_CUT_AT_COMMAND, MAX_CUT_AT_IDLE = 150, 8
TIMEOUT = 20.0
CATCH_UP_TIMEOUT = 60.0
FINAL_TIMEOUT = 60.0


def write_config(folder: Path, local: Mosquitto, port: int) -> Path:
    data = settings(folder, gateway_id=GATEWAY, port=port, prefix=PREFIX,
                    uplink={"batch_delay": 0.01, "backoff_initial": 0.05, "backoff_max": 0.3},
                    devices=devices(local))
    data["gpio"] = {"enabled": False}
    path = folder / "kill.toml"
    path.write_text(to_toml(data))
    return path


def wait_for_results(cloud: Cloud) -> None:
    """Until a result comes back (the service is up and running commands), however slow
    the machine is to start it."""
    answered = len(cloud.answered())
    deadline = time.monotonic() + TIMEOUT
    while len(cloud.answered()) == answered and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_for_idle_lanes(cloud: Cloud) -> None:
    """Until the service has answered every command the cloud sent (its lanes are idle),
    however slow the machine is."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    while cloud.every_acked() - cloud.answered() and time.monotonic() < deadline:
        time.sleep(0.02)


def kill_after(watch: AckWatch, service: subprocess.Popen[bytes], commands: int,
               rng: random.Random) -> None:
    """SIGKILL up to 5 ms after the ``commands``-th command from now passed to ``service``
    (or ``TIMEOUT`` later)."""
    watch.arm(service.pid, commands, rng.uniform(0.0, 0.005))
    watch.fired.wait(TIMEOUT)
    watch.disarm()


def cut(kind: str, service: subprocess.Popen[bytes], cloud: Cloud, watch: AckWatch,
        rng: random.Random) -> None:
    """Wait for the moment of a kill of ``kind`` (the kill itself may come from ``watch``)."""
    if kind == "start-up":
        time.sleep(rng.uniform(0.2, 1.0))
    elif kind == "after a command":
        kill_after(watch, service, rng.randint(1, MAX_CUT_AT_COMMAND), rng)
    elif kind == "at random":
        wait_for_results(cloud)
        time.sleep(rng.uniform(0.0, 0.5))
    else:  # the cloud quiet until the service caught up: the next commands find lanes idle
        cloud.running.clear()
        wait_for_idle_lanes(cloud)
        watch.arm(service.pid, rng.randint(1, MAX_CUT_AT_IDLE), rng.uniform(0.0, 0.005))
        cloud.running.set()
        watch.fired.wait(TIMEOUT)
        watch.disarm()


def test_kill_9_at_random_moments_of_inbound_receipt_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "queue.db"
    ledger = Ledger()
    with Mosquitto(tmp_path / "uplink-broker") as uplink, \
            Mosquitto(tmp_path / "local-broker") as local:
        make_uplink_session(uplink, GATEWAY, PREFIX)
        watch = AckWatch(uplink.port, f"{PREFIX}/{GATEWAY}/commands").open()
        runs = Runs(local, "ik-runs")
        cloud = Cloud(uplink, GATEWAY, PREFIX, rng, pause=0.1, burst=8, name="ik-cloud")
        config = write_config(tmp_path, local, watch.port)
        service: subprocess.Popen[bytes] | None = None
        try:
            cloud.running.set()
            started = time.monotonic()
            kills = 0
            while kills < KILLS or (kills < MAX_KILLS and ledger.windows.missed()):
                service = spawn(config, tmp_path / "service.log")
                kind = KINDS[kills % len(KINDS)]
                cut(kind, service, cloud, watch, rng)
                service.send_signal(signal.SIGKILL)
                service.wait(30)
                kills += 1
                ledger.check_cut(f"kill {kills} ({kind})", db, cloud, watch, runs)
            cloud.running.clear()
            service = spawn(config, tmp_path / "service.log")
            ledger.final(cloud, runs, FINAL_TIMEOUT)
            seconds = time.monotonic() - started
        finally:
            if service is not None:
                terminate(service)
            cloud.close()
            runs.close()
            watch.shut()
    quarantined = sorted(p.name for p in tmp_path.glob("queue.db.corrupt-*"))
    acked = {qos: len(ids) for qos, ids in cloud.acked.items()}
    repeated = sum(1 for n in runs.counts.values() if n > 1)
    print(f"\n{kills} kills in {seconds:.0f} s; acknowledged to the cloud: {acked}; "
          f"run more than once (interrupted while running): {repeated}\n"
          f"{ledger.windows.table()}")
    assert ledger.problems == []
    assert quarantined == []
    assert acked[1] >= 100 and acked[2] >= 100
    # the kills fell into every window of the path (between each of its awaits)
    assert ledger.windows.missed() == [], ledger.windows.table()
