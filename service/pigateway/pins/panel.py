"""The GPIO panel: status LEDs that show the state across a room, buttons that steer it.

What each state looks like is the data table :data:`RULES` (the legend in
``docs/operations.md`` mirrors it); :func:`pattern_for` reads it, :class:`Panel` shows it.
Every pattern can be told apart with the green and red LEDs alone; an amber LED and a bar
graph of the queue (one LED per factor of ten) are optional.

Buttons: a short press of the pause button toggles pause (draining stops, queueing goes
on); holding it, or pressing the flush button, flushes the batch window and retries the
link at once. No button ever deletes data.

gpiozero calls back from its own threads. Those callbacks only hand the event to the event
loop with ``call_soon_threadsafe``; everything else happens on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pigateway.aio import cancel_and_wait
from pigateway.config import GpioConfig
from pigateway.errors import GpioError
from pigateway.pins import pin_factory
from pigateway.state import GatewayState, Link

#: Named for the journal as operators know it, whichever package holds this module.
log = logging.getLogger("pigateway.panel")

FOLLOW_TICK = 1.0
"""Seconds between re-reads of the state even without a change notification."""


@dataclass(frozen=True)
class Light:
    """How one LED behaves: ``on`` seconds lit then ``off`` seconds dark, repeated."""

    on: float
    off: float

    @property
    def steady(self) -> bool | None:
        """True for always lit, False for always dark, None for blinking."""
        if self.off == 0:
            return True
        if self.on == 0:
            return False
        return None


OFF = Light(on=0, off=1)
ON = Light(on=1, off=0)
SLOW = Light(on=0.5, off=0.5)     # a calm 1 Hz blink
FAST = Light(on=0.1, off=0.1)     # a busy 5 Hz flicker
BLIP = Light(on=0.15, off=1.35)   # a short flash every 1.5 s: "trying"


@dataclass(frozen=True)
class PanelPattern:
    """What the LEDs show for one kind of state."""

    name: str
    green: Light
    red: Light
    amber: Light
    meaning: str


class Show(enum.Enum):
    """The kinds of state the panel tells apart, each with its pattern."""

    FAULT = PanelPattern("fault", OFF, FAST, OFF,
                         "an operator must act: login refused, TLS broken, store not answering")
    REFUSING = PanelPattern("refusing work", OFF, SLOW, ON,
                            "an operator must act: the queue takes no new commands (disk at "
                            "store.min_free_bytes, queue full, store refusing); `pigateway "
                            "status` says which")
    PAUSED = PanelPattern("paused", ON, ON, SLOW,
                          "paused by button or `pigateway pause`: queueing, not draining")
    DRAINING = PanelPattern("online, draining", FAST, OFF, FAST,
                            "online and sending a backlog")
    ONLINE = PanelPattern("online, idle", ON, OFF, OFF, "online, nothing waiting")
    LOCAL_DOWN = PanelPattern("online, local broker down", ON, BLIP, BLIP,
                              "uplink online, nothing waiting; ingest cannot reach the "
                              "gateway's own broker (not a fault: it reconnects)")
    QUEUEING = PanelPattern("offline, queueing", OFF, ON, ON,
                            "no link; commands wait safely on disk")
    CONNECTING = PanelPattern("connecting", OFF, BLIP, OFF,
                              "connecting or backing off, nothing waiting")


@dataclass(frozen=True)
class Rule:
    """``show`` applies when ``when(state)`` holds; the first matching rule wins."""

    show: Show
    when: Callable[[GatewayState], bool]


RULES: tuple[Rule, ...] = (
    Rule(Show.FAULT, lambda s: s.fault is not None),
    Rule(Show.REFUSING, lambda s: s.refusing is not None),
    Rule(Show.PAUSED, lambda s: s.paused),
    Rule(Show.DRAINING, lambda s: s.link is Link.ONLINE and (s.draining or s.depth > 0)),
    Rule(Show.LOCAL_DOWN, lambda s: s.link is Link.ONLINE and s.local not in (None, Link.ONLINE)),
    Rule(Show.ONLINE, lambda s: s.link is Link.ONLINE),
    Rule(Show.QUEUEING, lambda s: s.link is Link.OFFLINE and s.depth > 0),
    Rule(Show.CONNECTING, lambda s: True),
)


def show_for(state: GatewayState) -> Show:
    """Which row of :data:`RULES` applies to ``state``."""
    return next(rule.show for rule in RULES if rule.when(state))


def pattern_for(state: GatewayState) -> PanelPattern:
    """The LED pattern of ``state`` (pure; the table is :data:`RULES`)."""
    return show_for(state).value


def describe(light: Light) -> str:
    """How a person sees ``light``: the words of the legend in ``docs/operations.md``."""
    steady = light.steady
    if steady is not None:
        return "on" if steady else "off"
    if light.on < light.off:
        return f"short flash every {light.on + light.off:g} s"
    return f"blinks {1 / (light.on + light.off):g} Hz"


def legend() -> list[str]:
    """The LED legend as Markdown table rows, in the order the rules are checked."""
    rows = []
    for pattern in (rule.show.value for rule in RULES):
        lights = " | ".join(describe(getattr(pattern, c)) for c in ("green", "red", "amber"))
        rows.append(f"| {pattern.name} | {lights} | {pattern.meaning} |")
    return rows


def bar_level(depth: int, leds: int) -> int:
    """How many bar-graph LEDs light for ``depth`` queued: one per factor of ten.

    0 queued: none; 1-9: one; 10-99: two; ... capped at ``leds``. A log scale because a
    gateway's backlog spans a few commands to a million.
    """
    if depth <= 0 or leds <= 0:
        return 0
    return min(leds, 1 + math.floor(math.log10(depth)))


# --------------------------------------------------------------------------- the panel


class Panel:
    """LEDs and buttons of ``cfg``, following ``state``. An async context manager.

    ``on_toggle_pause`` and ``on_flush`` are called on the event loop, never on a gpiozero
    thread. ``pin_factory`` overrides ``cfg.pin_factory`` (tests pass a MockFactory).
    """

    def __init__(
        self,
        cfg: GpioConfig,
        state: GatewayState,
        *,
        on_toggle_pause: Callable[[], None],
        on_flush: Callable[[], None],
        pin_factory: Any = None,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.pin_factory = pin_factory
        self.shown: PanelPattern | None = None
        self._on_toggle_pause = on_toggle_pause
        self._on_flush = on_flush
        self._leds: dict[str, Any] = {}
        self._bar: Any = None
        self._buttons: list[Any] = []
        self._held: dict[str, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Panel:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def enabled(self) -> bool:
        """Whether the panel drives pins (``gpio.enabled``)."""
        return self.cfg.enabled

    async def open(self) -> None:
        """Claim the pins and start following the state. Raises :class:`GpioError`."""
        if not self.cfg.enabled:
            log.info("GPIO panel disabled (gpio.enabled = false)")
            return
        self._loop = asyncio.get_running_loop()
        if self.pin_factory is None:
            self.pin_factory = pin_factory(self.cfg.pin_factory)
        try:
            self._claim()
        except Exception as exc:  # gpiozero's PinInvalidPin, GPIOPinInUse, lgpio.error ...
            self._release()
            raise GpioError(f"cannot claim the GPIO pins of [gpio]: {exc}") from exc
        self._show(pattern_for(self.state))
        self._task = asyncio.create_task(self._follow(), name="panel")

    async def aclose(self) -> None:
        """Stop following, turn the LEDs off and release the pins (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            await cancel_and_wait(self._task)
        self._release()

    # ---------------------------------------------------------------- pins

    def _claim(self) -> None:
        from gpiozero import LED, Button, LEDBarGraph  # noqa: PLC0415

        cfg, factory = self.cfg, self.pin_factory
        for colour in ("green", "red", "amber"):
            pin = getattr(cfg, f"{colour}_led")
            if pin is not None:
                self._leds[colour] = LED(pin, active_high=cfg.active_high, pin_factory=factory)
        if cfg.bargraph:
            self._bar = LEDBarGraph(*cfg.bargraph, active_high=cfg.active_high,
                                    pin_factory=factory)
        if cfg.pause_button is not None:
            pause = self._button(Button, cfg.pause_button, "pause", hold=True)
            self._buttons.append(pause)
        if cfg.flush_button is not None:
            self._buttons.append(self._button(Button, cfg.flush_button, "flush", hold=False))

    def _button(self, button_class: Any, pin: int, role: str, *, hold: bool) -> Any:
        """A button whose callbacks only post ``(role, event)`` to the loop."""
        button = button_class(pin, pull_up=True, bounce_time=self.cfg.bounce_time,
                              hold_time=self.cfg.hold_time, pin_factory=self.pin_factory)
        button.when_pressed = lambda: self._post(role, "pressed")
        button.when_released = lambda: self._post(role, "released")
        if hold:
            button.when_held = lambda: self._post(role, "held")
        return button

    def _release(self) -> None:
        devices = [*self._buttons, *self._leds.values(), self._bar]
        self._buttons, self._leds, self._bar = [], {}, None
        for device in devices:
            if device is not None:
                with contextlib.suppress(Exception):  # closing is best effort, never fatal
                    device.close()

    # ---------------------------------------------------------------- events (thread -> loop)

    def _post(self, role: str, event: str) -> None:
        """Runs on a gpiozero thread: hand the event over and touch nothing else."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the event is moot
            loop.call_soon_threadsafe(self._on_button, role, event)

    def _on_button(self, role: str, event: str) -> None:
        """Runs on the loop. Pause: press+release toggles, a hold flushes instead."""
        if self._closed:
            return
        action = BUTTON_ACTIONS.get((role, event, self._held.get(role, False)))
        if event in ("pressed", "held"):
            self._held[role] = event == "held"
        if action is not None:
            log.info("button %s %s: %s", role, event, action)
            self._run(action)

    def _run(self, action: str) -> None:
        callback = self._on_toggle_pause if action == "toggle pause" else self._on_flush
        try:
            callback()
        except Exception:
            log.exception("button action %r failed; the panel keeps going", action)

    # ---------------------------------------------------------------- showing the state

    async def _follow(self) -> None:
        seen = self.state.version
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_TICK):  # not wait_for: 3.11's can lose a cancel
                    # since=: a change made while we were showing the last one is not missed
                    seen = await self.state.changed(since=seen)
            self._show(pattern_for(self.state))

    def _show(self, pattern: PanelPattern) -> None:
        if pattern != self.shown:
            for colour, led in self._leds.items():
                _light(led, getattr(pattern, colour))
            self.shown = pattern
        if self._bar is not None:
            leds = len(self.cfg.bargraph)
            self._bar.value = bar_level(self.state.depth, leds) / leds


# (button, event, was it held) -> action. A release after a hold does nothing more.
BUTTON_ACTIONS: dict[tuple[str, str, bool], str] = {
    ("pause", "released", False): "toggle pause",
    ("pause", "held", False): "flush",
    ("flush", "pressed", False): "flush",
}


def _light(led: Any, light: Light) -> None:
    steady = light.steady
    if steady is None:
        led.blink(on_time=light.on, off_time=light.off, background=True)
    elif steady:
        led.on()
    else:
        led.off()
