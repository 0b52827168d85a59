"""The SD card's flush, for the benchmark: a preload shim that adds a fixed delay to every
``fsync``/``fdatasync`` and counts them.

An SD card takes milliseconds to make a write durable where this machine's disk takes
microseconds; whatever a queue gains by batching its commits shows only when a flush costs
what it costs on a Pi. The shim is C, built here with the C compiler (``cc``), and loaded
with ``LD_PRELOAD`` into every process of a run (the bench, the service, the brokers, the
producers), so each side is measured under the same model. Each process counts its own
flushes: :func:`flushes` reads this process's count, and a process that exits normally
appends ``pid count`` to ``$PIBENCH_FLUSH_LOG`` (:func:`flushes_of`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long delay_us = -1;
static unsigned long count;

static void wait_like_a_card(void) {
    if (delay_us < 0) {
        const char *text = getenv("PIBENCH_FSYNC_DELAY_US");
        delay_us = text ? atol(text) : 0;
    }
    __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
    if (delay_us > 0) {
        struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    wait_like_a_card();
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    wait_like_a_card();
    return rc;
}

unsigned long pibench_flushes(void) { return __atomic_load_n(&count, __ATOMIC_RELAXED); }

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("PIBENCH_FLUSH_LOG");
    if (!path || !count) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (fd < 0) return;
    char line[64];
    int n = snprintf(line, sizeof line, "%ld %lu\n", (long)getpid(), count);
    if (n > 0) { ssize_t ignored = write(fd, line, (size_t)n); (void)ignored; }
    close(fd);
}
"""


def build(folder: Path) -> tuple[Path | None, str]:
    """The shim built in ``folder``: (its path, "") or (None, why it could not be built)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) on PATH to build the fsync-delay shim"
    source, library = folder / "flushshim.c", folder / "flushshim.so"
    source.write_text(SOURCE)
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source),
                           "-ldl"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"the shim did not build: {done.stderr.strip()[-500:]}"
    return library, ""


def environment(library: Path, delay_ms: float, log: Path) -> dict[str, str]:
    """The variables that load the shim with ``delay_ms`` per flush into a process tree."""
    return {"LD_PRELOAD": str(library), "PIBENCH_FSYNC_DELAY_US": str(int(delay_ms * 1000)),
            "PIBENCH_FLUSH_LOG": str(log)}


def flushes() -> int:
    """This process's flushes so far (the shim must be preloaded)."""
    counter = ctypes.CDLL(None).pibench_flushes
    counter.restype = ctypes.c_ulong
    return int(counter())


def loaded() -> bool:
    try:
        flushes()
    except AttributeError:
        return False
    return True


def flushes_of(log: Path, pid: int) -> int:
    """The flushes process ``pid`` reported at its exit (0 if it did not)."""
    if not log.exists():
        return 0
    return sum(int(count) for each, count in (line.split() for line in log.read_text().split(
        "\n") if line) if int(each) == pid)
