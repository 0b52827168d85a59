"""Child process: put one command into the store at argv[1] as a producer, print its id."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from pigateway.config import StoreConfig
from pigateway.store import Store


async def main(path: Path) -> None:
    config = StoreConfig(path=path, min_free_bytes=0)
    async with await Store.open(config, drainer=False) as store:
        command = await store.put("other-process", "ping", {"from": "child"})
    print(command.id, flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
