"""What the service's user will meet: every file the config names, as that user sees it.

``pigateway config check`` is run by an operator, usually as root, who can read anything;
the service runs as the unit's ``User=`` (:data:`SERVICE_USER`). A config of mode 0600
owned by root, a ``password_file`` that is not there, a queue a ``sudo pigateway send``
left owned by root: each passes a check made as root and stops the service. This module
says, from the mode bits, owners and groups along each path, whether the service's user can
do what the service does with each file (read, or read and write), and whether the file
is there at all. ACLs are not read: a file that only an ACL opens is reported.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pigateway.config import Config
from pigateway.errors import ConfigError
from pigateway.store.files import refuse_folder
from pigateway.store.owners import ownership

#: The unit's ``User=`` (systemd/pigateway.service; a test keeps the two equal).
SERVICE_USER: Final = "pigateway"
#: The unit's ``StateDirectory=``: systemd gives it to the service's user at each start.
STATE_DIRECTORY: Final = Path("/var/lib/pigateway")

READ, WRITE, ENTER = 4, 2, 1


@dataclass(frozen=True)
class Account:
    """A user as the kernel checks it: uid, and every group it is in."""

    name: str
    uid: int
    groups: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account | None:
        """The account ``name`` (None: there is none on this machine)."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        name = pwd.getpwuid(uid).pw_name
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))


def may(account: Account, st: os.stat_result, want: int) -> bool:
    """Whether the mode bits of ``st`` give ``account`` every right in ``want``."""
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in account.groups:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def problem(path: Path, account: Account, want: int = READ) -> str | None:
    """Why ``account`` cannot use ``path`` as ``want`` says (None: it can)."""
    for folder in reversed(path.parents):
        try:
            st = folder.stat()
        except OSError as exc:
            return f"{path} cannot be reached ({exc.strerror}: {folder})"
        if not may(account, st, ENTER):
            return (f"user {account.name} cannot enter {folder} ({ownership(st)}), so not "
                    f"{path} either")
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if not may(account, st, want):
        need = "read and write" if want & WRITE else "read"
        return f"user {account.name} cannot {need} {path} ({ownership(st)}): {_fix(path, st, want)}"
    return None




def _fix(path: Path, st: os.stat_result, want: int) -> str:
    if want & WRITE:
        return f"give it to the service, e.g. `chown {SERVICE_USER}: {path}`"
    mode = "750" if stat.S_ISDIR(st.st_mode) else "640"
    return f"e.g. `chgrp {SERVICE_USER} {path} && chmod {mode} {path}`"



def needs(config: Config, *, staged: bool = False) -> list[tuple[str, Path, int]]:
    """(key, path, rights) of every file the service will use: the config itself (unless
    ``staged``: a copy its installer will own and chmod), the secrets and TLS files it names,
    the queue's files that exist, and the folders it writes into that exist."""
    found: list[tuple[str, Path, int]] = []
    if config.source is not None and not staged:
        found.append(("(file)", config.source, READ))
    for section in ("mqtt", "local"):
        link = getattr(config, section)
        named = [("password_file", link.password_file)] + [
            (f"tls.{name}", getattr(link.tls, name))
            for name in ("ca_file", "cert_file", "key_file")]
        found += [(f"{section}.{key}", path, READ) for key, path in named if path is not None]
    store = config.store.path
    found += [("store.path", Path(f"{store}{tail}"), READ | WRITE)
              for tail in ("", "-wal", "-shm") if Path(f"{store}{tail}").exists()]
    if store.parent.is_dir() and store.parent != STATE_DIRECTORY:  # systemd owns that one
        found.append(("store.path", store.parent, READ | WRITE | ENTER))
    textfile = config.metrics.textfile
    if textfile is not None and textfile.parent.is_dir():
        found.append(("metrics.textfile", textfile.parent, WRITE | ENTER))
    return found


def _check_kinds(config: Config) -> None:
    """:class:`ConfigError` for a path that holds what the service cannot use there: a
    folder where it reads or writes a file, anything but a socket at the control socket's."""
    files = [(f"{side}.{key}", path) for side in ("mqtt", "local") for key, path in (
        ("password_file", getattr(config, side).password_file),
        *((f"tls.{name}", getattr(getattr(config, side).tls, name))
          for name in ("ca_file", "cert_file", "key_file")))]
    files.append(("metrics.textfile", config.metrics.textfile))
    for key, path in files:
        if path is not None and path.is_dir():
            raise ConfigError(key, f"{str(path)!r} is a folder; name a file")
    socket = config.control.socket
    if socket.exists() and not socket.is_socket():
        raise ConfigError("control.socket", f"{str(socket)!r} exists and is not a socket (a "
                          "file or a folder is there); the service will not replace it")


