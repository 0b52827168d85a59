"""The one pin-factory maker, for the status panel (:mod:`~pigateway.pins.panel`) and the
``gpio`` device handler; its mock pins off a Pi are :mod:`~pigateway.pins.mock`.

``gpio.pin_factory`` means the same for both:

- ``lgpio``: gpiozero's LGPIOFactory (a Pi's gpiochip), or :class:`GpioError`;
- ``mock``: a process-wide MockFactory (``Device.pin_factory``), shared, so every part of
  the service sees the same mock pins and a pin used twice is caught; the one made here is
  :class:`pigateway.pins.mock.BoundedMockFactory`, whose pins remember a bounded history
  (gpiozero's own keep every change: a blinking panel grew ~10 MB an hour);
- ``auto``: lgpio when a gpiochip opens, else the mock, so the service runs (without lights
  or relays) on a machine without GPIO (a container, an emulated Pi OS, an x86 gateway).
  The panel and every gpio device ask: the first fallback is remembered for the process, so
  the journal says it once and ``pigateway status`` shows why (:func:`auto_fallback`).

gpiozero is imported here only when a factory is made: it is slow to import, and the CLI
never needs it.
"""

from __future__ import annotations

import logging
from typing import Any

from pigateway.errors import GpioError

log = logging.getLogger(__name__)

#: What ``auto`` found in this process: ``{"fallback": why}`` once it fell back to mock pins.
_auto: dict[str, str] = {}


def pin_factory(kind: str) -> Any:
    """The gpiozero pin factory for ``gpio.pin_factory`` (``auto``, ``lgpio`` or ``mock``)."""
    if kind == "mock" or (kind == "auto" and "fallback" in _auto):
        return _mock_factory()
    try:
        return _lgpio_factory()
    except GpioError as exc:
        if kind == "lgpio":
            raise
        _auto["fallback"] = str(exc)
        log.warning("no GPIO here (%s); the panel and gpio devices use mock pins", exc)
        return _mock_factory()


def auto_fallback() -> str | None:
    """Why ``auto`` gave mock pins in this process (None: it did not, or was not asked)."""
    return _auto.get("fallback")


def _mock_factory() -> Any:
    from gpiozero import Device  # noqa: PLC0415 (gpiozero is slow to import)
    from gpiozero.pins.mock import MockFactory  # noqa: PLC0415

    from pigateway.pins.mock import BoundedMockFactory  # noqa: PLC0415 (imports gpiozero)

    if not isinstance(Device.pin_factory, MockFactory):  # a test's own MockFactory stays
        Device.pin_factory = BoundedMockFactory()
    return Device.pin_factory


def _lgpio_factory() -> Any:
    try:
        from gpiozero.pins.lgpio import LGPIOFactory  # noqa: PLC0415

        return LGPIOFactory()
    except Exception as exc:  # ImportError, lgpio.error, gpiozero's PinError, OSError ...
        raise GpioError(f"lgpio cannot open a gpiochip: {exc}") from exc
