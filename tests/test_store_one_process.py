"""Several openers of one queue in one process: a Python program that puts through the
API and also reads the queue (``QueueReader``), or opens it twice.

SQLite's locks are POSIX locks, which belong to a process and an inode: closing *any*
descriptor of the file drops every lock the process holds on it, SQLite's too. The
cheap header check opened and closed ``queue.db`` at each open, so a reader opened beside
a producer dropped the producer's lock: another process's close then took the file for
its own, checkpointed and deleted the WAL and its index under the producer, whose next
commits went to a deleted file, lost at the next crash (and any other connection of the
process met "disk I/O error").
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

from harness.service import environment

PROGRAM = Path(__file__).parent / "harness" / "programs" / "reader_beside_producer.py"


def test_a_reader_beside_a_producer_in_one_process_loses_no_put(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    done = subprocess.run([sys.executable, str(PROGRAM), str(db)], capture_output=True,
                          text=True, timeout=60, env=environment(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout.split()
    assert len(printed) == 4
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        kept = {row[0] for row in conn.execute("SELECT id FROM outbox")}
    assert [id_ for id_ in printed if id_ not in kept] == []
