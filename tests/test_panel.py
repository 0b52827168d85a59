"""The GPIO panel with gpiozero's MockFactory: patterns on the pins, buttons to the loop.

Pins are >= 4: MockFactory's pins 2 and 3 are pulled up like a Pi's I2C pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from harness.broker import Mosquitto
from harness.service import running_gateway
from harness.uplink_helpers import make_config, subscribed
from harness.waits import wait_until
from pigateway import pins
from pigateway.app import Gateway
from pigateway.config import GpioConfig
from pigateway.errors import GpioError
from pigateway.pins import pin_factory
from pigateway.pins.mock import BoundedMockFactory
from pigateway.pins.panel import (
    BLIP,
    BUTTON_ACTIONS,
    FAST,
    OFF,
    ON,
    RULES,
    SLOW,
    Light,
    Panel,
    Show,
    bar_level,
    describe,
    legend,
    pattern_for,
    show_for,
)
from pigateway.state import GatewayState, Link, Refusal, Refuser

GREEN, RED, AMBER, PAUSE, FLUSH = 10, 11, 12, 20, 21
BAR = [13, 14, 15, 16]
CFG = GpioConfig(pin_factory="mock", green_led=GREEN, red_led=RED, amber_led=AMBER,
                 bargraph=BAR, pause_button=PAUSE, flush_button=FLUSH, hold_time=0.3,
                 bounce_time=None)

# (state changes, what the panel must show)
CASES: list[tuple[dict[str, Any], Show]] = [
    ({"link": Link.ONLINE}, Show.ONLINE),
    ({"link": Link.ONLINE, "depth": 40, "draining": True}, Show.DRAINING),
    ({"link": Link.ONLINE, "depth": 3}, Show.DRAINING),
    ({"link": Link.CONNECTING}, Show.CONNECTING),
    ({"link": Link.CONNECTING, "depth": 9}, Show.CONNECTING),
    ({"link": Link.OFFLINE}, Show.CONNECTING),
    ({"link": Link.OFFLINE, "depth": 1204}, Show.QUEUEING),
    ({"link": Link.ONLINE, "paused": True, "depth": 10}, Show.PAUSED),
    ({"link": Link.OFFLINE, "paused": True}, Show.PAUSED),
    ({"link": Link.ONLINE, "paused": True, "fault": "disk full"}, Show.FAULT),
    ({"link": Link.OFFLINE, "fault": "login refused"}, Show.FAULT),
    ({"link": Link.ONLINE, "local": Link.OFFLINE}, Show.LOCAL_DOWN),
    ({"link": Link.ONLINE, "local": Link.CONNECTING}, Show.LOCAL_DOWN),
    ({"link": Link.ONLINE, "local": Link.ONLINE}, Show.ONLINE),
    ({"link": Link.ONLINE, "local": Link.OFFLINE, "depth": 5}, Show.DRAINING),
    ({"link": Link.OFFLINE, "local": Link.OFFLINE}, Show.CONNECTING),
    ({"link": Link.ONLINE, "depth": 3, "refusing": Refusal.DISK_RESERVE}, Show.REFUSING),
    ({"link": Link.OFFLINE, "paused": True, "refusing": Refusal.QUEUE_FULL}, Show.REFUSING),
    ({"link": Link.OFFLINE, "fault": "login refused", "refusing": Refusal.QUEUE_FULL},
     Show.FAULT),
]


def _state(changes: dict[str, Any]) -> GatewayState:
    state = GatewayState()
    refusing = changes.pop("refusing", None)
    state.update(**changes)
    if refusing is not None:
        state.set_refusing(Refuser.QUEUE, refusing, "set by the test")
    return state


@pytest.mark.parametrize(("changes", "show"), CASES)
def test_pattern_of_each_state(changes: dict[str, Any], show: Show) -> None:
    state = _state(dict(changes))
    assert show_for(state) is show
    assert pattern_for(state) == show.value


def test_every_show_is_reachable_and_the_last_rule_catches_all() -> None:
    assert {show for _changes, show in CASES} == set(Show)
    assert [rule.show for rule in RULES].count(Show.CONNECTING) == 1
    assert RULES[-1].when(GatewayState())


def test_patterns_are_distinguishable_with_green_and_red_alone() -> None:
    pairs = {(show.value.green, show.value.red) for show in Show}
    assert len(pairs) == len(Show)


@pytest.mark.parametrize(
    ("depth", "leds", "lit"),
    [(0, 4, 0), (1, 4, 1), (9, 4, 1), (10, 4, 2), (99, 4, 2), (150, 4, 3), (9999, 4, 4),
     (10**6, 4, 4), (5, 0, 0), (-1, 4, 0)],
)
def test_bar_level_is_one_led_per_factor_of_ten(depth: int, leds: int, lit: int) -> None:
    assert bar_level(depth, leds) == lit


def test_a_hold_never_maps_to_anything_but_flush_or_pause() -> None:
    assert set(BUTTON_ACTIONS.values()) == {"toggle pause", "flush"}


# --------------------------------------------------------------------------- on the pins


@dataclass
class Calls:
    """What the buttons asked for, and on which thread it ran."""

    toggles: int = 0
    flushes: int = 0
    threads: set[int] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def toggle(self) -> None:
        self.toggles += 1
        self.threads.add(threading.get_ident())
        self.changed.set()

    def flush(self) -> None:
        self.flushes += 1
        self.threads.add(threading.get_ident())
        self.changed.set()


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
async def panel(calls: Calls) -> AsyncIterator[Panel]:
    # the service's own mock factory (bounded pin history): patterns read from its states
    async with Panel(CFG, GatewayState(), on_toggle_pause=calls.toggle, on_flush=calls.flush,
                     pin_factory=BoundedMockFactory()) as p:
        yield p


def _pin(panel: Panel, number: int) -> Any:
    return panel.pin_factory.pin(number)


async def _until(check: Any, timeout: float = 3.0) -> None:
    assert await wait_until(check, timeout, step=0.01), "condition not reached in time"


async def _assert_light(pin: Any, light: Light) -> None:
    """The pin shows ``light``: steady, or on and off again within one cycle."""
    steady = light.steady
    if steady is not None:
        assert pin.state is steady
        return
    pin.clear_states()
    await _until(lambda: {s.state for s in pin.states[1:]} == {True, False},
                 timeout=light.on + light.off + 1.0)


@pytest.mark.parametrize(("changes", "show"), CASES[:2] + CASES[3:4] + CASES[6:8] + CASES[9:10])
async def test_each_state_shows_its_pattern_on_the_pins(
    panel: Panel, changes: dict[str, Any], show: Show
) -> None:
    panel.state.update(**changes)
    await _until(lambda: panel.shown == show.value)
    pattern = show.value
    await asyncio.gather(
        _assert_light(_pin(panel, GREEN), pattern.green),
        _assert_light(_pin(panel, RED), pattern.red),
        _assert_light(_pin(panel, AMBER), pattern.amber),
    )


async def test_the_bar_graph_follows_the_queue(panel: Panel) -> None:
    bar = [_pin(panel, n) for n in BAR]
    assert [p.state for p in bar] == [False] * 4
    panel.state.update(depth=150)
    await _until(lambda: [p.state for p in bar] == [True, True, True, False])
    panel.state.update(depth=0)
    await _until(lambda: [p.state for p in bar] == [False] * 4)


async def test_active_low_leds_invert_the_pins(calls: Calls) -> None:
    cfg = replace(CFG, active_high=False, amber_led=None, bargraph=[])
    async with Panel(cfg, _state({"link": Link.ONLINE}), on_toggle_pause=calls.toggle,
                     on_flush=calls.flush, pin_factory=MockFactory()) as p:
        assert p.shown == Show.ONLINE.value
        assert _pin(p, GREEN).state is False  # lit = driven low
        assert _pin(p, RED).state is True


async def _press(pin: Any, seconds: float) -> None:
    """Press and release from a worker thread, as a real edge arrives on gpiozero's."""
    await asyncio.to_thread(pin.drive_low)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(pin.drive_high)


