"""Commands from the broker: parsed (:mod:`~pigateway.inbound.parse`), received and
persisted (:mod:`~pigateway.inbound.service`), run per device
(:mod:`~pigateway.inbound.workers`). Their rows and SQL are the store's
(:mod:`pigateway.store.inbox`); their result document is the wire's
(:func:`pigateway.wire.result_document`)."""

from pigateway.inbound.parse import (
    MANAGE_DEVICE,
    InboundCommand,
    Limits,
    parse_command,
    parse_manage,
    readable_id,
)
from pigateway.inbound.service import Inbound, list_inbox

__all__ = ["MANAGE_DEVICE", "Inbound", "InboundCommand", "Limits", "list_inbox",
           "parse_command", "parse_manage", "readable_id"]
