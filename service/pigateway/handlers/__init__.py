"""Device handlers: the small interface every handler implements, and the registry.

A handler runs the commands of one device declared in the config (``[devices.NAME]``,
``handler = "gpio"`` plus its options). Handlers are found through the entry-point group
``pigateway.handlers``, so a user's package adds one by declaring, in its own
``pyproject.toml``::

    [project.entry-points."pigateway.handlers"]
    siren = "mypackage.siren:SirenHandler"

The entry point names a factory called as ``factory(device, config)``; a class whose
``__init__`` takes those two arguments is one. ``docs/handlers.md`` walks through it.

Why handlers must be idempotent: a command that was running when the process died is run
again after the restart (its result was not recorded yet), so running a command twice must
leave the device as running it once would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

from pigateway.config import Config, DeviceConfig, absolute_path
from pigateway.errors import ConfigError, PigatewayError
from pigateway.inputs import shown, text_problem

__all__ = [
    "ENTRY_POINT_GROUP",
    "REQUIRED",
    "Handler",
    "HandlerFactory",
    "Options",
    "Request",
    "available",
    "build",
    "check",
    "is_number",
]

ENTRY_POINT_GROUP = "pigateway.handlers"

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One run of one command, as a handler sees it.

    ``id`` is the command's id from the broker: a handler may use it to make a
    non-idempotent action safe to repeat. ``attempt`` counts from 1 across retries.
    """

    id: str
    device: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1


@runtime_checkable
class Handler(Protocol):
    """What the worker pool calls. Raise :class:`~pigateway.errors.HandlerError` for a
    failure that retrying will not fix, :class:`~pigateway.errors.RetryableHandlerError`
    for one it may, :class:`~pigateway.errors.InvalidCommand` for a command this device
    does not understand (its result is ``rejected``). The return value, if JSON-ready, is
    the ``detail`` of the ``ok`` result."""

    async def run(self, request: Request) -> Any:
        """Run one command against the device."""

    async def close(self) -> None:
        """Release the device; called once at shutdown, must be idempotent."""


HandlerFactory = Callable[[DeviceConfig, Config], Handler]


def available() -> dict[str, HandlerFactory]:
    """The installed handlers by name, loaded lazily from the entry points."""
    found = entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: _lazy(ep.load) for ep in found}


def _lazy(load: Callable[[], Any]) -> HandlerFactory:
    def factory(device: DeviceConfig, config: Config) -> Handler:
        handler: Handler = load()(device, config)
        return handler

    factory.load = load  # type: ignore[attr-defined]  # for check(): the real class
    return factory


def _factory(device: DeviceConfig,
             factories: Mapping[str, HandlerFactory] | None) -> HandlerFactory:
    known = dict(factories) if factories is not None else available()
    factory = known.get(device.handler)
    if factory is None:
        names = ", ".join(sorted(known)) or "(none installed)"
        raise ConfigError(f"devices.{device.name}.handler",
                          f"unknown handler {device.handler!r}; installed: {names}")
    return factory


def build(device: DeviceConfig, config: Config,
          factories: Mapping[str, HandlerFactory] | None = None) -> Handler:
    """Make the handler of ``device``; a bad handler name or option is a :class:`ConfigError`
    naming ``devices.NAME.KEY``."""
    return _factory(device, factories)(device, config)


def check(config: Config, factories: Mapping[str, HandlerFactory] | None = None) -> None:
    """Validate every device's handler name and options without touching a pin or a network
    (for ``pigateway config check``). A handler class may offer ``check(device, config)``;
    one without it is only checked by name here, and fully at the service's start."""
    for device in config.devices.values():
        factory = _factory(device, factories)
        target = factory.load() if hasattr(factory, "load") else factory
        checker = getattr(target, "check", None)
        if callable(checker):
            _run_check(checker, device, config)


def _run_check(checker: Callable[[DeviceConfig, Config], Any], device: DeviceConfig,
               config: Config) -> None:
    """A handler's ``check``: a builtin exception (a third-party handler reading an option
    with ``int()``) becomes a :class:`ConfigError` naming the device, not a traceback."""
    try:
        checker(device, config)
    except PigatewayError:
        raise
    except Exception as exc:
        raise ConfigError(f"devices.{device.name}",
                          f"the {device.handler!r} handler refused its options: "
                          f"{type(exc).__name__}: {shown(str(exc), 200)}") from exc


class Options:
    """Typed access to a device's options; every error names ``devices.NAME.KEY``.

    Call :meth:`finish` after reading them all: a key nobody read is a typo, and an error.
    """

    def __init__(self, device: DeviceConfig) -> None:
        self.device = device
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"devices.{self.device.name}.{name}"

    def _get(self, name: str, default: Any) -> Any:
        self._seen.add(name)
        value = self.device.options.get(name, default)
        if value is _REQUIRED:
            raise ConfigError(self.key(name), "is required")
        return value

    def integer(self, name: str, default: Any = None, *, low: int | None = None,
                high: int | None = None) -> Any:
        value = self._get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.key(name), f"must be a whole number, got {shown(value)}")
        self._bounds(name, value, low, high)
        return value

    def number(self, name: str, default: Any = None, *, low: float | None = None,
               high: float | None = None) -> Any:
        value = self._get(name, default)
        if value is None:
            return None
        if not is_number(value):
            raise ConfigError(self.key(name), f"must be a number, got {shown(value)}")
        self._bounds(name, value, low, high)
        return float(value)

    def text(self, name: str, default: Any = None, *, printable: bool = False) -> Any:
        """A string option. ``printable``: no control character either (a name, a topic or a
        login; a handler that needs ``"\\r\\n"`` in an option leaves it off)."""
        value = self._get(name, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(name), f"must be a non-empty string, got {shown(value)}")
        problem = text_problem(value) if printable else None
        if problem is not None:
            raise ConfigError(self.key(name), f"{shown(value)} {problem}")
        return value

    def path(self, name: str, default: Any = None) -> Any:
        """A file option: an absolute path (the one rule of the config schema), or ``None``."""
        value = self.text(name, default, printable=True)
        return None if value is None else absolute_path(self.key(name), value)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false, got {shown(value)}")
        return value

    def choice(self, name: str, default: T, allowed: Mapping[str, T]) -> T:
        value = self._get(name, None)
        if value is None:
            return default
        if value not in allowed:
            raise ConfigError(self.key(name), f"{shown(value)} is not allowed; use one of "
                              + ", ".join(repr(a) for a in allowed))
        return allowed[value]

    def finish(self) -> None:
        unknown = sorted(set(self.device.options) - self._seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown option for handler "
                              f"{self.device.handler!r}; allowed: {', '.join(sorted(self._seen))}")

    def _bounds(self, name: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise ConfigError(self.key(name), f"{value} is too small; the least allowed is {low}")
        if high is not None and value > high:
            raise ConfigError(self.key(name), f"{value} is too large; the most allowed is {high}")


def is_number(value: Any) -> bool:
    """A finite int or float (JSON/TOML numbers), never a bool. An int is finite however
    large (``math.isfinite`` would raise OverflowError on a 5,000-digit one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


_REQUIRED: Any = object()
REQUIRED: Any = _REQUIRED
"""Pass as ``default`` to make an option mandatory."""
