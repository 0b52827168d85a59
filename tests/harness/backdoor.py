"""The store's back doors: raw SQL into a queue file, for tests only.

The store's surface is its verbs (``put``, ``claim``, ``ack``, ``store.inbox.receive``, ...);
nothing of the service writes SQL through it. A test that must set a file up as no verb
would (a table of its own, a row as an old version left it, a sweep of a made-up
statement), or read what no view shows, goes through here, by the same writer, the same
transaction rules and the same durability as the verbs, so what it checks is the store's
own behaviour. The name says what it is: a way round the house's front door.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pigateway.store import Command, Store, puts
from pigateway.store.puts import Statement
from pigateway.store.reading import Reads


async def write(store: Store, statements: Sequence[Statement]) -> None:
    """Run ``statements`` in one durable transaction through the store's writer."""
    await store._call(puts.statements(statements))


async def sweep(store: Store, statement: Statement) -> int:
    """Run a statement that deletes at most ``SWEEP_CHUNK`` rows again and again, each time
    its own commit, until it deletes fewer; the rows deleted."""
    sql, params = statement
    return await store._sweep(lambda conn: conn.execute(sql, params).rowcount, None)


async def read(reads: Reads, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run a read-only query on a store or a reader."""
    return await reads._fetch(sql, params)


async def put_with(store: Store, device: str, name: str, params: dict[str, Any] | None = None,
                   *, also: Sequence[Statement], ttl: float | None = None) -> Command:
    """``store.put``, with ``also`` run in the same transaction as the command's insert."""
    item, then = puts.command(device, name, params, ttl=ttl, kind="action", id=None,
                              priority=None, watch=False, gateway_clock=store.clock, also=also)
    [command] = await store._submit_put([item], then)
    return command
