"""Claims against a naive oracle over random histories: every verb that moves a row.

The claim reads on from a cursor per lane (:mod:`pigateway.store.claims`). Here a seeded
random history of puts (three lanes, some with a short ttl), claims, acks, releases, nacks,
charges, dead letters, requeues of the dead and the gateway clock jumping past ttls runs
against a real file, and every claim must return exactly what a claim reading from the head
would: the first unclaimed rows in (priority, seq) order, the expired ones left out.
"""

from __future__ import annotations

import random
import sqlite3

import pytest

from pigateway.config import StoreConfig
from pigateway.store import NewCommand, Store

PRIORITIES = ("high", "normal", "low", None)


def naive_claim(path: str, limit: int, now: float) -> list[str]:
    """The first ``limit`` unclaimed live rows in claim order, read from the head."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT id, expires_at FROM outbox WHERE seq NOT IN "
                            "(SELECT seq FROM inflight) ORDER BY priority, seq").fetchall()
    return [id_ for id_, expires in rows if expires is None or expires > now][:limit]


@pytest.mark.parametrize("seed", range(6))
async def test_every_claim_is_what_a_claim_from_the_head_would_be(
        store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    config = store_config.replace(max_attempts=3)
    async with await Store.open(config) as store:
        offset = [0.0]
        real_now = store.clock.now
        monkeypatch.setattr(store.clock, "now", lambda: real_now() + offset[0])
        in_flight: list[str] = []
        for step in range(150):
            op = rng.choices(["put", "claim", "ack", "release", "nack", "charge", "dead",
                              "requeue", "clock"], [6, 6, 3, 2, 2, 1, 1, 1, 1])[0]
            pick = rng.sample(in_flight, rng.randint(0, len(in_flight))) if in_flight else []
            if op == "put":
                await store.put_many([NewCommand(
                    rng.choice(["a", "b", "c"]), "set", {"step": step},
                    priority=rng.choice(PRIORITIES), ttl=rng.choice([None, None, 5.0]))
                    for _ in range(rng.randint(1, 6))])
            elif op == "claim":
                limit = rng.randint(1, 8)
                expected = naive_claim(str(config.path), limit, store.clock.now())
                got = [c.id for c in await store.claim(limit)]
                assert got == expected, f"step {step}"
                in_flight += got
            elif op == "clock":
                offset[0] += rng.choice([1.0, 10.0])
            elif pick:
                if op == "ack":
                    await store.ack(pick)
                elif op == "release":
                    await store.release(pick)
                elif op == "nack":
                    await store.nack(pick, "test")
                elif op == "charge":
                    await store.charge(pick, "test")
                    continue  # still claimed (the buried ones are gone: a pick of a gone id
                    # is a no-op below)
                elif op == "dead":
                    await store.dead_letter(pick, "rejected-by-broker", "test")
                in_flight = [i for i in in_flight if i not in pick]
            if op == "requeue":
                await store.requeue_dead()
