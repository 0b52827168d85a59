"""Child process for the power-cut control: ``sync_putter.py DB SYNCHRONOUS COUNT``.

Opens DB as ``pigateway send`` does (the store's ``Producer``), with SQLite's
``synchronous`` forced to SYNCHRONOUS (``off`` is the control: commits that are never
fsynced), puts COUNT commands printing each id once ``put`` returned, then prints ``done``
and waits to be killed with the store open (a close checkpoints, which fsyncs even under
``normal``). Bounded in time in case the parent dies first.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

from pigateway.config import StoreConfig
from pigateway.store import connection
from pigateway.store.producer import Producer

MAX_SECONDS = 60.0


def main(path: Path, synchronous: str, count: int) -> None:
    set_up = connection._set_up

    def forced(conn: sqlite3.Connection, config: StoreConfig) -> sqlite3.Connection:
        conn = set_up(conn, config)
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        return conn

    connection._set_up = forced
    with Producer.open(StoreConfig(path=path, min_free_bytes=0)) as producer:
        for i in range(count):
            command = producer.put(f"dev-{i % 3}", "set", {"i": i})
            os.write(1, f"{command.id}\n".encode())
        # killed here, the store still open: its close would checkpoint (and fsync)
        os.write(1, b"done\n")
        time.sleep(MAX_SECONDS)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
