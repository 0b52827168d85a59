"""Logging to the journal under systemd, readable lines on stderr by hand.

Under systemd (``JOURNAL_STREAM`` names our stderr) every record carries its priority, so
``journalctl -u pigateway -p warning`` shows exactly the warnings and errors, and no
timestamp of ours doubles the journal's. When the journal's native socket is there,
records go to it as datagrams with fields: ``COMMAND_ID``, ``DEVICE``, ``BATCH_ID`` and
``QUEUE_DEPTH`` come from ``extra={"command_id": ..., "device": ..., "batch_id": ...,
"queue_depth": ...}``, so ``journalctl -u pigateway COMMAND_ID=01J...`` tells the story of
one command. Without that socket, lines on stderr get sd-daemon ``<N>`` prefixes.

The native protocol (systemd's "Native Journal Protocol") is a few lines, written here to
keep the dependency list short: ``KEY=value\\n`` per field, or ``KEY\\n`` + 64-bit
little-endian length + bytes + ``\\n`` when the value holds a newline; a datagram too big
for the socket goes as a sealed memfd passed with ``SCM_RIGHTS``.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Final, TextIO

JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
SOCKET_ENV: Final = "PIGATEWAY_JOURNAL_SOCKET"
IDENTIFIER: Final = "pigateway"

LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                 "warning": logging.WARNING, "error": logging.ERROR}

#: A level between INFO and WARNING for what an operator did (remote management's actions).
NOTICE: Final = 25
logging.addLevelName(NOTICE, "NOTICE")

# syslog priorities (sd-daemon(3)): what journalctl -p filters on.
PRIORITIES: Final = (  # (lowest Python level, priority), highest first
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (NOTICE, 5),
    (logging.INFO, 6),
)
DEBUG_PRIORITY: Final = 7

# Libraries whose debug output is per operation: at ``debug`` they would bury our own records.
# They never go below this level.
QUIET: Final = {"asyncio": logging.INFO}

# Library loggers whose records reach the journal, the highest level each gets, and the
# messages that keep theirs. A library cannot know what the service rides out: paho logs
# every reset link at ERROR ("failed to receive on socket: [Errno 104] Connection reset by
# peer") on aiomqtt's logger "mqtt", and the uplink reconnects by itself. err and above
# mean an operator must act, so only what says a bug of ours (an exception in one of our
# callbacks) stays above the ceiling.
CEILINGS: Final = {"mqtt": (logging.WARNING, ("Caught exception in",))}

# record attribute (from ``extra=``) -> journal field
FIELDS: Final = {
    "command_id": "COMMAND_ID",
    "device": "DEVICE",
    "batch_id": "BATCH_ID",
    "queue_depth": "QUEUE_DEPTH",
}

#: Values of one field a journal entry carries at most (then ``<FIELD>_COUNT`` says how
#: many there were): a batch grows with the backlog, and journald refuses a whole entry of
#: more than 1024 fields (since CVE-2018-16865), so a batch's line would be gone.
MAX_FIELD_VALUES: Final = 100
#: Values of one field a line read by hand shows (then how many in all).
SHOWN_VALUES: Final = 3

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_OURS = "_pigateway_handler"


def priority(levelno: int) -> int:
    """The syslog priority of a Python level (CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7)."""
    return next((prio for low, prio in PRIORITIES if levelno >= low), DEBUG_PRIORITY)


def setup_logging(level: str, *, stream: TextIO | None = None) -> None:
    """Configure the root logger for where we run; safe to call again (it replaces itself).

    ``level`` is one of ``debug``, ``info``, ``warning``, ``error``. ``stream`` defaults to
    ``sys.stderr``.
    """
    out = sys.stderr if stream is None else stream
    handler = _handler_for(out)
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if not any(isinstance(h, RecentLines) for h in root.handlers):
        root.addHandler(RECENT)
    threshold = LEVELS.get(level.lower(), logging.INFO)
    root.setLevel(threshold)
    for name, floor in QUIET.items():
        logging.getLogger(name).setLevel(max(threshold, floor))
    for name, (ceiling, kept) in CEILINGS.items():
        library = logging.getLogger(name)
        for stale in [f for f in library.filters if isinstance(f, Ceiling)]:
            library.removeFilter(stale)
        library.addFilter(Ceiling(ceiling, kept))
    # A library's warnings.warn() as a record at warning: bare stderr is read at err under
    # the unit (SyslogLevel=err), where only trouble belongs.
    logging.captureWarnings(True)


class Ceiling(logging.Filter):
    """Lowers a library's records above ``level`` to it, but for messages that start with
    one of ``kept`` (see :data:`CEILINGS`)."""

    def __init__(self, level: int, kept: tuple[str, ...]) -> None:
        super().__init__()
        self.level = level
        self.kept = kept

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > self.level and not str(record.msg).startswith(self.kept):
            record.levelno = self.level
            record.levelname = logging.getLevelName(self.level)
        return True


def _handler_for(out: TextIO) -> logging.Handler:
    if not under_journal(out):
        handler: logging.Handler = logging.StreamHandler(out)
        handler.setFormatter(ReadableFormatter())
        return handler
    path = journal_socket()
    if path.is_socket():
        return JournalHandler(path, fallback=out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(PrefixFormatter())
    return handler


def under_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd gave us (``JOURNAL_STREAM=dev:inode``)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (pytest capture, closed)
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def journal_socket() -> Path:
    """The journal's native socket; ``$PIGATEWAY_JOURNAL_SOCKET`` overrides it for tests."""
    return Path(os.environ.get(SOCKET_ENV) or JOURNAL_SOCKET)


