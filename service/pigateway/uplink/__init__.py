"""The uplink: the store drained to the broker over one MQTT connection kept up forever.

The rooms: :mod:`~pigateway.uplink.supervisor` (the reconnect loop, one session per link),
:mod:`~pigateway.uplink.drain` (``Drain``: batches onto the link, PUBACK-gated deletes,
refusals, splits, the packet limit), :mod:`~pigateway.uplink.inflight` (the in-flight
ledger), :mod:`~pigateway.uplink.batching` (the batch rules, pure),
:mod:`~pigateway.uplink.intake` (inbound commands, acked in order),
:mod:`~pigateway.uplink.announcer` (the retained state), :mod:`~pigateway.uplink.pacing`
(the publish token buckets), :mod:`~pigateway.uplink.store_calls` (store calls patient with
a busy store), :mod:`~pigateway.uplink.ahead` (the rows claimed ahead, one queue per
device).
"""

from pigateway.uplink.supervisor import (
    BATCH_MEMBERS,
    BrokerBusy,
    LinkLost,
    OnCommand,
    Uplink,
    reconnect_policy,
)

__all__ = ["BATCH_MEMBERS", "BrokerBusy", "LinkLost", "OnCommand", "Uplink", "reconnect_policy"]
