"""The pin factory the service runs on off a Pi (``auto`` without a gpiochip, or ``mock``):
gpiozero's MockFactory, whose pins remember every change they make. The panel blinks for as
long as the gateway is offline or draining, so that memory must be bounded."""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero import LED, Device
from gpiozero.pins.mock import MockFactory

from pigateway import pins
from pigateway.pins import pin_factory

#: Toggles of one LED: a blinking panel's day or so at its fastest pattern.
TOGGLES = 50_000


@pytest.fixture
def production() -> Iterator[Any]:
    """The factory ``pin_factory = "mock"`` gives the service, made afresh."""
    Device.pin_factory = None
    factory = pin_factory("mock")
    yield factory
    factory.reset()
    Device.pin_factory = None


def test_a_blinking_led_on_the_service_factory_keeps_a_bounded_history(production: Any) -> None:
    led = LED(17, pin_factory=production)
    pin = production.pin(17)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(TOGGLES):
            led.toggle()
        led.blink(on_time=0.0001, off_time=0.0001, n=500, background=False)  # gpiozero's own
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        led.close()
    assert len(pin.states) < 1000, f"{len(pin.states)} states kept after {TOGGLES} toggles"
    assert pin.states[-1].state is False  # the blink ended off, and that is remembered
    assert grown < 200_000, f"{grown} bytes more after {TOGGLES} toggles"


def test_the_kept_history_is_the_latest_and_reads_as_gpiozero_s(production: Any) -> None:
    """What tests read of a pin (``states``, slices, ``assert_states``) still works: the
    latest changes, in order."""
    led = LED(18, pin_factory=production)
    pin = production.pin(18)
    for _ in range(5000):
        led.toggle()
    led.on()
    pin.clear_states()
    led.off()
    led.on()
    pin.assert_states([True, False, True])
    assert [s.state for s in pin.states[1:]] == [False, True]
    for _ in range(5001):
        led.toggle()
    assert pin.states[-1].state is False and pin.states[-2].state is True
    led.close()


def test_auto_without_a_gpiochip_gives_the_same_factory(production: Any) -> None:
    try:
        import lgpio  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        pytest.skip("lgpio is installed here; auto would use it")
    assert pin_factory("auto") is production
    assert isinstance(production, MockFactory)


def test_auto_without_a_gpiochip_says_so_once_for_the_panel_and_every_device(
    production: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The panel and each gpio device ask for the pins: the journal says once that there is
    no gpiochip, and why stays known (``pigateway status`` shows it)."""
    monkeypatch.setattr(pins, "_auto", {})  # a new process: nothing decided yet
    with caplog.at_level(logging.WARNING, logger="pigateway.pins"):
        factories = [pin_factory("auto") for _ in range(3)]  # the panel, two gpio devices
    reason = pins.auto_fallback()
    if reason is None:
        pytest.skip("a gpiochip opens here; auto uses lgpio")
    assert all(factory is production for factory in factories)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "mock pins" in warnings[0] and "gpiochip" in reason
