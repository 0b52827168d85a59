"""Who may write the queue's files: the service's user must, whoever made them.

systemd gives the unit's ``StateDirectory=`` (``/var/lib/pigateway``) to the service's
user, but not the files in it that another user made: a ``pigateway send`` run as root
before the service's first start (the README's own order) made a ``queue.db`` owned by
root, and the service met "attempt to write a readonly database" at every start, saying
nothing of why. So a producer running as root gives a file it creates to the folder's
owner (:func:`create_for_folder_owner`; SQLite itself gives the ``-wal`` and ``-shm`` a
root process makes to the database file's owner), and a process that cannot write the
file is told whose it is and the ``chown`` that gives it back (:func:`refusal`).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from pathlib import Path

from pigateway.errors import StoreError, StoreReadOnly

#: The queue's files: the database and SQLite's two beside it.
SIDES = ("", "-wal", "-shm")


def create_for_folder_owner(path: Path) -> None:
    """Run as root, make a missing queue file empty and owned by its folder's owner (the
    service's user, in the service's folder), before SQLite creates it as root. Anyone
    else, or a root-owned folder (systemd gives it all to the service's user at its next
    start), leaves it to SQLite."""
    if os.geteuid() != 0:
        return
    real = path.resolve()
    try:
        folder = real.parent.stat()
    except OSError:
        return
    if folder.st_uid == 0:
        return
    try:
        fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create {real}: {exc}") from exc
    try:
        os.fchown(fd, folder.st_uid, folder.st_gid)
    finally:
        os.close(fd)


def check_writable(path: Path) -> None:
    """Raise :func:`refusal` unless this process may read and write each queue file that
    exists (the drainer, at its open: before it loops on a read-only database)."""
    for tail in SIDES:
        side = Path(f"{path}{tail}")
        if side.exists() and not os.access(side, os.R_OK | os.W_OK):
            raise refusal(path, side)
    folder = path.resolve().parent
    if not os.access(folder, os.W_OK | os.X_OK):  # SQLite makes its -wal and -shm there
        raise refusal(path, folder)


def refusal(path: Path, side: Path | None = None) -> StoreError:
    """The error of a queue file this process may not write: whose it is, and the fix.
    Said by the drainer at its open (it runs as the service's user), and for any process
    that met SQLite's "readonly database" (:func:`pigateway.store.connection.translate`):
    the service that was given a root-owned file, or a producer run as the wrong user."""
    if read_only(path):
        return read_only_error(path)
    me = user_name(os.geteuid())
    culprit = side or next((Path(f"{path}{t}") for t in SIDES
                            if _foreign(Path(f"{path}{t}"))), path)
    try:
        st = culprit.stat()
        whose = ownership(st)
    except OSError as exc:
        whose = exc.strerror or str(exc)
    fix = (f"`chown -R {me}: {culprit}`" if culprit.is_dir() else f"`chown {me}: {path}*`")
    return StoreError(
        f"{culprit} cannot be written by user {me} (Permission denied: {whose}); a "
        f"`pigateway send` run as another user (root) before the service's first start "
        f"leaves one. If {me} runs the service, give the queue's files to it: {fix}, then "
        "`systemctl restart pigateway`; else run this as the service's user")


def read_only(path: Path) -> bool:
    """Whether the queue's folder is on a file system that takes no write: mounted read-only,
    or an ext4 that met an error under ``errors=remount-ro`` (an SD card's usual end), which
    newer kernels mark ``emergency_ro`` while the mount still says ``rw``: only a write
    tells, tried by making a nameless file in the folder (``O_TMPFILE``), only ever on an
    error's path. Never by opening the database itself: closing any descriptor of it would
    drop every POSIX lock this process's SQLite connections hold on it."""
    import tempfile  # noqa: PLC0415 - an error's path only: send imports this module

    folder = path.resolve().parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False


def read_only_error(path: Path) -> StoreReadOnly:
    """The error of a queue on a read-only file system: what keeps and what mends it."""
    return StoreReadOnly(f"cannot write {path}: it is on a Read-only file system; the queued "
                      "commands are kept, nothing new is taken and nothing is sent (each "
                      "delivery deletes its rows) until it is writable. An SD card that "
                      "reported errors is remounted read-only until a reboot and an fsck: "
                      "see `dmesg`; else remount it read-write, or point store.path at a "
                      "writable one")


def _foreign(side: Path) -> bool:
    try:
        return side.stat().st_uid != os.geteuid()
    except OSError:
        return False


def ownership(st: os.stat_result) -> str:
    """A file's owner, group and mode in words, as an operator's chown/chmod needs them."""
    return (f"owner {user_name(st.st_uid)}, group {group_name(st.st_gid)}, "
            f"mode {stat.S_IMODE(st.st_mode):04o}")


def user_name(uid: int) -> str:
    """The account name of ``uid``, or the number where it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group name of ``gid``, or the number where it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
