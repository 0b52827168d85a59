"""Reading a queue as a cut left it, without changing what the restarted service finds.

An SQLite connection that can write runs the WAL's recovery, checkpoints the WAL into the
database at its close and deletes it: a check that opened the cut's own files so would hand
the restarted service a tidied queue, and the service's own recovery of the WAL a cut left
would never run. So the checks read a copy: the database and its WAL (not the ``-shm``,
which SQLite rebuilds from the WAL, as at a reboot) copied into a folder of their own, the
files the cut left untouched, byte for byte and in their times.
"""
from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def as_found(db: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a copy of ``db`` and its WAL, as they are now (``db`` must exist)."""
    with tempfile.TemporaryDirectory(prefix="found-") as folder:
        copy = Path(folder) / db.name
        shutil.copyfile(db, copy)
        wal = db.with_name(db.name + "-wal")
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            yield conn
