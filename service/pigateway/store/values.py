"""The store's values: a command as stored, a dead letter, a new command and a queue
snapshot; the check that turns a new command into a row; a command's own ttl."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from pigateway import wire
from pigateway.config import StoreConfig
from pigateway.errors import InvalidCommand
from pigateway.inputs import shown, text_problem, travels
from pigateway.store.ids import new_ids
from pigateway.text import bounded, json_kind

#: The priorities a command can be put with, and the number stored: claimed lowest first.
PRIORITIES: dict[str, int] = {"high": 0, "normal": 1, "low": 2}
#: The one table of row kinds, each with its priority when the put names none: results
#: never wait behind a backlog of actions. A new kind is a row here.
KIND_PRIORITY: dict[str, str] = {"action": "normal", "result": "high", "forward": "normal"}
KINDS = tuple(KIND_PRIORITY)
#: The stored number of each kind's own priority (:func:`priority_number`'s answer when a
#: put names none), looked up once a row.
_KIND_NUMBER: dict[str, int] = {kind: PRIORITIES[name] for kind, name in KIND_PRIORITY.items()}
MAX_NAME = 128
#: The columns :func:`row_to_command` reads, in its order.
COMMAND_COLUMNS = ("seq, id, kind, device, name, params, size, queued_at, expires_at, "
                   "attempts, last_error")


class Command(NamedTuple):
    """One queued command, as stored.

    ``queued_at`` is wall time; ``expires_at`` is on the store's gateway clock
    (:mod:`pigateway.store.clock`), except in :meth:`Store.list_queued`/:meth:`Store.list_dead`,
    which show it as wall time.
    """

    id: str
    device: str
    name: str
    params: dict[str, Any]
    kind: str
    queued_at: float
    expires_at: float | None
    attempts: int
    last_error: str | None
    size: int
    seq: int = 0
    #: ``params`` as stored (``wire.encode``'s compact JSON): a batch puts it on the wire as
    #: it is instead of encoding ``params`` again (None: not known, encode it)
    params_json: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``pigateway queue ls --json``."""
        return {
            "id": self.id, "kind": self.kind, "device": self.device, "name": self.name,
            "params": self.params, "queued_at": self.queued_at, "expires_at": self.expires_at,
            "attempts": self.attempts, "last_error": self.last_error, "size": self.size,
        }


class DeadLetter(NamedTuple):
    """A command that left the queue without delivery, and why."""

    command: Command
    reason: str
    detail: str | None
    dead_at: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.command.as_dict(), "reason": self.reason, "detail": self.detail,
                "dead_at": self.dead_at}


class NewCommand:
    """What a producer hands to :meth:`Store.put_many`: immutable, compared by value.

    A plain class (this module's records are named tuples): ``params`` defaults to a new
    empty object of each command's own, which a named tuple's shared default is not.
    """

    __slots__ = ("device", "id", "kind", "name", "params", "priority", "ttl")

    device: str
    name: str
    params: dict[str, Any]
    ttl: float | None
    kind: str
    id: str | None
    #: "high", "normal" or "low" (:data:`PRIORITIES`); None: the kind's (:data:`KIND_PRIORITY`)
    priority: str | None

    def __init__(self, device: str, name: str, params: dict[str, Any] | None = None, *,
                 ttl: float | None = None, kind: str = "action", id: str | None = None,
                 priority: str | None = None) -> None:
        for slot, value in (("device", device), ("name", name),
                            ("params", {} if params is None else params), ("ttl", ttl),
                            ("kind", kind), ("id", id), ("priority", priority)):
            object.__setattr__(self, slot, value)

    def _values(self) -> tuple[Any, ...]:
        return (self.device, self.name, self.params, self.ttl, self.kind, self.id,
                self.priority)

    def _replace(self, **changes: Any) -> NewCommand:
        """A copy with ``changes``, as a named tuple's ``_replace``."""
        now = dict(zip(("device", "name", "params", "ttl", "kind", "id", "priority"),
                       self._values(), strict=True))
        return NewCommand(**{**now, **changes})

    def __eq__(self, other: object) -> bool:
        if type(other) is not NewCommand:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # params is a dict: not hashable

    def __repr__(self) -> str:
        return (f"NewCommand(device={self.device!r}, name={self.name!r}, "
                f"params={self.params!r}, ttl={self.ttl!r}, kind={self.kind!r}, "
                f"id={self.id!r}, priority={self.priority!r})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a NewCommand is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a NewCommand is immutable")


