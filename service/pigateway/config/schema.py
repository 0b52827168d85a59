"""The rules every config section is validated by, and ``[store]``: all ``pigateway send`` reads.

A section's options are its fields: each with a type, a default and a rule (bounds, a
pattern, a line of documentation). :func:`build` checks a TOML table against them, so
every section, this module's or :mod:`~pigateway.config.sections`', is held to the same
checks, and every error names the key, the bad value and what is allowed.

This module imports no :mod:`dataclasses`: ``pigateway send`` loads it alone, and a
dataclass costs its import (``inspect``, ``ast``...) and the code each one compiles, about
a fifth of a send's instructions for the service's 16 sections. :class:`StoreConfig` is
therefore a plain frozen class (:class:`PlainSection`), its options the keyword
parameters of its ``__init__``; the other sections are dataclasses, loaded with the rest.
Its annotations are evaluated as the module loads (no ``from __future__ import
annotations``), so reading a section's options evaluates no annotation text.
"""

import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

from pigateway.errors import ConfigError
from pigateway.inputs import shown, text_problem
from pigateway.wire import profiles

T = typing.TypeVar("T")

DEFAULT_PATH = Path("/etc/pigateway/config.toml")
#: 2**63: TOML's integers (and SQLite's) are signed 64-bit
INT64 = 1 << 63


def rule(*, min: float | None = None, max: float | None = None,
         pattern: re.Pattern[str] | None = None, allowed: str = "", doc: str = ""
         ) -> dict[str, Any]:
    """An option's rule: its bounds, the pattern a text must match (``allowed`` says in
    words what it lets through) and ``doc``, its line in the reference page."""
    return {"min": min, "max": max, "pattern": pattern, "allowed": allowed, "doc": doc}


class Option(NamedTuple):
    """One option of a section, as :func:`build` and the reference page see it."""

    name: str
    hint: Any  # the type, without its rule
    required: bool
    rule: Mapping[str, Any]
    #: the default (for the reference page): a value, or a callable that makes it
    default: Any = None
    factory: bool = False


_OPTIONS: dict[type[Any], tuple[Option, ...]] = {}


def options(cls: type[Any]) -> tuple[Option, ...]:
    """The options of section ``cls``: a dataclass's fields, or the keyword parameters of a
    :class:`PlainSection`'s ``__init__`` (their ``Annotated`` rule beside the type)."""
    found = _OPTIONS.get(cls)
    if found is None:
        found = _OPTIONS[cls] = (_plain_options(cls) if issubclass(cls, PlainSection)
                                 else _dataclass_options(cls))
    return found


def _plain_options(cls: type[Any]) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    defaults = typing.cast(types.FunctionType, cls.__init__).__kwdefaults__ or {}
    found = []
    for name, default in defaults.items():
        hint, *extras = typing.get_args(hints[name])
        found.append(Option(name, hint, False, extras[0] if extras else rule(), default))
    return tuple(found)


def _dataclass_options(cls: type[Any]) -> tuple[Option, ...]:
    import dataclasses  # noqa: PLC0415 - loaded already by the dataclass ``cls``

    hints = typing.get_type_hints(cls)
    found = []
    for fld in dataclasses.fields(cls):
        if fld.default is not dataclasses.MISSING:
            found.append(Option(fld.name, hints[fld.name], False, fld.metadata, fld.default))
        elif fld.default_factory is not dataclasses.MISSING:
            found.append(Option(fld.name, hints[fld.name], False, fld.metadata,
                                fld.default_factory, factory=True))
        else:
            found.append(Option(fld.name, hints[fld.name], True, fld.metadata))
    return tuple(found)


def is_section(hint: Any) -> bool:
    """Whether ``hint`` is a table of options (a section, or a dataclass like ``Config``)."""
    return isinstance(hint, type) and (issubclass(hint, PlainSection)
                                       or hasattr(hint, "__dataclass_fields__"))


