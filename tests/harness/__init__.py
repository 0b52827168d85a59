"""The harness the tests, ``scripts/demo`` and the ``scripts/bench_*`` share.

- ``ports``: ``free_port``, a loopback port nothing listens on.
- ``broker``: ``Mosquitto``, a real broker on a free loopback port (start, stop, kill, restart).
- ``gateway``: the one gateway config writer (a mapping, a ``Config``, a TOML file).
- ``service``: the one launcher of ``pigateway run`` (a child process, or the ``Gateway``
  in this process) with its stop helpers.
- ``waits``: bounded waits and polls.
- ``mqttwire``: MQTT packets byte by byte (what paho refuses to write too), a packet reader.
- ``hostile``: ``HostileBroker``, a scripted broker (CONNACK limits, PUBACK codes per
  message, QoS 2 flows cut at any step, DISCONNECTs with reasons, any bytes injected), and
  ``RawClient``, a byte-by-byte publisher for a real mosquitto.
- ``lossy``, ``powercut``: a FUSE layer that drops what was not synced (a power cut).
- ``mqttproxy``: ``RefusingProxy``, a proxy in front of mosquitto that answers PUBACKs with
  chosen codes; ``netproxy``: ``Proxy``, a TCP proxy that stalls, cuts and slows a link.
- ``sockets``: ``DatagramListener`` (the systemd notify socket), short socket directories.
- ``wire_subscriber``: ``WireSubscriber``, a receiver written only from the wire contract.
- ``uplink_helpers``, ``ingest_helpers``, ``ha_helpers``: a running uplink, ingest's
  brokers and collectors, Home Assistant's tables.
- ``programs/``: small programs the tests run as child processes (to kill them mid-commit).

Importable without pytest (the demo and the benches do not need it): pytest fixtures stay
in ``tests/conftest.py``. ``tests`` is on the import path through pytest's ``pythonpath``
setting, and through ``PYTHONPATH`` set by ``scripts/demo`` and ``scripts/bench``.
"""