def _extras(record: logging.LogRecord, limit: int) -> dict[str, tuple[list[str], int]]:
    """Journal field -> its first ``limit`` values and how many it has; a list or tuple
    (several commands) gives one per item."""
    found: dict[str, tuple[list[str], int]] = {}
    for attr, name in FIELDS.items():
        value = getattr(record, attr, None)
        if value is None:
            continue
        items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
        found[name] = ([str(item) for item in itertools.islice(items, limit)], len(items))
    return found


def _tag(name: str, values: list[str], count: int) -> str:
    """``command_id=a,b,c`` or, past :data:`SHOWN_VALUES`, ``command_id=a,b,c (500 in all)``."""
    more = f" ({count} in all)" if count > len(values) else ""
    return f"{name.lower()}={','.join(values)}{more}"


# --------------------------------------------------------------------------- formatters


class ReadableFormatter(logging.Formatter):
    """Run by hand: ``2026-11-23 03:00:00 WARNING pigateway.uplink: text [device=pump1]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                         datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record, SHOWN_VALUES)
        if not extras:
            return text
        tags = " ".join(_tag(k, values, count) for k, (values, count) in extras.items())
        first, sep, rest = text.partition("\n")
        return f"{first} [{tags}]{sep}{rest}"


class PrefixFormatter(logging.Formatter):
    """Under systemd without the native socket: ``<4>name: text`` on every line, no time.

    journald splits the stream into lines, and a prefix only counts for its own line, so a
    traceback gets the record's priority on each of its lines.
    """

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


# --------------------------------------------------------------------------- native protocol


def encode_field(name: str, value: str) -> bytes:
    """One field of the native protocol (binary-safe form when the value has a newline)."""
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return name.encode() + b"=" + data + b"\n"
    return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"


def encode_record(record: logging.LogRecord, message: str) -> bytes:
    """The datagram for ``record`` whose formatted text is ``message``."""
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(priority(record.levelno)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
        "THREAD_NAME": record.threadName or "",
    }
    data = b"".join(encode_field(k, v) for k, v in fields.items())
    # A field may repeat: journalctl COMMAND_ID=x matches an entry that names x among others.
    for name, (values, count) in _extras(record, MAX_FIELD_VALUES).items():
        data += b"".join(encode_field(name, v) for v in values)
        if count > len(values):
            data += encode_field(f"{name}_COUNT", str(count))
    return data


class JournalHandler(logging.Handler):
    """Sends records to journald's native socket; falls back to ``<N>`` lines on ``fallback``,
    where records at crit always go (see :meth:`emit`).

    A record is never dropped for want of a journal: if a send fails (journald restarting,
    socket gone) the record is written to the stream systemd gave us, with its priority.
    """

    def __init__(self, path: Path, *, fallback: TextIO) -> None:
        super().__init__()
        self.path = path
        self.setFormatter(logging.Formatter("%(message)s"))
        self._fallback = logging.StreamHandler(fallback)
        self._fallback.setFormatter(PrefixFormatter())
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.CRITICAL:
            # Why the service ends goes by the stream: journald names a datagram's unit
            # from its sender's /proc entry, which a process that exits at once may no
            # longer have (then `journalctl -u pigateway` would not show its last word);
            # a stream's unit is known from when systemd connected it.
            self._fallback.emit(record)
            return
        try:
            data = encode_record(record, self.format(record))
            self._send(data)
        except OSError:
            self._fallback.emit(record)
        except Exception:
            self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, str(self.path))
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Too big for one datagram: journald accepts a sealed memfd instead."""
        fd = os.memfd_create("pigateway-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            fds = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, str(self.path))
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self._fallback.close()
        super().close()


class RecentLines(logging.Handler):
    """This run's last log lines, in memory and bounded (lines and characters a line).

    What the ``logs`` remote verb answers where the journal cannot be read by the service's
    own user (a system journal is readable by root and the systemd-journal group only):
    granting a service every unit's log to show its own would be more than it needs.
    """

    def __init__(self, *, lines: int = 1000, width: int = 1000) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque(maxlen=lines)
        self._width = width
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).replace("\n", " | ")
        except Exception:  # a bad record must not end logging
            return
        self._lines.append(line[: self._width])

    def last(self, count: int) -> list[str]:
        """The last ``count`` lines, oldest first."""
        return list(self._lines)[-count:] if count > 0 else []


#: The one in-memory tail of this process's log (:func:`setup_logging` installs it).
RECENT: Final = RecentLines()