class Section:
    """What every ``[section]`` shares: its path options are absolute paths.

    The rule lives here, in the schema, so it holds for each path option there is or will
    be, whether the values come from the TOML file or from a Python caller. A relative path
    names a different file in each working directory: ``pigateway send`` in a shell and the
    service (whose working directory is ``/`` or a runtime folder) would use two queues.
    """

    _section: ClassVar[str]

    def __init_subclass__(cls, *, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section  # set here, not in the body: a dataclass field it is not

    def __post_init__(self) -> None:
        for opt in options(type(self)):
            value = getattr(self, opt.name)
            if value is not None and Path in (opt.hint, *typing.get_args(opt.hint)):
                object.__setattr__(self, opt.name,
                                   absolute_path(f"{self._section}.{opt.name}", value))


class PlainSection(Section, section=""):
    """A section as a plain frozen class: compared, hashed and shown by its options, like a
    frozen dataclass, with :meth:`replace` for ``dataclasses.replace``. A subclass's
    ``__init__`` takes its options as keyword parameters and calls ``self._fill(locals())``."""

    def _fill(self, values: Mapping[str, Any]) -> None:
        for opt in options(type(self)):
            object.__setattr__(self, opt.name, values[opt.name])
        self.__post_init__()

    def _values(self) -> dict[str, Any]:
        return {opt.name: getattr(self, opt.name) for opt in options(type(self))}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked as a new one is)."""
        return type(self)(**{**self._values(), **changes})

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(tuple(self._values().values()))

    def __repr__(self) -> str:
        shown_values = ", ".join(f"{name}={value!r}" for name, value in self._values().items())
        return f"{type(self).__name__}({shown_values})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen section")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen section")


#: Bytes of one name in a path, and of a whole path, at most (Linux's NAME_MAX, and PATH_MAX
#: less its NUL): a longer one passed the validator and then failed every open with an
#: OSError (a traceback from ``config check``, a start failing with exit 1 forever).
NAME_MAX, PATH_MAX = 255, 4095


def absolute_path(key: str, value: str | PurePath) -> Path:
    """``value`` as a :class:`Path`; :class:`ConfigError` naming ``key`` unless absolute."""
    path = Path(value)
    if "\x00" in str(path):
        raise ConfigError(key, f"{str(path)[:200]!r} is not allowed: a path has no NUL")
    if not path.is_absolute():
        raise ConfigError(key, f"{str(path)[:200]!r} is not allowed: a path must be absolute "
                          "(a relative one means another file in each working directory)")
    if not path.name:  # "/": every path option names a file
        raise ConfigError(key, f"{str(path)!r} is not allowed: it names no file")
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        raise ConfigError(key, f"{str(path)!r} is not allowed: the name {too_long[:40]!r}... "
                          f"is {len(os.fsencode(too_long)):,} bytes, over the {NAME_MAX} a "
                          "file system takes")
    if len(os.fsencode(str(path))) > PATH_MAX:
        raise ConfigError(key, f"{str(path)!r} is not allowed: it is "
                          f"{len(os.fsencode(str(path))):,} bytes, over the {PATH_MAX} Linux "
                          "takes")
    return path


class StoreConfig(PlainSection, section="store"):
    """``[store]``: the durable queue on disk."""

    path: Path
    max_commands: int
    max_bytes: int
    overflow: Literal["reject", "drop-oldest"]
    default_ttl: float
    max_attempts: int
    synchronous: Literal["full", "normal"]
    min_free_bytes: int
    max_params_bytes: int
    busy_timeout: float
    max_dead_letters: int
    max_dead_bytes: int
    dead_letter_ttl: float

    def __init__(
        self, *,
        path: Annotated[Path, rule(doc="SQLite file of the queue")]
        = Path("/var/lib/pigateway/queue.db"),
        max_commands: Annotated[int, rule(min=1, doc="queued commands at most")] = 1_000_000,
        max_bytes: Annotated[int, rule(min=1024, doc="queued params bytes at most")]
        = 512 * 1024 * 1024,
        overflow: Annotated[Literal["reject", "drop-oldest"],
                            rule(doc="what a full queue does")] = "reject",
        default_ttl: Annotated[float, rule(min=0, doc="seconds a command lives (0: forever)")]
        = 7 * 24 * 3600.0,
        max_attempts: Annotated[int, rule(min=1, doc="delivery attempts before dead-lettering")]
        = 10,
        synchronous: Annotated[Literal["full", "normal"], rule(
            doc="SQLite synchronous mode; \"normal\" loses at a power cut every command "
            "acknowledged since the last checkpoint (up to ~20 MB of WAL), --id keys too")]
        = "full",
        min_free_bytes: Annotated[int, rule(min=0, doc="disk space always kept free")]
        = 32 * 1024 * 1024,
        max_params_bytes: Annotated[int, rule(min=16, doc="size limit of one command's params")]
        = 64 * 1024,
        busy_timeout: Annotated[float, rule(min=0.1, doc="seconds to wait for another writer")]
        = 10.0,
        max_dead_letters: Annotated[int, rule(
            min=1, doc="dead letters kept at most (the oldest are pruned)")] = 10_000,
        max_dead_bytes: Annotated[int, rule(
            min=1024, doc="params bytes of dead letters kept at most")] = 16 * 1024 * 1024,
        dead_letter_ttl: Annotated[float, rule(
            min=0, doc="seconds a dead letter is kept (0: no age limit)")] = 30 * 24 * 3600.0,
    ) -> None:
        self._fill(locals())


# --------------------------------------------------------------------------- reading


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the config is: the argument, else ``$PIGATEWAY_CONFIG``, else the default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("PIGATEWAY_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def read_toml(where: Path) -> dict[str, Any]:
    """One TOML file as a mapping (not validated); :class:`ConfigError` when unreadable."""
    return toml(read(where), str(where))


def read(where: Path) -> str:
    try:
        return where.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("(file)", f"{where} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("(file)", f"cannot read {where}: {exc}") from exc


def toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(syntax)", f"{origin} is not valid TOML: {exc}") from exc
    except (RecursionError, ValueError) as exc:  # deep nesting; an integer of 5,000 digits
        raise ConfigError("(syntax)", f"{origin} cannot be read: {shown(str(exc), 120)}") \
            from None


def load_store(path: str | os.PathLike[str] | None = None) -> StoreConfig:
    """Only ``[store]`` of the config file, checked as :func:`~pigateway.config.load` checks
    it: all that ``pigateway send`` uses. A mistake in another section is the service's to
    report (it will not start, ``config check`` names it), never a reason to refuse a
    producer's command: the producer could neither queue nor tell its own bad input from it."""
    where = config_path(path)
    data = profiles.with_defaults(read_toml(where))
    return build(StoreConfig, data.get("store", {}), prefix="store.")


