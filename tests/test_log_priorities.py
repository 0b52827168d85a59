"""Priorities mean what the docs say: err and above, an operator must act; a link drop the
service rides out is info or warning. Libraries cannot know what we ride out (paho logs
every reset link at ERROR, "failed to receive on socket: [Errno 104] Connection reset by
peer"), so their records reach the journal under a ceiling.

The link is reset (TCP RST) by a proxy on loopback between the gateway and a real
mosquitto, the way a restarted broker resets it, while the gateway rides it out.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from harness import gateway
from harness.broker import Mosquitto
from harness.netproxy import Proxy
from harness.service import running_gateway
from harness.waits import wait_until
from pigateway.logs import CEILINGS, setup_logging
from pigateway.state import Link

RESETS = 3


@pytest.fixture
def journal_setup() -> Iterator[None]:
    """setup_logging as the service does, put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    setup_logging("info", stream=io.StringIO())
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)
    for name in CEILINGS:
        for flt in list(logging.getLogger(name).filters):
            logging.getLogger(name).removeFilter(flt)


@pytest.mark.usefixtures("journal_setup")
def test_a_library_error_about_the_link_reaches_the_journal_as_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    paho = logging.getLogger("mqtt")
    paho.error("failed to receive on socket: %s", "[Errno 104] Connection reset by peer")
    paho.error("Caught exception in on_message: %s", "a bug of ours")
    paho.warning("There are %d pending publish calls.", 12)
    assert [(r.levelno, r.getMessage()[:24]) for r in caplog.records] == [
        (logging.WARNING, "failed to receive on soc"),
        (logging.ERROR, "Caught exception in on_m"),
        (logging.WARNING, "There are 12 pending pub")]


@pytest.mark.usefixtures("journal_setup")
async def test_a_broker_resetting_the_link_is_ridden_out_below_err(
        folder: object, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    proxy = await Proxy(mosquitto.port).start()
    cfg = gateway.config(folder, port=proxy.port, gpio={"enabled": False},  # type: ignore[arg-type]
                         uplink={"backoff_initial": 0.05, "backoff_max": 0.2,
                                 "backoff_reset": 0.0})
    caplog.set_level(logging.DEBUG, logger="mqtt")
    try:
        async with running_gateway(cfg) as gw:
            for _ in range(RESETS):
                assert await wait_until(lambda: gw.state.link is Link.ONLINE, 10)
                up_since = gw.state.link_since
                proxy.reset()
                assert await wait_until(lambda since=up_since: gw.state.link_since != since, 10)
            assert await wait_until(lambda: gw.state.link is Link.ONLINE, 10)
    finally:
        await proxy.close()
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert loud == [], loud
    resets = [r for r in caplog.records if r.name == "mqtt" and "reset" in r.getMessage()]
    assert resets, "paho said nothing of the resets: the test did not reset the link"


async def test_a_store_that_refuses_a_result_for_a_while_is_a_warning_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        tmp_path: object) -> None:
    """The worker waits the store out, keeping its lane's order: ridden out, so a warning
    when it starts, not an error at every try."""
    from pigateway.errors import StoreError  # noqa: PLC0415
    from pigateway.inbound import workers  # noqa: PLC0415
    from pigateway.store import Store  # noqa: PLC0415

    monkeypatch.setattr(workers, "RECORD_BACKOFF", (0.01, 0.02))
    cfg = gateway.config(tmp_path)  # type: ignore[arg-type]
    refusals = iter(range(5))

    async def write() -> None:
        if next(refusals, None) is not None:
            raise StoreError("database is locked")

    caplog.set_level(logging.DEBUG, logger="pigateway.workers")
    async with await Store.open(cfg.store) as store:
        await workers.WorkerPool(cfg, store)._durably(write, "record the result of c1")
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO], said
    assert "database is locked" in said[0][1]
