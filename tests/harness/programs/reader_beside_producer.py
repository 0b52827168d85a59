"""Child process: ``reader_beside_producer.py DB``: a producer and a reader of one queue in
one process, as a Python program that puts and shows the queue's figures may hold them.

Opens DB as a producer (``Store.open(drainer=False)``) and puts one command, opens a
``QueueReader`` beside it, then lets another process open and close the file (as a
``pigateway send`` does), puts three more, printing each id once ``put`` returned, and dies
without closing anything (``os._exit``: a crash, or a power cut's kill): every id printed
must be in the file.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from pigateway.config import StoreConfig
from pigateway.store import QueueReader, Store

OTHER = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM outbox').fetchall(); c.close()")


async def main(path: Path) -> None:
    config = StoreConfig(path=path, min_free_bytes=0)
    store = await Store.open(config, drainer=False)
    os.write(1, f"{(await store.put('d', 'first')).id}\n".encode())
    reader = await QueueReader.open(config)
    await reader.stats()
    other = await asyncio.create_subprocess_exec(sys.executable, "-c", OTHER, str(path))
    if await asyncio.wait_for(other.wait(), 30) != 0:
        raise SystemExit("the other process failed")
    for n in range(3):
        os.write(1, f"{(await store.put('d', 'later', {'n': n})).id}\n".encode())
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
