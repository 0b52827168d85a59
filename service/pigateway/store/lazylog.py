"""A logger that imports :mod:`logging` on first use.

``pigateway send`` loads modules that may log (the store's, the clock's) and, on its way,
logs nothing; importing :mod:`logging` would cost each ``send`` ~20 million instructions
(~6% of it; on a Pi's core, milliseconds). Those modules take their logger from here;
the service, which logs from its first second, pays the import once as before.
"""

from __future__ import annotations

from typing import Any


class Logger:
    """Stands in for ``logging.getLogger(name)``: every attribute is the real logger's."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        import logging  # noqa: PLC0415 - the point: only once something is logged

        return getattr(logging.getLogger(self.name), attribute)


def getLogger(name: str) -> Logger:
    return Logger(name)
