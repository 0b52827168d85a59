"""Receiving commands from the broker: validate, deduplicate, persist. Nothing runs here.

The uplink awaits :meth:`Inbound.accept` for every message on ``{prefix}/{gateway}/commands``
and acknowledges the message to the broker only after it returned, so a command is on disk
before the broker forgets it. ``accept`` is quick (a parse and one commit) and never raises
for what a message holds: a command that does not fit the contract (including what
``json.loads`` takes but nothing can store: ``1e400``, lone surrogates) is answered
``rejected`` with a bounded reason naming the field, and one without a readable id is logged
and dead-lettered. It raises only when the store cannot record anything now
(:class:`~pigateway.errors.StoreError`: busy, or under ``store.min_free_bytes`` plus room for
the command's result); the message then stays unacknowledged and the uplink tries again.

The parser is :mod:`pigateway.inbound.parse`; the running side is
:mod:`pigateway.inbound.workers`; :meth:`Inbound.run` starts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Self

from pigateway import wire
from pigateway.config import Config
from pigateway.counters import COUNTERS
from pigateway.errors import RejectedCommand, StoreError
from pigateway.handlers import Handler, HandlerFactory
from pigateway.inbound.parse import (
    MANAGE_DEVICE,
    RESULT_ROW_BYTES,
    InboundCommand,
    Limits,
    parse_command,
    parse_manage,
    undecodable_refusal,
)
from pigateway.inbound.workers import WorkerPool, dedupe_horizon
from pigateway.listeners import Throttled
from pigateway.mqtt.packets import Undecodable
from pigateway.store import QueueReader, Store
from pigateway.store.inbox import Entry, outbox_device
from pigateway.text import bounded

#: the journal's LOGGER field, as it was before this module moved into its package
log = logging.getLogger("pigateway.inbound")

# --------------------------------------------------------------------------- receiving


class Inbound:
    """Receives commands (:meth:`accept`) and runs them (:meth:`run`, the worker pool).

    ``factories`` replaces the installed handlers (entry points) by name; tests use it.
    """

    def __init__(self, config: Config, store: Store, *,
                 factories: Mapping[str, HandlerFactory] | None = None,
                 manage: Handler | None = None) -> None:
        self.config = config
        self.store = store
        self.limits = Limits.from_config(config)
        self.pool = WorkerPool(config, store, factories=factories)
        self.manage = manage
        #: a message no result can answer: recorded and counted each, said once a minute
        #: (a cloud app sending garbage must not fill the journal)
        self._dropped = Throttled(log, "dropped a message on the commands topic (no usable "
                                  "id, so no result can answer it; its dead letter is in "
                                  "`pigateway queue ls --dead`): %s")

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Build every device's handler now, so a config error stops the start."""
        await self.pool.open()
        if self.manage is not None:  # the gateway's own lane: closed with the others
            self.pool.handlers[MANAGE_DEVICE] = self.manage

    async def close(self) -> None:
        """Close the handlers; idempotent."""
        await self.pool.close()

    async def run(self) -> None:
        """The worker pool; runs until cancelled."""
        await self.pool.run()

    async def accept(self, payload: bytes) -> None:
        """Validate, deduplicate and persist one message; durable on return.

        Raises only :class:`~pigateway.errors.StoreError` (the store cannot take anything
        now: the message stays unacknowledged and the uplink tries again). Any other failure
        is this message's: it is answered ``rejected`` or dead-lettered, never raised, so
        one message can never end the link or the service.
        """
        if isinstance(payload, Undecodable):  # the MQTT library could not decode it
            await self._refuse(undecodable_refusal(payload, self.limits), payload)
            return
        try:
            command = parse_command(payload, self.limits)
        except RejectedCommand as exc:
            await self._refuse(exc, payload)
            return
        await self._take(command, payload)

    async def accept_manage(self, payload: bytes) -> None:
        """:meth:`accept` for the ``manage`` topic: the same promises, the same inbox (its
        ids deduplicated with the devices' ones), the lane :data:`MANAGE_DEVICE`."""
        if isinstance(payload, Undecodable):
            await self._refuse(RejectedCommand(bounded(payload.describe())), payload)
            return
        try:
            command = parse_manage(payload, self.limits, self.config.manage.allow)
        except RejectedCommand as exc:
            await self._refuse(exc, payload)
            return
        await self._take(command, payload)

    async def _take(self, command: InboundCommand, payload: bytes) -> None:
        try:
            await self._persist(command)
        except StoreError:
            raise
        except Exception as exc:  # a bug or a value the checks missed: this message's failure
            log.exception("command %s could not be stored; it is answered rejected",
                          command.id, extra={"command_id": command.id})
            reason = f"the command could not be stored: {type(exc).__name__}: {bounded(exc)}"
            await self._refuse(RejectedCommand(bounded(reason), command_id=command.id,
                                               device=command.device), payload)

    async def _persist(self, command: InboundCommand) -> None:
        """Insert ``command`` unless it is a repeat; the pool is woken for a new one.

        Concurrent calls keep their order (the insert is queued before the first ``await``)
        and share one commit; the store says whether the id was there before (a repeat).
        """
        # on the gateway clock, which a wall-clock step (NTP at boot) does not move
        expires_at = None if command.ttl is None else self.store.clock.deadline(command.ttl)

        async def receive(*, replace: bool) -> Entry | None:
            return await self.store.inbox.receive(
                command.id, command.device, command.name, command.params,
                expires_at=expires_at, ttl=command.ttl, now=time.time(),
                headroom=self._result_room(), replace=replace)
        held = self.pool.admit(command.id, command.device)  # before the insert is queued
        inserted, started = False, None
        try:
            if held:  # its lane is idle: received already running, one commit for both
                before, started = await self.store.inbox.receive_running(
                    command.id, command.device, command.name, command.params,
                    expires_at=expires_at, ttl=command.ttl, now=time.time(),
                    headroom=self._result_room())
            else:
                before = await receive(replace=False)
            inserted = before is None
            if before is not None and await self._repeat(before):
                return
            if before is not None:  # stale: a new command after all
                await receive(replace=True)
                inserted = True
        finally:
            self.pool.admitted(command.id, command.device, held, inserted=inserted,
                               started=started)
        if started is None:
            self.pool.wake()

    def _result_room(self) -> int:
        """Bytes an accepted command keeps free beyond ``store.min_free_bytes``: room for
        its result (at most ``max_params_bytes``, plus the row around it), so a command is
        refused (left at the broker) rather than run with no room to record its result."""
        return self.config.store.max_params_bytes + RESULT_ROW_BYTES

    async def _repeat(self, entry: Entry) -> bool:
        """Whether ``entry`` (received before) makes this message a repeat within the dedupe
        window; a finished one is answered again with its stored result, an unfinished one
        will answer by itself."""
        window = dedupe_horizon(self.config)
        if entry.state == "done" and entry.done_since() < self.store.clock.now() - window:
            return False
        if entry.state == "done" and entry.result is not None:
            log.info("command %s was received again; its result (%s) is sent again",
                     entry.id, entry.status, extra={"command_id": entry.id})
            await self.store.inbox.answer_again(entry)
        else:
            log.info("command %s was received again while %s; it runs once", entry.id,
                     entry.state, extra={"command_id": entry.id})
        return True

    async def _refuse(self, exc: RejectedCommand, payload: bytes) -> None:
        """Answer ``rejected`` (or dead-letter); if even that fails for a reason other than
        the store, dead-letter it, and if that fails too, log it: the message is dropped
        (acknowledged) rather than ending the link at every delivery."""
        try:
            await self._reject(exc, payload)
            return
        except StoreError:
            raise
        except Exception:
            log.exception("could not answer a rejected message; it is dead-lettered instead")
        try:
            await self.store.inbox.record_unreadable(exc.reason, payload, time.time())
        except StoreError:
            raise
        except Exception:
            log.exception("could not dead-letter a rejected message either; it is dropped")

    async def _reject(self, exc: RejectedCommand, payload: bytes) -> None:
        now = time.time()
        if exc.command_id is None:
            self._dropped.note(bounded(exc.reason))
            COUNTERS.inbound_done("dropped")
            await self.store.inbox.record_unreadable(exc.reason, payload, now)
            return
        entry = await self.store.inbox.find(exc.command_id)
        if entry is not None and await self._repeat(entry):
            return
        if entry is not None:  # stale
            await self.store.inbox.forget(exc.command_id)
        log.warning("rejected command %s: %s", exc.command_id, bounded(exc.reason),
                    extra={"command_id": exc.command_id})
        COUNTERS.inbound_done("rejected")
        document = wire.result_document(exc.command_id, "rejected", exc.reason, now=now,
                                         max_bytes=self.config.store.max_params_bytes)
        device = outbox_device(exc.device)
        await self.store.inbox.reject(exc.command_id, device, document, now=now,
                                      done_on=self.store.clock.now())


async def list_inbox(config: Config, limit: int = 100) -> list[dict[str, Any]]:
    """Pending, running and recently finished commands, for ``pigateway inbox ls``."""
    async with await QueueReader.open(config.store) as reader:  # looks, never creates
        return [{**entry.as_dict(), "expires_at": reader.clock.to_wall(entry.expires_at)}
                for entry in await reader.inbox.listing(limit)]
