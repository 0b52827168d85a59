"""The ``log`` handler: writes each command to the log (the journal under systemd).

Useful to test a fleet end to end without touching hardware. It is idempotent in the only
way that matters: a command run twice after a crash shows twice in the journal, with the
same ``command_id``, which is exactly what an operator wants to see.

Options: ``level`` (``"debug"``, ``"info"`` (default), ``"warning"``).
"""

from __future__ import annotations

import logging
from typing import Any

from pigateway.config import Config, DeviceConfig
from pigateway.handlers import Options, Request
from pigateway.inputs import shown

log = logging.getLogger("pigateway.handlers.log")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class LogHandler:
    """Records every command at the configured level, with ``command_id`` and ``device``."""

    def __init__(self, device: DeviceConfig, config: Config) -> None:
        self.device = device.name
        self.level = self.check(device, config)

    @staticmethod
    def check(device: DeviceConfig, config: Config) -> int:
        """The log level from the options (``pigateway config check`` calls this alone)."""
        options = Options(device)
        level = options.choice("level", logging.INFO, LEVELS)
        options.finish()
        return level

    async def run(self, request: Request) -> Any:
        # name and params come from the broker: shown bounded and escaped, one line each
        log.log(self.level, "command %s for %s: %s %s (attempt %d)", shown(request.id, 40),
                request.device, shown(request.name, 80), shown(request.params, 400),
                request.attempt,
                extra={"command_id": request.id, "device": request.device})
        return None

    async def close(self) -> None:
        """Nothing to release."""
