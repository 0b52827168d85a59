"""Ports on the loopback interface."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Ports handed out by this process: never the same one twice (two brokers of one test
#: were once given one port: the first had not bound it yet when the second asked).
_GIVEN: set[int] = set()
#: Where the ports come from when the kernel's ephemeral range leaves room below it.
LOWEST = 10_000


def _ephemeral_low() -> int:
    """The first port the kernel gives outgoing connections (and ``bind(0)``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never handed out before
    by this process, and below the kernel's ephemeral range, so that no client's outgoing
    connection takes it before the server that was given it binds it."""
    low = _ephemeral_low()
    for _ in range(500):
        if low - LOWEST >= 1000:
            port = random.randrange(LOWEST, low)
        else:  # no room below the range on this machine: the kernel picks
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1 after 500 tries")
