"""A power cut that drops the page cache: ``lossyfs`` (lossyfs.c beside this file), built
with gcc against libfuse3, mounted over a backing folder.

``kill -9`` and ``cgroup.kill`` keep the kernel's page cache, so every write a killed
process made still reaches the disk. A power cut keeps only what was fsynced. lossyfs keeps
every write, truncate, create, rename and unlink in its own memory until that file (or the
folder) is fsynced, so cutting it (:meth:`LossyMount.cut`) leaves the backing folder holding
exactly what a rebooted machine would find; the model is in lossyfs.c's opening comment.

A cut is: SIGKILL every process using the mount (the caller's own, by PID, before calling
``cut``), then SIGTERM to lossyfs, which stops between two requests, writes nothing pending
and unmounts. The caller then opens the backing folder with the real store.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("lossyfs.c")
MOUNT_TIMEOUT = 10.0
DROPPED = re.compile(rb"^dropped (.+) (\d+) ([01]) ([01])$", re.MULTILINE)


@dataclass(frozen=True)
class Dropped:
    """What a cut threw away in one file: bytes written and not fsynced, whether its size
    was changed and not fsynced, whether its create, rename or unlink was not durable."""

    name: str
    bytes: int
    size: bool
    entry: bool


def unavailable() -> str | None:
    """Why lossyfs cannot run here (None: it can): the reason a test skips with."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (a container without the FUSE device)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    for tool in ("gcc", "pkg-config", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup-env installs gcc, fuse3, libfuse3-dev)"
    if subprocess.run(["pkg-config", "--exists", "fuse3"], check=False).returncode != 0:
        return "libfuse3-dev is not installed (scripts/setup-env installs it)"
    return _try_a_mount()


@functools.cache
def _try_a_mount() -> str | None:
    """Build lossyfs and mount it once: a container may have /dev/fuse and still refuse
    the mount (no CAP_SYS_ADMIN, no setuid fusermount3)."""
    try:
        build()
    except subprocess.CalledProcessError as exc:
        return f"lossyfs.c does not compile: {exc.stderr.decode(errors='replace')[:300]}"
    with tempfile.TemporaryDirectory(prefix="lossyfs-probe-") as folder:
        log = Path(folder) / "log"
        try:
            with LossyMount(Path(folder) / "disk", Path(folder) / "mnt", log):
                pass
        except RuntimeError:
            said = log.read_text(errors="replace").strip()[:300] if log.exists() else ""
            return f"lossyfs cannot mount here: {said or 'no reason given'}"
    return None


def build() -> Path:
    """Compile lossyfs.c once per version of its source; the binary's path."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = Path(tempfile.gettempdir()) / f"pigateway-lossyfs-{digest}" / "lossyfs"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                           capture_output=True, text=True).stdout.split()
    partial = binary.with_name(f"lossyfs.{os.getpid()}")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(partial),
                    str(SOURCE), *flags], check=True, capture_output=True)
    partial.rename(binary)
    return binary


class LossyMount:
    """lossyfs showing ``backing`` at ``mountpoint``, until :meth:`cut`."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path | None = None, *,
                 cut_at_write: int | None = None, strict_names: bool = False) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        #: the power goes right after this write (counted from the mount): every request
        #: after it fails with EIO, and :attr:`powered_off` is set
        self.cut_at_write = cut_at_write
        #: only a folder's fsync makes a create or rename durable (a file's fsync does not)
        self.strict_names = strict_names
        self.powered_off = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self._out: list[bytes] = []
        self._reader: threading.Thread | None = None

    def start(self) -> LossyMount:
        binary = build()
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("LOSSYFS_CUT_AT_WRITE", None)
        env.pop("LOSSYFS_STRICT_NAMES", None)
        if self.strict_names:
            env["LOSSYFS_STRICT_NAMES"] = "1"
        if self.cut_at_write is not None:
            env["LOSSYFS_CUT_AT_WRITE"] = str(self.cut_at_write)
        self.powered_off.clear()
        self._out = []
        err = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen([str(binary), str(self.backing),
                                             str(self.mountpoint)], stdout=subprocess.PIPE,
                                            stderr=err, env=env)
        finally:
            if self.log:
                err.close()  # type: ignore[union-attr]
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.cut()
                raise RuntimeError(f"lossyfs did not mount {self.mountpoint} "
                                   f"(see {self.log})")
            time.sleep(0.01)
        return self

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._out.append(line)
            if line.startswith(b"cut at write "):
                self.powered_off.set()

    def cut(self, timeout: float = 10.0) -> list[Dropped]:
        """The power cut: everything not fsynced is gone, the mount is taken down; what was
        thrown away. Kill the processes using the mount first: a process still inside a
        request is waited for, one that keeps the mount busy is why a lazy unmount follows."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
            if self._reader is not None:
                self._reader.join(timeout)
            assert process.stdout is not None
            process.stdout.close()
        out = b"".join(self._out)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False,
                           capture_output=True)
        return [Dropped(m[1].decode(errors="replace"), int(m[2]), m[3] == b"1", m[4] == b"1")
                for m in DROPPED.finditer(out)]

    def __enter__(self) -> LossyMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cut()
