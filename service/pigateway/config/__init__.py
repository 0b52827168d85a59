"""Configuration: one TOML file validated into frozen sections at start.

Where the file is: ``--config FILE``, else ``$PIGATEWAY_CONFIG``, else
``/etc/pigateway/config.toml``. The rooms: :mod:`~pigateway.config.schema` (the one
validator every section is checked by, and ``[store]``: :class:`StoreConfig`,
:func:`load_store`) and :mod:`~pigateway.config.sections` (the service's sections as
dataclasses, the whole :class:`Config`, :func:`load`, the cross-section checks and the
reference page).

The names of :mod:`~pigateway.config.sections` are imported from it on first use, not with
the package: ``pigateway send`` reads ``[store]`` alone, through the store's modules, and
must not pay for the service's sections (dataclasses: their import and the code each one
compiles cost a fifth of a send's instructions).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pigateway.config.schema import (
    DEFAULT_PATH,
    StoreConfig,
    absolute_path,
    config_path,
    load_store,
    read_toml,
)

if TYPE_CHECKING:
    from pigateway.config.sections import (
        HOST_PATTERN,
        LEVEL_TEMPLATE,
        MANAGE_ROOM,
        MANAGE_VERBS,
        MODE_FORWARDS,
        NAME_PATTERN,
        REMOTE_FIELDS,
        TOPIC_PATTERN,
        Config,
        ControlConfig,
        DeviceConfig,
        GpioConfig,
        HomeAssistantConfig,
        InboundConfig,
        IngestRule,
        LocalConfig,
        LocalTlsConfig,
        LogConfig,
        ManageConfig,
        MetricsConfig,
        MqttConfig,
        TlsConfig,
        UplinkConfig,
        fields_reference,
        filter_problem,
        from_dict,
        is_loopback,
        listen_address,
        load,
        merged,
        parse,
        reference_markdown,
    )

__all__ = [
    "DEFAULT_PATH", "HOST_PATTERN", "LEVEL_TEMPLATE", "MANAGE_ROOM", "MANAGE_VERBS",
    "MODE_FORWARDS", "NAME_PATTERN", "REMOTE_FIELDS", "TOPIC_PATTERN", "Config", "ControlConfig",
    "DeviceConfig", "GpioConfig", "HomeAssistantConfig", "InboundConfig", "IngestRule",
    "LocalConfig", "LocalTlsConfig", "LogConfig", "ManageConfig", "MetricsConfig",
    "MqttConfig", "StoreConfig", "TlsConfig", "UplinkConfig", "absolute_path", "config_path",
    "fields_reference", "filter_problem", "from_dict", "is_loopback", "listen_address", "load",
    "load_store", "merged", "parse", "read_toml", "reference_markdown",
]

if not TYPE_CHECKING:
    def __getattr__(name: str) -> Any:
        """A name of :mod:`~pigateway.config.sections`, imported now (and kept)."""
        if name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        sections = importlib.import_module(f"{__name__}.sections")
        try:
            value = getattr(sections, name)
        except AttributeError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        globals()[name] = value
        return value
