"""The demo behind ``scripts/demo``: a gateway riding out a broker outage, narrated live.

Everything lives in a temporary folder and on 127.0.0.1: a mosquitto on a free port, the
service (``pigateway run``, gpiozero's mock pins), commands sent with ``pigateway send``
as a producer would, a receiver on the actions topic. The broker is stopped for a few
seconds (the queue grows on disk) and started again (the backlog drains, batched). Ends
by itself within a minute and stops only the processes it started, by PID.

Its state lines are the service's (the control socket's ``status``): ``queued`` the commands
waiting or in flight, ``in_flight`` the batches the broker has not acknowledged yet, and
``acked`` (for a moment after a batch arrived) the commands the broker acknowledged whose
rows are still being deleted.

The broker, the config and the service come from the tests' harness (``tests/harness``),
which ``scripts/demo`` puts on ``PYTHONPATH``; nothing here needs pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt

from harness import gateway
from harness.broker import Mosquitto
from harness.service import CONSOLE_SCRIPT, Service
from harness.waits import until
from pigateway.errors import ControlError
from pigateway.listeners import control

GATEWAY = "demo-gw"
PREFIX = "pigateway"
DEADLINE = 55.0
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {text}", flush=True)


def write_config(folder: Path, port: int) -> Path:
    return gateway.write(folder / "config.toml", gateway.settings(
        folder, gateway_id=GATEWAY, port=port, prefix=PREFIX, mqtt={"keepalive": 5},
        uplink={"batch_delay": 0.5, "max_actions": 10, "backoff_initial": 0.5,
                "backoff_max": 2.0, "publish_timeout": 3.0},
        gpio={"pin_factory": "mock"}, log={"level": "warning"}))


def pigateway(*args: str) -> list[str]:
    return [str(CONSOLE_SCRIPT), *args]


class Receiver:
    """The cloud side: prints each batch as it arrives on the actions topic."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ids: list[str] = []
        self.batches = 0

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="demo-receiver",
                                          clean_session=False) as client:
                    await client.subscribe(f"{PREFIX}/{GATEWAY}/actions", qos=1)
                    async for message in client.messages:
                        self.show(message.payload)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    def show(self, payload: Any) -> None:
        batch = json.loads(payload)
        self.batches += 1
        per_device = {a["device"]: len(a["commands"]) for a in batch["actions"]}
        count = sum(per_device.values())
        self.ids += [c["id"] for a in batch["actions"] for c in a["commands"]]
        say(f"  <- batch {batch['batch'][-6:]}: {count} command(s) for "
            f"{len(per_device)} device(s) {per_device}")


async def watch_state(socket_path: Path) -> None:
    """Print the service's state (from its control socket) whenever it changes."""
    last = None
    while True:
        with contextlib.suppress(ControlError):
            state = (await control.request(socket_path, "status"))["state"]
            acked = state.get("acked") or 0  # delivered; counted in depth until deleted
            now = (state["link"], state["depth"], acked, state["in_flight"], state.get("fault"))
            if now != last:
                last = now
                extra = f" acked={acked}" if acked else ""
                extra += f", retry in {state['retry_in']}s" if state.get("retry_in") else ""
                say(f"  state: link={state['link']} queued={state['depth'] - acked} "
                    f"in_flight={state['in_flight']}{extra}")
        await asyncio.sleep(0.2)


async def send(config: Path, device: str, name: str, **params: Any) -> str:
    args = [f"--param={key}={value}" for key, value in params.items()]
    proc = await asyncio.create_subprocess_exec(
        *pigateway("send", "--config", str(config), "--device", device, "--command", name,
                   *args), stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"pigateway send failed ({proc.returncode})")
    return out.decode().strip()


async def send_many(config: Path, count: int, start: int) -> list[str]:
    devices = ["lamp", "door", "thermostat", "blinds"]
    ids: list[str] = []
    for first in range(start, start + count, 4):  # four producers at a time
        ids += await asyncio.gather(*(send(config, devices[n % 4], "set", level=n)
                                      for n in range(first, min(first + 4, start + count))))
    return ids


async def demo(folder: Path) -> int:
    broker = Mosquitto(folder / "broker", extra=["user root"])
    port = broker.port
    config = write_config(folder, port)
    socket_path = folder / "control.sock"
    say(f"starting mosquitto on 127.0.0.1:{port} (folder {folder})")
    broker.start()
    say("starting the service: pigateway run (gpiozero mock pins)")
    service = Service(config, folder / "service.log", console_script=True).start()
    receiver = Receiver(port)
    tasks = [asyncio.create_task(receiver.run()), asyncio.create_task(watch_state(socket_path))]

    async def link_is(link: str) -> bool:
        with contextlib.suppress(ControlError):
            return bool((await control.request(socket_path, "status"))["state"]["link"] == link)
        return False

    try:
        if not await until(lambda: link_is("online"), 15):
            raise SystemExit("the service did not come online; see " + str(folder))
        say("-> sending 8 commands for 4 devices with `pigateway send` (online)")
        sent = await send_many(config, 8, 0)
        await until(lambda: _true(len(set(receiver.ids)) >= 8), 10)

        say("-> stopping the broker: an outage")
        await asyncio.to_thread(broker.stop)
        await until(lambda: link_is("offline"), 10)
        say("-> sending 24 more commands while the broker is away (they wait on disk)")
        sent += await send_many(config, 24, 8)
        await asyncio.sleep(1.5)

        say("-> starting the broker again: the backlog drains, batched")
        await asyncio.to_thread(broker.start)
        drained = await until(lambda: _true(set(sent) <= set(receiver.ids)), 20)
        await asyncio.sleep(0.5)
        return summary(sent, receiver, drained)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        say("stopping the service (SIGTERM) and the broker")
        service.stop(timeout=15)
        broker.stop()


async def _true(value: bool) -> bool:
    return value


def summary(sent: list[str], receiver: Receiver, drained: bool) -> int:
    arrived = set(receiver.ids)
    duplicates = sum(n - 1 for n in Counter(receiver.ids).values())
    say(f"sent {len(sent)} commands; {len(arrived & set(sent))} arrived in "
        f"{receiver.batches} batches ({duplicates} duplicate deliveries, dropped by id)")
    if not drained:
        say("NOT everything arrived in time: see the service log")
        return 1
    say("every command arrived; nothing was lost while the broker was away")
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pigateway-demo-") as tmp:
        try:
            return asyncio.run(asyncio.wait_for(demo(Path(tmp)), DEADLINE))
        except TimeoutError:
            say(f"the demo ran out of its {DEADLINE:.0f}s")
            return 1


if __name__ == "__main__":
    sys.exit(main())
