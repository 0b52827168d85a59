"""MQTT: the only package that imports aiomqtt or paho.

What the rest of the service sees is a :class:`Connection` opened with :func:`connect` (an
async context manager), and the tables of what the broker's codes mean. The rooms:

- :mod:`~pigateway.mqtt.client`: the connection, and every use of a private member of
  aiomqtt or paho (named in :data:`PRIVATE_API`; re-read it at every upgrade of either);
- :mod:`~pigateway.mqtt.codes`: reason-code tables, size checks, errors as ours;
- :mod:`~pigateway.mqtt.readahead`: inbound messages read ahead of their consumer, bounded;
- :mod:`~pigateway.mqtt.stream`: inbound packets cut from chunks, the plain ones decoded;
- :mod:`~pigateway.mqtt.packets`: what paho cannot decode, read from the raw bytes;
- :mod:`~pigateway.mqtt.topics`: the MQTT topic-filter grammar (``+``, ``#``, ``$``);
- :mod:`~pigateway.mqtt.local`: a publisher to a local broker;
- :mod:`~pigateway.mqtt.forwarded`: a forwarded message as a queue row and back;
- :mod:`~pigateway.mqtt.credentials`: the broker password and the TLS context.
"""

from pigateway.mqtt.client import (
    PRIVATE_API,
    BrokerLimits,
    Connection,
    PrivateMember,
    Settings,
    Will,
    connect,
)
from pigateway.mqtt.codes import (
    LOGIN_REFUSED,
    PUBACK_REFUSALS,
    PUBLISH_OVERHEAD,
    SLOW_DOWN,
    check_publish,
    classify,
    describe,
    packet_limit,
    publish_room,
    refusal,
)
from pigateway.mqtt.local import LocalPublisher, local_publisher
from pigateway.mqtt.readahead import Message, ReadAhead

__all__ = ["LOGIN_REFUSED", "PRIVATE_API", "PUBACK_REFUSALS", "PUBLISH_OVERHEAD", "SLOW_DOWN",
           "BrokerLimits", "Connection", "LocalPublisher", "Message", "PrivateMember",
           "ReadAhead", "Settings", "Will", "check_publish", "classify", "connect", "describe",
           "local_publisher", "packet_limit", "publish_room", "refusal"]