class Stats(NamedTuple):
    """A snapshot of the queue, read from the rows (never from a cache)."""

    depth: int
    bytes: int
    oldest_age: float | None
    in_flight: int
    dead: dict[str, int]

    @property
    def dead_total(self) -> int:
        return sum(self.dead.values())

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "bytes": self.bytes, "oldest_age": self.oldest_age,
                "in_flight": self.in_flight, "dead": dict(self.dead),
                "dead_total": self.dead_total}




def check_name(label: str, value: object) -> None:
    """A name a caller gave (device, command name, command id, producer key) must be a
    non-empty string of at most :data:`MAX_NAME` characters, no control character, no lone
    surrogate; else :class:`InvalidCommand` naming ``label``. One rule for the CLI, the API
    and every caller, checked before anything is stored or looked up."""
    if (type(value) is str and 0 < len(value) <= MAX_NAME and not value.isspace()
            and travels(value)):
        return  # the rule below, passed, in one scan (every put checks two names)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise InvalidCommand(f"{label} must be a non-empty string of at most {MAX_NAME} "
                             f"characters, got {shown(value)}")
    problem = text_problem(value)
    if problem is not None:
        raise InvalidCommand(f"{label} {shown(value)} {problem}")


def prepare(item: NewCommand, config: StoreConfig, now: float,
            gateway_now: float | None = None) -> tuple[Any, ...]:
    """Check one new command and turn it into a row; raise :class:`InvalidCommand`.

    ``now`` (wall clock) is its ``queued_at``; its ``expires_at`` counts from
    ``gateway_now`` (:mod:`pigateway.store.clock`), so a wall-clock step cannot move it.
    """
    return prepare_many([item], config, now, gateway_now)[0]


def prepare_many(items: Sequence[NewCommand], config: StoreConfig, now: float,
                 gateway_now: float | None = None) -> list[tuple[Any, ...]]:
    """:func:`prepare` of each of ``items``, in order: their rows, or :class:`InvalidCommand`
    for the first bad one, naming its field. The one place that says what a valid command
    is. What a list needs once is done once (its ids, :func:`~pigateway.store.ids.new_ids`), and a
    name the list already passed through :func:`check_name` is not checked again: a
    ``put_many`` of 1,000 rows spent more here than in SQLite's insert."""
    start = now if gateway_now is None else gateway_now
    passed: set[str] = set()  # names that met check_name's rule (exactly str: no lookalikes)
    default_ttl: float | None = None
    rows: list[tuple[Any, ...]] = []
    # an id for every item (one for an item that names its own goes unused: cheaper than
    # counting them first)
    for item, fresh in zip(items, new_ids(len(items)), strict=True):
        device, name, id_, kind = item.device, item.name, item.id, item.kind
        if type(device) is not str or device not in passed:
            _check_new("device", device, passed)
        if type(name) is not str or name not in passed:
            _check_new("command name", name, passed)
        if id_ is not None:
            check_name("command id", id_)
        if kind not in KINDS:
            raise InvalidCommand(f"kind must be one of {KINDS}, got {kind!r}")
        params, size = _params_text(item.params, config)
        if item.ttl is not None:
            ttl = _ttl_seconds(item.ttl)
        else:  # the config's, checked once a list
            if default_ttl is None:
                default_ttl = _ttl_seconds(config.default_ttl)
            ttl = default_ttl
        number = _KIND_NUMBER.get(kind) if item.priority is None else None
        rows.append((fresh if id_ is None else id_, kind, device, name, params, size, now,
                     start + ttl if ttl > 0 else None, ttl,
                     priority_number(item.priority, kind) if number is None else number))
    return rows


def _check_new(label: str, value: object, passed: set[str]) -> None:
    check_name(label, value)
    if type(value) is str:
        passed.add(value)


