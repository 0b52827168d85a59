"""pigateway: no device command is ever lost, whatever the network, the power or the SD card does.

The public surface is small: the :class:`~pigateway.store.Store` (a durable command queue),
:func:`~pigateway.config.load` and the error tree. Everything else is the service.
"""

from pigateway.errors import (
    ConfigError,
    InvalidCommand,
    PigatewayError,
    QueueFull,
    StoreCorrupt,
    StoreError,
    StoreFull,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InvalidCommand",
    "PigatewayError",
    "QueueFull",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "__version__",
]
