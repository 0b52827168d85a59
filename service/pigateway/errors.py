"""The one exception tree of pigateway.

Every error a caller can act on is a subclass of :class:`PigatewayError` and carries the
facts a person needs to fix it. Errors of sqlite3, aiomqtt/paho and lgpio never escape the
module that talks to them: they are translated here (``raise ... from exc``).
"""

from __future__ import annotations


class PigatewayError(Exception):
    """Root of every error pigateway raises on purpose."""


#: Characters of a config error's key and of its problem at most. A value pasted by mistake
#: (a megabyte of it) is shown by its head and its tail, which say what is allowed: never
#: whole, in a terminal or, at each start of the service, in the journal.
MAX_CONFIG_KEY, MAX_CONFIG_PROBLEM = 200, 1000


def _cut_middle(text: str, limit: int) -> str:
    """``text`` with its middle left out, saying how much, when it is over ``limit``."""
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]}...[{len(text) - 2 * half:,} characters]...{text[-half:]}"


class ConfigError(PigatewayError):
    """The configuration is invalid; the message names the key, the value and what is allowed
    (each cut in the middle past :data:`MAX_CONFIG_KEY` and :data:`MAX_CONFIG_PROBLEM`)."""

    def __init__(self, key: str, problem: str) -> None:
        key = _cut_middle(key, MAX_CONFIG_KEY)
        problem = _cut_middle(problem, MAX_CONFIG_PROBLEM)
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


class InvalidCommand(PigatewayError):
    """A command does not fit the contract (bad device, name, params or ttl)."""


class InvalidJson(InvalidCommand):
    """Text that should be JSON is not (a syntax error, or not UTF-8)."""


class RejectedCommand(InvalidCommand):
    """A command from the broker does not fit the wire contract; it is answered ``rejected``.

    ``command_id`` and ``device`` are set when they could be read, so the answer can name them.
    """

    def __init__(self, reason: str, *, command_id: str | None = None,
                 device: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command_id = command_id
        self.device = device


class StoreError(PigatewayError):
    """The durable store could not do what was asked."""


class StoreConflict(StoreError):
    """A write met a row the file already holds: SQLite's constraint result (a command id
    already queued, a producer key already taken), told by its code, not its words."""


class QueueFull(StoreError):
    """The queue is at ``max_commands`` or ``max_bytes`` and the overflow policy is ``reject``."""


class StoreFull(StoreError):
    """The disk under the store is (nearly) full; queued commands are kept, new ones refused."""


class StoreReadOnly(StoreError):
    """The queue's file system takes no write (an SD card remounted read-only after errors):
    queued commands are kept; nothing new is taken until a reboot (and fsck) or a remount."""


class OlderSchema(StoreError):
    """A read-only look at a queue file the service has not migrated yet met a table or
    column it lacks (``pigateway queue ...`` right after an upgrade)."""


class NewerSchema(StoreError):
    """The queue file has a schema version this pigateway does not know: a newer package
    migrated it (a downgrade). It is refused by every opener and left exactly as it is."""

    def __init__(self, path: object, found: int, known: int) -> None:
        super().__init__(
            f"{path} has schema version {found}, newer than this pigateway knows ({known}): "
            f"a newer pigateway migrated it (a downgrade). It was left as it is; reinstall "
            f"the newer pigateway package (or restore a backup of the queue from before the "
            f"upgrade)")
        self.found = found
        self.known = known


class StoreCorrupt(StoreError):
    """The database file failed its integrity check (it is moved aside, never deleted)."""


class UplinkError(PigatewayError):
    """The MQTT link failed; the uplink reconnects by itself."""


class PacketTooLarge(PigatewayError):
    """One PUBLISH is bigger than the broker's Maximum Packet Size or MQTT allows; it is
    never written (a broker drops the link at it). Not a link error: the message fails
    alone (``too-large``), the link goes on. ``limit`` names the bound it broke."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class LoginRefused(UplinkError):
    """The broker refused our credentials or authorisation: a fault an operator must fix."""


class LinkFault(UplinkError):
    """A connection failure an operator must fix (credentials, TLS); named in ``state.fault``."""


class RetainNotSupported(UplinkError):
    """The broker refused CONNECT for its retained last will (CONNACK 0x9A): connect again
    with an unretained will."""


class ControlError(PigatewayError):
    """A control-socket request failed or the service is not running."""


class ServiceNotRunning(ControlError):
    """No service answers on the control socket."""


class GpioError(PigatewayError):
    """The GPIO panel could not claim its pins (no gpiochip, pin busy or invalid)."""


class HandlerError(PigatewayError):
    """A device handler failed for good: the command's result is ``error``."""


class RetryableHandlerError(HandlerError):
    """A device handler failed for now (busy device, lost link): the command is tried again."""