async def test_a_press_toggles_pause_on_the_loop_thread(panel: Panel, calls: Calls) -> None:
    await _press(_pin(panel, PAUSE), 0.05)
    await _until(lambda: calls.toggles == 1)
    await _press(_pin(panel, PAUSE), 0.05)
    await _until(lambda: calls.toggles == 2)
    assert calls.flushes == 0
    assert calls.threads == {threading.get_ident()}, "callbacks ran off the event loop"


async def test_holding_the_pause_button_flushes_and_does_not_toggle(panel: Panel,
                                                                    calls: Calls) -> None:
    await _press(_pin(panel, PAUSE), CFG.hold_time + 0.3)
    await _until(lambda: calls.flushes == 1)
    await asyncio.sleep(0.1)
    assert calls.toggles == 0
    assert calls.threads == {threading.get_ident()}


async def test_the_flush_button_flushes(panel: Panel, calls: Calls) -> None:
    await _press(_pin(panel, FLUSH), 0.05)
    await _until(lambda: calls.flushes == 1)
    assert calls.toggles == 0


async def test_a_burst_of_presses_from_threads_all_reach_the_loop(panel: Panel,
                                                                  calls: Calls) -> None:
    pin = _pin(panel, FLUSH)

    def hammer() -> None:
        for _ in range(50):
            pin.drive_low()
            pin.drive_high()

    await asyncio.to_thread(hammer)
    await _until(lambda: calls.flushes == 50)
    assert calls.threads == {threading.get_ident()}