def _params_text(value: object, config: StoreConfig) -> tuple[str, int]:
    """A command's params as the JSON text stored, and its size in bytes (UTF-8)."""
    if not isinstance(value, dict):
        raise InvalidCommand(f"params must be a JSON object, not {json_kind(value)}")
    try:
        params = wire.encode(value)
        # ASCII is its own length; else a lone surrogate is no UTF-8: UnicodeEncodeError
        size = len(params) if params.isascii() else len(params.encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidCommand(f"params are not JSON: {str(exc)[:200]}") from exc
    if size > config.max_params_bytes:
        raise InvalidCommand(f"params are {size} bytes; the limit is {config.max_params_bytes} "
                             "(store.max_params_bytes)")
    return params, size


def priority_number(priority: str | None, kind: str) -> int:
    """The stored number of ``priority`` (None: the kind's); :class:`InvalidCommand` if unknown."""
    name = KIND_PRIORITY.get(kind, "normal") if priority is None else priority
    if name not in PRIORITIES:
        raise InvalidCommand(f"priority must be one of {', '.join(PRIORITIES)}, got "
                             f"{shown(priority)}")
    return PRIORITIES[name]


def _ttl_seconds(value: Any) -> float:
    """A ttl as finite seconds >= 0; anything else (bool, 10**400, nan) is bad input."""
    if type(value) is float and 0.0 <= value < math.inf:
        return value  # the common case, answered before the general one below
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        seconds = float(value)  # OverflowError for an int too big for a float
    except (TypeError, OverflowError):
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise InvalidCommand(f"ttl must be a number of seconds >= 0, got {shown(value)}")
    return seconds


def row_to_command(row: Sequence[Any]) -> Command:
    """A claimed row, its params decoded and kept as stored (``params_json``) for a batch to
    splice, unless the text holds NaN or Infinity: json.loads takes them, JSON does not, and
    no put writes them (a salvaged or hand-edited file can hold them). Such a row carries
    no stored text, so its params are encoded again and refused as the put refuses them,
    rather than spliced into a batch whose every command a strict consumer then refuses.
    Params that do not read at all raise :class:`Unreadable` (:func:`stored_object`)."""
    seq, id_, kind, device, name, params, size, queued_at, expires_at, attempts, error = row[:11]
    try:
        value = stored_object(params, _STRICT)
        stored = params if type(params) is str else None  # a BLOB: encoded again
    except _NotJson:
        value, stored = stored_object(params), None
    return Command(id_, device, name, value, kind, queued_at, expires_at,
                   attempts, error, size, seq, stored)


def shown_row(row: Sequence[Any]) -> Command:
    """:func:`row_to_command` for a listing: a row whose params cannot be read (the claim
    dead-letters it ``invalid``) is shown with its text, bounded, under ``"unreadable"``,
    rather than failing the whole listing."""
    try:
        return row_to_command(row)
    except Unreadable:
        return row_to_command((*row[:5], json.dumps({"unreadable": shown(row[5], 200)}),
                               *row[6:]))


class _NotJson(Exception):
    """NaN, Infinity or -Infinity in stored params: text json.loads takes, JSON does not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(name)


_DECODER = json.JSONDecoder()
#: :data:`_DECODER` refusing NaN and Infinity (the C scanner calls it for those alone)
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant)


def decode_params(text: str, decoder: json.JSONDecoder = _DECODER) -> Any:
    """``json.loads(text)``, for the compact JSON the queue stores, by json's C scanner
    (``raw_decode``) alone: a drain decodes every row it claims, and json.loads's wrappers
    (and the whitespace they look for) cost twice the scan. Anything the scan does not take whole
    (whitespace, trailing data, bad JSON, a BLOB's bytes) goes through json.loads, its errors
    too."""
    constant = None if decoder is _DECODER else decoder.parse_constant
    try:
        value, end = decoder.raw_decode(text)
    except (ValueError, TypeError):
        return json.loads(text, parse_constant=constant)
    return value if end == len(text) else json.loads(text, parse_constant=constant)


class Unreadable(ValueError):
    """Stored params (or a stored result) that do not read as a JSON object: bit rot on a
    page SQLite reads without complaint, a salvaged or hand-edited file. Its message says
    why, bounded. One row's failure, never every scan's after it: the outbox's claim
    dead-letters such a row, the inbox answers such a command ``rejected``, listings show
    it."""


def stored_object(stored: Any, decoder: json.JSONDecoder = _DECODER) -> dict[str, Any]:
    """A stored JSON object (:func:`decode_params`), or :class:`Unreadable` saying why not:
    a decoder's error (a BLOB's bytes, a cut text, digits past Python's limit, a nesting
    past its recursion limit) or a value that is not an object (which no put writes).
    The one reading of stored params and results, for the outbox and the inbox alike."""
    try:
        value = decode_params(stored, decoder)
    except (ValueError, TypeError, RecursionError) as exc:
        raise Unreadable(bounded(f"{type(exc).__name__}: {exc}", 200)) from None
    if not isinstance(value, dict):
        raise Unreadable(f"stored as {json_kind(value)}, not a JSON object")
    return value


def own_ttl(queued_at: float, expires_at: float | None, ttl: float | None) -> float:
    """The ttl a command was put with (0: never expires). Rows from before the stored ttl
    (schema 3) had both times on the wall clock, so it is their difference."""
    if ttl is not None:
        return float(ttl)
    return 0.0 if expires_at is None else max(0.0, expires_at - queued_at)


def requeued_expiry(ttl: float, gateway_now: float) -> float | None:
    """When a requeued command expires: its own ``ttl`` counted again from the requeue
    (``gateway_now``, on the gateway clock); ``None`` for one that never expires."""
    return gateway_now + ttl if ttl > 0 else None