# --------------------------------------------------------------------------- the validator


def build(cls: type[T], table: Any, *, prefix: str, skip: frozenset[str] = frozenset()) -> T:
    """Build section ``cls`` from ``table``, checking keys, types and bounds."""
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip(".") or "(top)", f"must be a table, got {_show(table)}")
    known = {opt.name: opt for opt in options(cls) if opt.name not in skip}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            prefix + unknown[0], f"unknown key; allowed here: {', '.join(sorted(known))}"
        )
    values = {}
    for name, opt in known.items():
        key = prefix + name
        if name in table:
            values[name] = _convert(opt.hint, table[name], key, opt.rule)
        elif opt.required:
            raise ConfigError(key, "is required")
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, meta)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(key, f"{_show(value)} is not allowed; use one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {_show(value)}")
        return [_convert(args[0], item, f"{key}[{i}]", meta) for i, item in enumerate(value)]
    if is_section(hint):
        return build(typing.cast(type[Any], hint), value, prefix=key + ".")
    return _scalar(hint, value, key, meta)


def _scalar(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be a whole number, got {_show(value)}")
        if not -INT64 <= value < INT64:  # tomllib reads any size; SQLite binds 64 bits
            raise ConfigError(key, f"{_show(value)} is out of range: TOML's whole numbers "
                              "are 64-bit")
        _check_bounds(value, key, meta)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number (seconds), got {_show(value)}")
        if not math.isfinite(value):  # TOML has nan and inf; no bound check catches nan
            raise ConfigError(key, f"must be a finite number (seconds), got {_show(value)}")
        _check_bounds(value, key, meta)
        return float(value)
    if hint in (str, Path):
        return _text(hint, value, key, meta)
    raise ConfigError(key, f"unsupported type {hint!r}")  # a bug in this module, not in the file


def _text(hint: Any, value: Any, key: str, meta: Mapping[str, Any]) -> Any:
    """A string option: never a control character (no option needs one, and each would end
    up in a topic, a file name, a log line or a broker login)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a non-empty string, got {_show(value)}")
    problem = text_problem(value)
    if problem is not None:
        raise ConfigError(key, f"{shown(value)} {problem}")
    most = meta.get("max")  # a string's: bytes in UTF-8 (what a wire or a file limits)
    if most is not None and len(value.encode()) > most:
        raise ConfigError(key, f"{shown(value)} is {len(value.encode()):,} bytes in UTF-8; "
                          f"the most allowed is {int(most):,}")
    pattern = meta.get("pattern")
    if pattern is not None and not pattern.match(value):
        if meta.get("allowed"):
            raise ConfigError(key, f"{shown(value)} is not {meta['allowed']}")
        raise ConfigError(key, f"{shown(value)} does not match {pattern.pattern}")
    return Path(value) if hint is Path else value


def _check_bounds(value: float, key: str, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(key, f"{value} is too small; the least allowed is {low}")
    if high is not None and value > high:
        raise ConfigError(key, f"{value} is too large; the most allowed is {high}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {shown(value)}"


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: sections as mappings of their options, paths as text."""
    if is_section(type(value)):
        return {opt.name: plain(getattr(value, opt.name)) for opt in options(type(value))}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