async def test_a_failing_button_action_does_not_stop_the_panel(calls: Calls) -> None:
    def broken() -> None:
        raise RuntimeError("bug")

    async with Panel(CFG, GatewayState(), on_toggle_pause=broken, on_flush=calls.flush,
                     pin_factory=MockFactory()) as p:
        await _press(_pin(p, PAUSE), 0.05)
        await _press(_pin(p, FLUSH), 0.05)
        await _until(lambda: calls.flushes == 1)
        p.state.update(link=Link.ONLINE)
        await _until(lambda: p.shown == Show.ONLINE.value)


async def test_close_is_idempotent_and_releases_the_pins(calls: Calls) -> None:
    factory = MockFactory()
    p = Panel(CFG, GatewayState(), on_toggle_pause=calls.toggle, on_flush=calls.flush,
              pin_factory=factory)
    await p.open()
    await p.aclose()
    await p.aclose()
    async with Panel(CFG, GatewayState(), on_toggle_pause=calls.toggle, on_flush=calls.flush,
                     pin_factory=factory) as again:
        assert again.shown is not None, "the pins were free again"


async def test_pins_in_use_give_a_gpio_error(panel: Panel, calls: Calls) -> None:
    with pytest.raises(GpioError, match="cannot claim"):
        await Panel(CFG, GatewayState(), on_toggle_pause=calls.toggle, on_flush=calls.flush,
                    pin_factory=panel.pin_factory).open()
    panel.state.update(link=Link.ONLINE)
    await _until(lambda: panel.shown == Show.ONLINE.value)


async def test_disabled_gpio_claims_nothing(calls: Calls) -> None:
    factory = MockFactory()
    async with Panel(replace(CFG, enabled=False), GatewayState(), on_toggle_pause=calls.toggle,
                     on_flush=calls.flush, pin_factory=factory) as p:
        p.state.update(link=Link.ONLINE)
        await asyncio.sleep(0.05)
        assert p.shown is None
        assert not factory.pins


def test_auto_falls_back_to_mock_pins_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pins, "_auto", {})  # a new process: nothing decided yet
    try:
        import lgpio  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        pytest.skip("lgpio is installed here; auto would use it")
    with caplog.at_level(logging.WARNING, logger="pigateway.pins"):
        factory = pin_factory("auto")
    assert isinstance(factory, MockFactory)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "mock pins" in warnings[0].getMessage()
    with pytest.raises(GpioError, match="lgpio"):
        pin_factory("lgpio")
    assert isinstance(pin_factory("mock"), MockFactory)


