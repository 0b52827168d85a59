"""The queue file's life outside SQL: the cheap header check a producer makes, the
drainer's full integrity check, quarantine (moving a bad file aside, never deleting
it), and the drainer lock (one service per queue)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pigateway.config import StoreConfig
from pigateway.errors import ConfigError, StoreCorrupt, StoreError, StoreFull
from pigateway.store import lazylog, owners
from pigateway.store.connection import translate

if TYPE_CHECKING:  # the drainer's, at a quarantine: never a producer's (pigateway send)
    from pigateway.store import salvage

log = lazylog.getLogger("pigateway.store")

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_SIZE = 100


def _read_header(path: Path) -> bytes:
    """The file's first bytes, read through a descriptor this process has open on it
    already when there is one (SQLite's): closing a descriptor of our own would drop every
    POSIX lock the process holds on the file, SQLite's too, and another process's close
    would then delete the WAL under this one's connections (its commits lost at a crash)."""
    held = _open_here(path)
    if held is not None:
        return os.pread(held, HEADER_SIZE, 0)
    with path.open("rb") as handle:
        return handle.read(HEADER_SIZE)


def _open_here(path: Path) -> int | None:
    """A readable descriptor of this process on ``path``'s file (None: none, or no /proc)."""
    st = os.stat(path)
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return None
    for fd in fds:
        try:
            held = os.fstat(fd)
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino) and \
                    fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
                return fd
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
    return None


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
    database, else what is wrong with it. ``PRAGMA integrity_check`` reads every page, so
    only the drainer runs it (once per start), never a producer (once per ``pigateway
    send``). Not ``quick_check``: it does not compare an index with its table, and a row
    whose ``outbox.id`` entry is gone is claimed and sent by ``seq`` but never deleted by
    its ack (sent again at every claim, its attempts never counted); ~40% more time (0.28
    s against 0.20 s at 100,000 rows here; about 1.0 s against 0.6 s of CPU at 1,000,000,
    both reading every page), and the quarantine's salvage reads by rowid."""
    if not path.exists():
        return None
    problem = check_header(path)
    if problem is not None:
        return problem
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
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
    log.critical("queue database %s failed its integrity check (%s); moved it aside as %s; "
                 "every row that could be read is in the fresh queue (the next line says "
                 "how many could not). Look for more with sqlite3 %s .dump (docs/operations.md)",
                 path, why, target, target)
    return target


def _producer_refusal(path: Path, problem: str) -> StoreCorrupt:
    """A producer never moves a queue file: that is the drainer's, under its lock (a
    producer's fresh file could be moved by the next producer, with commands in it)."""
    return StoreCorrupt(
        f"{path} is not a sound queue ({problem}); nothing was queued. The service moves it "
        "aside and starts a fresh queue when it is started or restarted")


def _beside(path: Path, suffix: str) -> Path:
    real = path.resolve()
    return real.with_name(real.name + suffix)


def marker(path: Path) -> Path:
    """``<db>.quarantine``: the drainer found the file bad and is salvaging it; while it is
    there, no producer commits into the file (its rows would be left behind)."""
    return _beside(path, ".quarantine")


def _salvage_paths(path: Path) -> tuple[Path, Path]:
    """The copy being made (``.salvage-partial``) and the one made whole (``.salvaged``)."""
    return _beside(path, ".salvage-partial"), _beside(path, ".salvaged")


def check_as_drainer(config: StoreConfig) -> None:
    """The drainer's check at its open, holding its lock: the full check, and a bad file's
    readable rows salvaged into a new one, then the bad file moved aside and the new one
    put in its place (nothing acknowledged is left behind). It reads every page: the
    service runs it off its event loop.

    The steps, each safe to be cut by a power cut (the next start finishes the work):
    ``.quarantine`` marked (producers refuse from then on) and producers' transactions
    under way waited out; the copy built as ``.salvage-partial``, flushed, renamed
    ``.salvaged``; the bad file moved aside; ``.salvaged`` renamed to the queue's name;
    the mark removed."""
    path = config.path
    _finish_interrupted(path)
    problem = check_integrity(path)
    if problem is not None:
        _mark(path)
        partial, whole = _salvage_paths(path)
        report = _salvage(path, partial, config)
        if partial.exists():
            partial.rename(whole)
            _sync_folder(path)  # whole before the bad file moves: the next start finishes
        quarantine(path, problem)
        _put_in_place(path)
        _say(report)
    with contextlib.suppress(FileNotFoundError):
        marker(path).unlink()


