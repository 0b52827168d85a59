"""gpiozero's mock pins with a bounded memory: the pin factory the service runs on off a Pi.

gpiozero's :class:`~gpiozero.pins.mock.MockPin` appends every change of state to its
``states`` list, for tests to read, and never forgets one. Off a Pi (``auto`` without a
gpiochip, containers, x86 gateways, the demo) the service runs on mock pins for months, and
its panel blinks the whole time it is offline or draining: ~10 MB an hour. The pins made here
keep the latest :data:`HISTORY` changes only, in the same list type, so what tests read of a
pin (``states``, slices, ``assert_states``, ``clear_states``) reads as gpiozero's does.

Imported only when :mod:`pigateway.pins` makes a mock factory (gpiozero is slow to import).
"""

from __future__ import annotations

from typing import Final

from gpiozero.pins.mock import MockFactory, MockPin, PinState

#: Changes of state a pin remembers (the latest ones).
HISTORY: Final = 256


class History(list[PinState]):
    """A list that keeps its latest :data:`HISTORY` items: ``append`` drops the oldest."""

    def append(self, item: PinState) -> None:
        super().append(item)
        if len(self) > 2 * HISTORY:  # trim in chunks: amortised O(1) per append
            del self[:len(self) - HISTORY]


class BoundedMockPin(MockPin):  # type: ignore[misc]  # gpiozero is untyped
    """A :class:`MockPin` whose ``states`` is a :class:`History`."""

    states: History

    def clear_states(self) -> None:
        super().clear_states()
        self.states = History(self.states)


class BoundedMockFactory(MockFactory):  # type: ignore[misc]  # gpiozero is untyped
    """gpiozero's :class:`MockFactory` making :class:`BoundedMockPin` pins."""

    def __init__(self, revision: str | None = None) -> None:
        super().__init__(revision=revision, pin_class=BoundedMockPin)