def check(config: Config, account: Account, *, staged: bool = False) -> None:
    """:class:`ConfigError` naming every file ``account`` cannot use as the service will."""
    refuse_folder(config.store.path)
    _check_kinds(config)
    problems = [(key, text) for key, path, want in needs(config, staged=staged)
                if (text := problem(path, account, want)) is not None]
    if problems:
        key, first = problems[0]
        rest = "".join(f"; {k}: {text}" for k, text in problems[1:])
        raise ConfigError(key, f"{first}{rest} (the service runs as user {account.name})")


# --------------------------------------------------------------------------- the sandbox

#: Where systemd finds the unit and its drop-ins (``UNIT.d/*.conf``), first match first.
UNIT_DIRS: Final = (Path("/etc/systemd/system"), Path("/run/systemd/system"),
                    Path("/usr/local/lib/systemd/system"), Path("/usr/lib/systemd/system"),
                    Path("/lib/systemd/system"))
UNIT: Final = "pigateway.service"
#: The folders under which systemd makes a ``...Directory=`` of the unit.
_DIRECTORY_ROOTS: Final = {"StateDirectory": "/var/lib", "RuntimeDirectory": "/run",
                           "CacheDirectory": "/var/cache", "LogsDirectory": "/var/log"}
_PRIVATE_TMP: Final = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - named, never used


def unit_settings(dirs: tuple[Path, ...] | None = None) -> dict[str, list[str]] | None:
    """The ``[Service]`` settings of the installed unit and its drop-ins, every value of each
    in order (an empty one resets, as systemd reads it); None when no unit is installed."""
    dirs = UNIT_DIRS if dirs is None else dirs
    unit = next((d / UNIT for d in dirs if (d / UNIT).is_file()), None)
    if unit is None:
        return None
    drop_ins = {p.name: p for d in reversed(dirs) for p in (d / f"{UNIT}.d").glob("*.conf")}
    files = [unit, *sorted(drop_ins.values(), key=lambda p: p.name)]
    settings: dict[str, list[str]] = {}
    for path in files:
        section = ""
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for raw in lines:
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
                key, _, value = line.partition("=")
                values = settings.setdefault(key.strip(), [])
                if value.strip():
                    values.extend(value.split())
                else:
                    values.clear()
    return settings


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path == folder or folder in path.parents for folder in folders)


def sandbox_warnings(config: Config, dirs: tuple[Path, ...] | None = None) -> list[str]:
    """What the installed unit's sandbox will do to the files ``config`` names, which no
    mode bit shows: under ``ProtectSystem=strict`` a folder the unit does not list
    (``StateDirectory=``, ``ReadWritePaths=``, ...) is read-only to the service, and under
    ``PrivateTmp=yes`` ``/tmp`` is the service's own (a queue there is not the one
    ``pigateway send`` writes; a control socket there is one ``status`` cannot reach; a
    textfile there is one node_exporter never reads)."""
    settings = unit_settings(dirs)
    if settings is None:
        return []
    last = {key: values[-1] if values else "" for key, values in settings.items()}
    writable = [Path(root) / name for key, root in _DIRECTORY_ROOTS.items()
                for name in settings.get(key, [])]
    writable += [Path(p.lstrip("-+")) for p in settings.get("ReadWritePaths", [])]
    private_tmp = last.get("PrivateTmp", "no").lower() in ("yes", "true", "on", "1")
    strict = last.get("ProtectSystem", "no").lower() == "strict"
    written = [("store.path", config.store.path, True), ("control.socket",
                                                         config.control.socket, True)]
    if config.metrics.textfile is not None:  # node_exporter reads it
        written.append(("metrics.textfile", config.metrics.textfile, True))
    if config.manage.enabled:
        written.append(("manage.overlay", config.manage.overlay, False))
    out = []
    for key, path, shared in written:
        folder = path.parent
        if private_tmp and shared and _inside(folder, list(_PRIVATE_TMP)):
            out.append(f"{key}: {folder} is the service's own under the unit's PrivateTmp=yes, "
                       "not the one other programs see: use a folder the unit lets it "
                       "write outside the temporary ones (the default is)")
        elif strict and not _inside(folder, writable + (list(_PRIVATE_TMP) if private_tmp
                                                         else [])):
            out.append(f"{key}: {folder} is read-only to the service under the unit's "
                       f"ProtectSystem=strict: add a drop-in with [Service] ReadWritePaths="
                       f"{folder} (e.g. /etc/systemd/system/{UNIT}.d/paths.conf), or use a "
                       "folder the unit already gives it")
    return out