def _mark(path: Path) -> None:
    fd = os.open(marker(path), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_folder(path)


class _Barrier:
    """A producer's transaction that began before the mark commits before the copy reads
    (its rows are copied); one that begins after it sees the mark and refuses. The write
    lock taken once and given back is the line between the two. The connection stays open
    until the copy's read-only one has the file open, and closes first: not being the
    last, it neither checkpoints the damaged file's WAL into it nor deletes it (the bytes
    go aside as they were). A file SQLite cannot lock has no writer to wait for."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=timeout, isolation_level=None)
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _salvage(path: Path, partial: Path, config: StoreConfig) -> salvage.Salvaged:
    """The copy, once producers are waited out; a copy that cannot be written (a full disk)
    stops the start with the damaged file left as it is (moved aside without its rows, the
    commands in it would be stranded)."""
    from pigateway.store import salvage  # noqa: PLC0415 - see the TYPE_CHECKING import

    barrier: _Barrier | None = None
    try:
        barrier = _Barrier(path, config.busy_timeout)
        return salvage.salvage(path, partial, config, barrier.close)
    except (sqlite3.Error, OSError, StoreError) as exc:
        for leftover in (partial, partial.with_name(partial.name + "-wal"),
                         partial.with_name(partial.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        if isinstance(exc, sqlite3.Error):
            exc = translate(exc, partial)  # a full disk is StoreFull, said as such
        kind = StoreFull if isinstance(exc, StoreFull) else StoreError
        raise kind(f"{path} failed its integrity check and its readable rows could not be "
                   f"copied out ({exc}); it was left as it is, and producers refuse it until "
                   "the service starts and finishes the quarantine") from exc
    finally:
        if barrier is not None:
            barrier.close()


def _put_in_place(path: Path) -> None:
    """The salvaged copy (if any was made) becomes the queue."""
    _, whole = _salvage_paths(path)
    if whole.exists():
        whole.rename(path.resolve())
    _sync_folder(path)


def _finish_interrupted(path: Path) -> None:
    """A quarantine a power cut interrupted: a copy that was not made whole is dropped (the
    bad file still has all of it, and is salvaged again); a whole one goes in place of the
    bad file, which goes aside if it was not yet."""
    partial, whole = _salvage_paths(path)
    for leftover in (partial, partial.with_name(partial.name + "-wal"),
                     partial.with_name(partial.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    if whole.exists():
        if path.exists():
            quarantine(path, "its salvage was made before the last start was cut short")
        _put_in_place(path)
        log.warning("finished the quarantine of %s that the last start began: the rows "
                    "salvaged then are the queue now", path)


def _sync_folder(path: Path) -> None:
    """The renames and the mark on disk (a power cut keeps them)."""
    with contextlib.suppress(OSError):
        fd = os.open(path.resolve().parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _say(report: salvage.Salvaged) -> None:
    (log.warning if report.complete else log.error)("quarantine: %s", report.summary())


def check_as_producer(path: Path) -> None:
    """A producer's check at its open: the header only, and a bad file refused, never moved
    (see :func:`_producer_refusal`); so is a file the drainer found bad and is moving."""
    if marker(path).exists():
        raise _quarantine_refusal(path)
    problem = check_header(path)
    if problem is not None:
        raise _producer_refusal(path, problem)


def _quarantine_refusal(path: Path) -> StoreCorrupt:
    return StoreCorrupt(
        f"{path} failed the service's integrity check and is being moved aside (its "
        f"readable rows salvaged into a fresh queue); nothing was queued. Send again once "
        f"the service has started; if it is not running, start it to finish the work "
        f"({marker(path)} is there meanwhile)")


class Identity:
    """The queue file a producer's connection opened, checked in each of its transactions:
    a drainer may have found it bad and moved it aside since (a commit into the moved file
    would print an id nobody drains), or be doing so."""

    def __init__(self, path: Path) -> None:
        """Taken *before* the connection opens the file (a rename between the two then
        refuses, never passes); :meth:`settle` once it is open."""
        self.path = path
        self._marker = marker(path)
        self._inode = _inode(path)

    def settle(self) -> Identity:
        """After the open: a file the connection created itself is the one to keep."""
        if self._inode is None:
            self._inode = _inode(self.path)
        return self

    def check(self) -> None:
        """Raise :class:`StoreCorrupt` unless the file is still the queue and not marked."""
        if self._marker.exists():
            raise _quarantine_refusal(self.path)
        if _inode(self.path) != self._inode:
            raise StoreCorrupt(
                f"{self.path} was moved aside by the service (it failed its integrity check) "
                "after this process opened it; nothing was queued. Send again: the fresh "
                "queue holds every command that could be read")


def identity(path: Path) -> tuple[int, int] | None:
    """The file ``path`` names now, as (device, inode); None when there is none."""
    return _inode(path)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def refuse_folder(path: Path) -> None:
    """:class:`ConfigError` when ``store.path`` names a folder (``/var/lib/pigateway``, not
    the file in it): no start or restart mends that, the config does."""
    if path.is_dir():
        raise ConfigError("store.path", f"{str(path)!r} is a folder; name the queue's file "
                          f"in it, e.g. {str(path / 'queue.db')!r}")


def enter_folder(path: Path, *, drainer: bool) -> int | None:
    """Make the queue's folder (a producer may come before the service ever ran) and, for a
    drainer, take the drainer lock: its file descriptor, else ``None``."""
    refuse_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not drainer:
            owners.create_for_folder_owner(path)
            return None
        owners.check_writable(path)
        return take_drainer_lock(path)
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
