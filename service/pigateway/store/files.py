"""The queue file's life outside SQL: the cheap header check a producer makes, the
drainer's full integrity check, quarantine (moving a bad file aside, never deleting
it), and the drainer lock (one service per queue)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from pathlib import Path

from pigateway.errors import StoreCorrupt, StoreError, StoreFull

log = logging.getLogger("pigateway.store")

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100


def _read_header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(HEADER_SIZE)


def check_header(path: Path) -> str | None:
    """The producer's cheap check: ``None`` when the file is missing, empty or starts with a
    whole SQLite header, else what is wrong with it. Reads 100 bytes, whatever the backlog."""
    try:
        head = _read_header(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if head == b"":
        return None
    if not head.startswith(SQLITE_MAGIC):
        return "not an SQLite database (bad header)"
    if len(head) < HEADER_SIZE:
        return f"truncated: {len(head)} bytes, shorter than an SQLite header"
    return None


def check_integrity(path: Path) -> str | None:
    """The drainer's full check at its open: ``None`` when the file is a sound SQLite
    database, else what is wrong with it. ``PRAGMA quick_check`` reads every page, so only
    the drainer runs it (once per start), never a producer (once per ``pigateway send``)."""
    if not path.exists():
        return None
    problem = check_header(path)
    if problem is not None:
        return problem
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError as exc:
        # a full disk (no room for the -shm), a lock, an I/O error: the file may be sound,
        # and moving a sound queue aside would strand every command in it
        stat = os.statvfs(path.parent)
        full = stat.f_bavail * stat.f_frsize < 1 << 20
        raise (StoreFull if full else StoreError)(
            f"cannot check {path} ({exc}{'; the disk is full' if full else ''}); "
            "it was left as it is") from exc
    except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
        return str(exc)  # "file is not a database": sqlite's words, not Python's class name
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    verdict = "; ".join(str(row[0]) for row in rows[:5])
    return None if verdict == "ok" else verdict


def quarantine(path: Path, why: str) -> Path:
    """Move a bad database (and its -wal/-shm) aside; never delete a user's data.

    Only a drainer calls it, holding the drainer lock, so no second process can check or
    move the file meanwhile: the file renamed is the one that was checked. The real file is
    moved (a symlinked ``store.path`` keeps its link), since SQLite keeps its -wal beside it.
    """
    path = path.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    try:
        # the -wal first: left behind by a crash between the renames, it would be
        # replayed into the fresh file; a main file left behind is just checked again
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        path.rename(target)
    except OSError as exc:
        raise StoreCorrupt(f"{path} failed its integrity check ({why}) and cannot be moved "
                           f"aside: {exc}") from exc
    log.critical("queue database %s failed its integrity check (%s); moved it aside as %s "
                 "and started a fresh queue. Recover commands from it with sqlite3.",
                 path, why, target)
    return target


def _producer_refusal(path: Path, problem: str) -> StoreCorrupt:
    """A producer never moves a queue file: that is the drainer's, under its lock (a
    producer's fresh file could be moved by the next producer, with commands in it)."""
    return StoreCorrupt(
        f"{path} is not a sound queue ({problem}); nothing was queued. The service moves it "
        "aside and starts a fresh queue when it is started or restarted")


def check_as_drainer(path: Path) -> None:
    """The drainer's check at its open, holding its lock: the full check, and a bad file
    moved aside (a fresh queue starts). It reads every page: the service runs it off its
    event loop."""
    problem = check_integrity(path)
    if problem is not None:
        quarantine(path, problem)


def check_as_producer(path: Path) -> None:
    """A producer's check at its open: the header only, and a bad file refused, never moved
    (see :func:`_producer_refusal`)."""
    problem = check_header(path)
    if problem is not None:
        raise _producer_refusal(path, problem)


def enter_folder(path: Path, *, drainer: bool) -> int | None:
    """Make the queue's folder (a producer may come before the service ever ran) and, for a
    drainer, take the drainer lock: its file descriptor, else ``None``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return take_drainer_lock(path) if drainer else None
    except OSError as exc:  # a read-only file system, a folder owned by someone else
        raise StoreError(f"cannot use {path.parent}: {exc}") from exc


def _lock_path(path: Path) -> Path:
    """``<db>.lock`` beside the real file: every name of one queue (a symlink, a relative
    or ``..`` path) takes the same lock."""
    real = path.resolve()
    return real.with_name(real.name + ".lock")


def take_drainer_lock(path: Path) -> int:
    """One drainer per queue: an exclusive, non-blocking lock on ``<db>.lock``."""
    lock_path = _lock_path(path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise StoreError(f"another pigateway service is already draining {path} "
                         f"(it holds {lock_path}); stop it first") from exc
    return fd


def release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
