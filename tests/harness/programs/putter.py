"""Child process for the crash tests: put commands in a loop, printing each id once durable.

``putter.py DB PRODUCERS [COUNT [PAUSE]]`` opens DB as a producer and runs PRODUCERS
concurrent loops (of COUNT puts each, if given, PAUSE seconds apart), so puts share group
commits. Each id is written to
stdout with one ``os.write`` (atomic on a pipe) only after ``put`` returned. The parent
kills this process with SIGKILL at a random moment; every id it saw must then be in the
store exactly once. Bounded in count and time in case the parent dies first.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from pigateway.config import StoreConfig
from pigateway.store import Store

MAX_PUTS = 200_000
MAX_SECONDS = 60.0


async def produce(store: Store, number: int, count: int, deadline: float,
                  pause: float) -> None:
    for i in range(count):
        if time.monotonic() > deadline:
            return
        command = await store.put(f"dev-{number}", "set", {"producer": number, "i": i,
                                                           "pad": "x" * 100})
        os.write(1, f"{command.id}\n".encode())
        if pause:
            await asyncio.sleep(pause)


async def main(path: Path, producers: int, count: int, pause: float) -> None:
    deadline = time.monotonic() + MAX_SECONDS
    config = StoreConfig(path=path, min_free_bytes=0)
    async with await Store.open(config, drainer=False) as store:
        await asyncio.gather(*(produce(store, n, count, deadline, pause)
                               for n in range(producers)))


if __name__ == "__main__":
    count = int(sys.argv[3]) if len(sys.argv) > 3 else MAX_PUTS
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), min(count, MAX_PUTS), pause))
