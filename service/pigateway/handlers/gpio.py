"""The ``gpio`` handler: a relay or any on/off output on one GPIO pin, through gpiozero.

Options: ``pin`` (BCM number, required), ``active_high`` (default true: false for relay
boards that switch on a low level), ``initial`` (``"off"`` (default), ``"on"``, ``"keep"``).

Commands (the table ``ACTIONS`` below): ``on``, ``off``, ``toggle``, ``pulse``
(``{"duration": seconds}``, default 1, on then off), ``state``. Each returns
``{"on": bool}``, the output after the command.

Idempotence: ``on``, ``off`` and ``state`` set or read an absolute state, and ``pulse``
always ends ``off``, so running them twice after a crash leaves the relay as once would.
``toggle`` is made safe to repeat per command id within a run of the service (a retry
returns the recorded outcome instead of flipping back); after a restart the output starts
from ``initial`` again, so senders that need certainty should send ``on``/``off``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from gpiozero import DigitalOutputDevice
from gpiozero.exc import GPIOZeroError

from pigateway.config import Config, DeviceConfig, GpioConfig
from pigateway.errors import ConfigError, GpioError, HandlerError, InvalidCommand
from pigateway.handlers import REQUIRED, Options, Request, is_number
from pigateway.inputs import shown
from pigateway.pins import pin_factory

log = logging.getLogger(__name__)

INITIAL = {"off": False, "on": True, "keep": None}
MAX_PULSE = 3600.0
REMEMBERED_TOGGLES = 256


class GpioHandler:
    """One output pin; see the module docstring for its commands."""

    def __init__(self, device: DeviceConfig, config: Config) -> None:
        pin, active_high, initial = self.check(device, config)
        self.name = device.name
        self.max_pulse = min(MAX_PULSE, config.inbound.handler_timeout)
        self._toggled: OrderedDict[str, bool] = OrderedDict()
        try:
            self.output = DigitalOutputDevice(pin, active_high=active_high,
                                              initial_value=initial,
                                              pin_factory=pin_factory(config.gpio.pin_factory))
        except (GPIOZeroError, GpioError) as exc:
            raise ConfigError(f"devices.{device.name}.pin", f"cannot use pin {pin}: {exc}") \
                from exc

    @staticmethod
    def check(device: DeviceConfig, config: Config) -> tuple[int, bool, bool | None]:
        """The options (pin, active_high, initial), checked without claiming the pin."""
        options = Options(device)
        pin = options.integer("pin", REQUIRED, low=0, high=53)
        active_high = options.flag("active_high", True)
        initial = options.choice("initial", False, INITIAL)
        options.finish()
        _check_panel_pins(options.key("pin"), pin, config.gpio)
        return pin, active_high, initial

    async def run(self, request: Request) -> Any:
        action = ACTIONS.get(request.name)
        if action is None:
            raise InvalidCommand(f"gpio device {self.name!r} does not know "
                                 f"{shown(request.name, 40)}; use one of {', '.join(ACTIONS)}")
        try:
            await action(self, request)
        except GPIOZeroError as exc:
            raise HandlerError(f"gpio {self.name}: {exc}") from exc
        return {"on": bool(self.output.value)}

    async def close(self) -> None:
        self.output.close()

    async def _on(self, request: Request) -> None:
        _no_params(request)
        self.output.on()

    async def _off(self, request: Request) -> None:
        _no_params(request)
        self.output.off()

    async def _state(self, request: Request) -> None:
        _no_params(request)

    async def _toggle(self, request: Request) -> None:
        _no_params(request)
        if request.id in self._toggled:
            self.output.value = self._toggled[request.id]
            return
        self.output.toggle()
        self._toggled[request.id] = bool(self.output.value)
        while len(self._toggled) > REMEMBERED_TOGGLES:
            self._toggled.popitem(last=False)

    async def _pulse(self, request: Request) -> None:
        duration = _duration(request.params, self.max_pulse)
        self.output.on()
        try:
            await asyncio.sleep(duration)
        finally:
            self.output.off()


Action = Callable[[GpioHandler, Request], Awaitable[None]]

ACTIONS: dict[str, Action] = {
    "on": GpioHandler._on,
    "off": GpioHandler._off,
    "toggle": GpioHandler._toggle,
    "pulse": GpioHandler._pulse,
    "state": GpioHandler._state,
}


def _no_params(request: Request) -> None:
    if request.params:
        raise InvalidCommand(f"{request.name!r} takes no params, got "
                             f"{shown(sorted(request.params))}")


def _duration(params: dict[str, Any], longest: float) -> float:
    """The pulse length; longer than ``inbound.handler_timeout`` it could never finish."""
    unknown = sorted(set(params) - {"duration"})
    if unknown:
        raise InvalidCommand(f"'pulse' takes only 'duration', got {shown(unknown)}")
    value = params.get("duration", 1.0)
    if not is_number(value):
        raise InvalidCommand(f"params.duration must be a number of seconds, got {shown(value)}")
    if not 0 < value <= longest:
        raise InvalidCommand(f"params.duration must be > 0 and <= {longest:g} (at most "
                             f"{MAX_PULSE:g} and inbound.handler_timeout), got {shown(value)}")
    return float(value)


def _check_panel_pins(key: str, pin: int, gpio: GpioConfig) -> None:
    """A device pin that the status panel also drives is a config error, not a surprise."""
    if not gpio.enabled:
        return
    panel = {"green_led": gpio.green_led, "red_led": gpio.red_led, "amber_led": gpio.amber_led,
             "pause_button": gpio.pause_button, "flush_button": gpio.flush_button}
    panel.update({f"bargraph[{i}]": p for i, p in enumerate(gpio.bargraph)})
    for name, used in panel.items():
        if used == pin:
            raise ConfigError(key, f"pin {pin} is already gpio.{name}")
