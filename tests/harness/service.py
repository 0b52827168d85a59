"""The one launcher of the service: ``pigateway run`` as a child process (``spawn``,
``Service``), or the ``Gateway`` in this process (``running_gateway``).

A child is started outside systemd (no inherited ``NOTIFY_SOCKET``/``WATCHDOG_*``) unless the
caller passes them, in its config's folder, and is only ever signalled by its own PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from harness.waits import wait_until
from pigateway.app import Gateway
from pigateway.config import Config

CONSOLE_SCRIPT = Path(sys.executable).with_name("pigateway")


def argv(config: Path, *, console_script: bool = False) -> list[str]:
    """``pigateway run --config config``: the installed console script (as systemd runs it)
    or ``python -m pigateway``."""
    head = [str(CONSOLE_SCRIPT)] if console_script else [sys.executable, "-m", "pigateway"]
    return [*head, "run", "--config", str(config)]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without systemd's variables, unbuffered, with
    faulthandler on (a hang killed with SIGABRT dumps its stacks), and ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if key != "NOTIFY_SOCKET" and not key.startswith(("WATCHDOG_", "JOURNAL"))}
    env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update(extra or {})
    return env


def spawn(config: Path, log: Path | None = None, *, console_script: bool = False,
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``pigateway run``; its output appended to ``log`` (or inherited when None)."""
    command = argv(config, console_script=console_script)
    if log is None:
        return subprocess.Popen(command, cwd=config.parent, env=environment(env))
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=out, cwd=config.parent,
                                env=environment(env))


def terminate(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, the way systemd stops it; SIGKILL if it has not ended within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Service:
    """``pigateway run`` in a child process, with stop helpers that signal only its PID."""

    def __init__(self, config: Path, log: Path | None = None, *, console_script: bool = False,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.console_script = console_script
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.process = spawn(self.config, self.log, console_script=self.console_script,
                             env=self.env)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: signal.Signals, timeout: float = 20.0) -> int | None:
        """Send ``sig`` and wait for the exit; a hang gets SIGABRT (stacks), then SIGKILL.
        Returns the exit code (None if it was never started)."""
        if self.process is None:
            return None
        process = self.process
        if process.poll() is None:
            os.kill(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGABRT)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(10)
        self.process = None
        return process.returncode

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, the way systemd stops it; the exit code."""
        return self.signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash or a power cut."""
        self.signal(signal.SIGKILL)

    def tail(self, size: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-size:]

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@asynccontextmanager
async def running_gateway(cfg: Config, *, timeout: float = 20.0) -> AsyncIterator[Gateway]:
    """The ``Gateway`` running in this loop, yielded once its store is open; stopped the way
    the service stops it (then cancelled if that took more than 15 s)."""
    gateway = Gateway(cfg)
    task = asyncio.create_task(gateway.run(), name="test-gateway")
    try:
        if not await wait_until(lambda: gateway.store is not None or task.done(), timeout):
            raise TimeoutError(f"the gateway did not open its store within {timeout}s")
        if task.done():
            await task
        yield gateway
        gateway.stop()
        async with asyncio.timeout(15):
            await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
