"""The gateway's own broker into the durable queue (docs/ingest.md): the ingest link
(:mod:`~pigateway.ingest.service`) and what the local mosquitto keeps while pigateway is
away (:mod:`~pigateway.ingest.localbroker`)."""

from pigateway.ingest.service import MODES, Ingest

__all__ = ["MODES", "Ingest"]
