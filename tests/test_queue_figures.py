"""The queue's figures as the views show them never say commands wait when the broker has
them: ``depth`` (rows in the file, read every ``app.STATS_INTERVAL``) counts a delivered
batch's rows until their delete commits and the next read shows it; ``acked`` counts those
rows meanwhile, so ``depth - acked`` is what still waits or is in flight.

A real gateway in this process, a real mosquitto, a real SQLite file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness.broker import Mosquitto
from harness.service import running_gateway
from harness.uplink_helpers import make_config, subscribed
from harness.waits import wait_until
from pigateway.state import GatewayState, Link
from pigateway.store import NewCommand

PREFIX = "figures"


async def test_rows_the_broker_has_are_never_shown_as_waiting(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    # a batch waits longer than a stats interval: the rows are counted before they go
    cfg = make_config(tmp_path, mosquitto.port, PREFIX, batch_delay=0.7)
    async with subscribed(mosquitto.port, PREFIX) as sub, running_gateway(cfg) as gw:
        assert gw.store is not None
        assert await wait_until(lambda: gw.state.link is Link.ONLINE, 10)
        for round_ in range(3):
            await gw.store.put_many([NewCommand(f"dev{n}", "set", {"round": round_})
                                     for n in range(8)])
            assert await sub.wait_for(8 * (round_ + 1), 10)
            samples = []
            for _ in range(60):  # 0.6 s: longer than a stats interval
                state = gw.state.as_dict()
                samples.append((state["depth"], state.get("acked", 0), state["in_flight"]))
                await asyncio.sleep(0.01)
            waiting = [s for s in samples if s[0] - s[1] > 0 and s[2] == 0]
            assert not waiting, f"shown as waiting after the broker had them: {waiting}"
            assert samples[-1] == (0, 0, 0), samples[-1]


def test_acked_rows_leave_the_count_once_a_read_that_began_after_their_delete_shows_it() -> None:
    state = GatewayState()
    state.set_queue(8, 1.0, 0)
    state.note_acked(8)
    assert state.acked == 8
    before = state.queue_read_begins()  # a read that began before the delete commits
    state.note_deleted(8)
    state.set_queue(8, 1.0, 0, deleted_before=before)  # it still counts the rows
    assert state.acked == 8
    after = state.queue_read_begins()
    state.set_queue(0, None, 0, deleted_before=after)
    assert state.acked == 0
    state.note_acked(3)
    state.set_queue(2, None, 0)  # never more acknowledged rows shown than rows counted
    assert state.acked == 2
