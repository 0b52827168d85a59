"""Commands to the gateway itself on ``{prefix}/{gateway}/manage`` (docs/operations.md):
the verbs (:mod:`~pigateway.manage.handler`) and ``config-set``'s staged, tried and
rolled-back config (:mod:`~pigateway.manage.remoteconfig`)."""

from pigateway.manage.handler import Manage

__all__ = ["Manage"]
