"""The gateway as a Home Assistant device (docs/homeassistant.md): the link
(:mod:`~pigateway.homeassistant.bridge`) and what HA is told, as data
(:mod:`~pigateway.homeassistant.discovery`)."""

from pigateway.homeassistant.bridge import HomeAssistant

__all__ = ["HomeAssistant"]