# --------------------------------------------------------------------------- at a real broker


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, port: int, prefix: str, **uplink: Any) -> AsyncIterator[Gateway]:
    """The real service (store, uplink, panel on mock pins) draining to a real broker."""
    cfg = replace(make_config(tmp_path, port, prefix, **uplink), gpio=CFG)
    async with running_gateway(cfg) as gateway:
        await _until(lambda: gateway.state.link is Link.ONLINE, timeout=10)
        yield gateway


@pytest.mark.broker
async def test_the_pause_button_stops_and_restarts_draining_at_a_broker(
    mosquitto: Mosquitto, tmp_path: Path, unique_prefix: str
) -> None:
    async with (subscribed(mosquitto.port, unique_prefix) as sub,
                _gateway(tmp_path, mosquitto.port, unique_prefix) as gateway):
        assert gateway.panel is not None and gateway.store is not None
        pause = _pin(gateway.panel, PAUSE)
        await _press(pause, 0.05)
        await _until(lambda: gateway.state.paused)
        await _until(lambda: gateway.panel is not None and gateway.panel.shown == Show.PAUSED.value)
        command = await gateway.store.put("pump1", "start")
        await asyncio.sleep(1.0)  # unpaused, a 0.05 s batch window would have sent it by now
        assert command.id not in {c.id for c in sub.commands}, "sent while paused"
        await _press(pause, 0.05)
        await _until(lambda: command.id in {c.id for c in sub.commands}, timeout=10)
        assert not gateway.state.paused


@pytest.mark.broker
async def test_holding_the_pause_button_flushes_the_batch_window_at_a_broker(
    mosquitto: Mosquitto, tmp_path: Path, unique_prefix: str
) -> None:
    async with (subscribed(mosquitto.port, unique_prefix) as sub,
                _gateway(tmp_path, mosquitto.port, unique_prefix, batch_delay=30.0) as gateway):
        assert gateway.panel is not None and gateway.store is not None
        command = await gateway.store.put("pump1", "start")
        await asyncio.sleep(0.5)
        assert not sub.commands, "the 30 s batch window is still open"
        await _press(_pin(gateway.panel, PAUSE), CFG.hold_time + 0.3)
        await _until(lambda: command.id in {c.id for c in sub.commands}, timeout=10)
        assert not gateway.state.paused, "a hold flushes, it does not toggle pause"


@pytest.mark.broker
async def test_auto_pins_without_a_gpiochip_are_in_the_state_status_reads(
    mosquitto: Mosquitto, tmp_path: Path, unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real service on pin_factory = "auto" where no gpiochip opens (this machine, a
    container, an emulated Pi OS): it runs, and its state says why the pins are mock."""
    monkeypatch.setattr(pins, "_auto", {})  # a new process: nothing decided yet
    cfg = replace(make_config(tmp_path, mosquitto.port, unique_prefix),
                  gpio=replace(CFG, pin_factory="auto"))
    async with running_gateway(cfg) as gateway:
        if pins.auto_fallback() is None:
            pytest.skip("a gpiochip opens here; auto uses lgpio")
        assert "gpiochip" in (gateway.state.as_dict()["pins"] or "")


def test_the_legend_in_the_docs_is_the_table() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    rows = [line for line in docs.splitlines() if line.startswith("| ")]
    table = rows[rows.index("| state | green | red | amber | meaning |") + 1:][: len(Show)]
    assert table == legend()


@pytest.mark.parametrize(("light", "words"), [(OFF, "off"), (ON, "on"), (SLOW, "blinks 1 Hz"),
                                              (FAST, "blinks 5 Hz"),
                                              (BLIP, "short flash every 1.5 s")])
def test_describe(light: Light, words: str) -> None:
    assert describe(light) == words
