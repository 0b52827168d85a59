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


def check(config: Config, account: Account, *, staged: bool = False) -> None:
    """:class:`ConfigError` naming every file ``account`` cannot use as the service will."""
    problems = [(key, text) for key, path, want in needs(config, staged=staged)
                if (text := problem(path, account, want)) is not None]
    if problems:
        key, first = problems[0]
        rest = "".join(f"; {k}: {text}" for k, text in problems[1:])
        raise ConfigError(key, f"{first}{rest} (the service runs as user {account.name})")
