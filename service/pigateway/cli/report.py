"""What the CLI shows people: the status, the queue's figures and listings, as text.

``pigateway status`` is what an operator reads first, so it reads like ``systemctl status``:
the one status line first (the service's ``STATUS=``, :func:`pigateway.systemd.status_line`,
the same words the journal and the LEDs use), then the fault and the last error when there
is one, then each part in words: times as local time and age, sizes with units, and what is
not configured said so. Every function here is pure (state or figures in, text out; ``now``
given), so tests call them directly; ``--json`` stays the machine form, untouched by this.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pigateway.text import bounded, format_age, format_size, plural

#: Width of the labels in the ``status`` and ``queue show`` blocks (as systemctl aligns them).
LABEL: Final = 11
#: Characters of one table cell at most (a long error or params stays one short line).
CELL: Final = 60

_ERRNO: Final = re.compile(r"\[Errno -?\d+\]\s*")
_CLASS: Final = re.compile(r"\b(?:[a-z_]+\.)*[A-Z]\w*(?:Error|Exception): ")


# --------------------------------------------------------------------------- words


#: A size with its unit (``256 KiB``): :func:`pigateway.text.format_size`.
size = format_size


def clock(at: float) -> str:
    """A wall time as local time, with the day and the zone, as systemctl shows it:
    ``Mon 2026-12-07 10:57:48 UTC``."""
    return time.strftime("%a %Y-%m-%d %H:%M:%S %Z", time.localtime(at))


def since(at: float, now: float) -> str:
    """``Mon 2026-12-07 10:57:48 UTC; 3m ago`` (or ``; in 40s`` for a time to come)."""
    if at > now + 0.5:
        return f"{clock(at)}; in {format_age(at - now)}"
    return f"{clock(at)}; {format_age(now - at)} ago"


def error(text: object) -> str:
    """An error as a person reads it: one bounded line, without the ``[Errno 111]`` that
    Python puts before the words (``Connection refused`` says it)."""
    return bounded(words(text))


def words(text: object) -> str:
    """``text`` without Python's marks, ``[Errno N]`` and an exception's class name before
    its message (``OSError: ``): what every CLI error line and shown error prints; the
    words after them say what happened."""
    return _CLASS.sub("", _ERRNO.sub("", str(text)))


# --------------------------------------------------------------------------- status


def status_running(state: Mapping[str, Any], line: str, now: float) -> str:
    """``pigateway status`` of a running service: ``state`` is the control socket's
    ``state`` (:meth:`GatewayState.as_dict`), ``line`` its ``STATUS=`` line."""
    rows: list[tuple[str, str]] = []
    if state.get("fault"):
        rows.append(("Fault", error(state["fault"]) + " (an operator must act)"))
    for refusal in state.get("refusals") or []:  # work turned away: who, why, the detail
        rows.append(("Refusing", error(f"{refusal['by']}: {refusal['reason']}: "
                                       f"{refusal['detail']}") + " (an operator must act)"))
    if state.get("last_error") and state.get("last_error") != state.get("fault"):
        rows.append(("Last error", error(state["last_error"])))
    started = state.get("started_at")
    rows.append(("Active", "running" + (f" since {since(started, now)}" if started else "")))
    rows.append(("Link", _link(state, now)))
    rows.append(("Local", _local(state.get("local"))))
    rows.append(("Draining", _draining(state)))
    acked = int(state.get("acked") or 0)  # delivered, still counted until their delete
    rows.append(("Queue", _queue(max(0, int(state.get("depth") or 0) - acked), None,
                                 state.get("oldest_age"))
                 + (f" (and {acked:,} delivered, being deleted)" if acked else "")))
    rows.append(("In flight", plural(int(state.get("in_flight") or 0), "batch", "batches")
                 + " awaiting the broker's acknowledgement"))
    rows.append(("Dead", _dead(int(state.get("dead_letters") or 0))))
    shown_limits = limits(state.get("limits"))
    if state.get("limits") and state.get("link") != "online":
        shown_limits += " (as of the last connection)"
    rows.append(("Limits", shown_limits))
    if state.get("pins"):
        rows.append(("Pins", f"mock: {error(state['pins'])} (the panel and gpio devices "
                             "drive nothing)"))
    head = f"● pigateway - {line}"
    return "\n".join([head, *_block(rows)])


def status_stopped(stats: Mapping[str, Any], why: str, now: float) -> str:
    """``pigateway status`` when the service is not running: why, and the queue on disk
    (``stats``: :meth:`Stats.as_dict`, with ``forwarded``/``forwarded_bytes`` when read)."""
    rows = [
        ("Active", f"inactive: {error(why)}"),
        ("Queue", _queue(stats["depth"], stats["bytes"], stats.get("oldest_age"))
         + (", on disk: they go out once the service runs" if stats["depth"] else "")),
        ("Dead", _dead(int(stats.get("dead_total", sum(stats.get("dead", {}).values()))),
                       stats.get("dead"))),
        ("Start it", "systemctl start pigateway; then: journalctl -u pigateway -b"),
    ]
    return "\n".join(["○ pigateway - not running", *_block(rows)])


def _link(state: Mapping[str, Any], now: float) -> str:
    word = str(state.get("link") or "offline")  # online, connecting, offline: words already
    text = word
    link_since = state.get("link_since")
    if link_since:
        text += f" since {since(link_since, now)}"
    retry_at = state.get("retry_at")
    if word != "online" and retry_at:
        text += f"; next try in {format_age(retry_at - now)}" if retry_at > now + 0.5 else (
            "; trying now")
    return text


def _local(local: str | None) -> str:
    if local is None:
        return "not configured (no [[ingest]] rule: nothing is read from a local broker)"
    if local == "online":
        return "online (ingest reads the gateway's own broker)"
    return f"{local} (ingest reconnects by itself; not a fault: is mosquitto running?)"


def _draining(state: Mapping[str, Any]) -> str:
    if state.get("paused"):
        return "paused: queueing goes on, nothing is sent (pigateway resume)"
    if state.get("draining"):
        return "yes, sending the backlog"
    return "no, nothing waiting" if not state.get("depth") else "no"


def _queue(depth: int, nbytes: int | None, oldest_age: float | None) -> str:
    text = plural(int(depth), "command")
    if nbytes is not None:
        text += f", {size(nbytes)}"
    if depth and oldest_age is not None:
        text += f", the oldest queued {format_age(oldest_age)} ago"
    return text


def _dead(total: int, by_reason: Mapping[str, int] | None = None) -> str:
    if not total:
        return "none"
    text = plural(total, "dead letter")
    if by_reason:
        text += " (" + ", ".join(f"{reason} {count:,}"
                                 for reason, count in sorted(by_reason.items())) + ")"
    return text + "; pigateway queue ls --dead"


def limits(values: Mapping[str, Any] | None) -> str:
    """What the broker and the config allow on the link, in words (``None``: not connected
    yet, so nothing is known)."""
    if not values:
        return "not known until the first connection"
    parts = [plural(int(values.get("max_inflight") or 0), "batch", "batches") + " in flight"]
    if values.get("max_batch_bytes"):
        parts.append(f"{size(values['max_batch_bytes'])} a batch")
    if values.get("max_packet_size"):
        parts.append(f"broker packets up to {size(values['max_packet_size'])}")
    if values.get("receive_maximum"):
        parts.append(f"broker receive maximum {values['receive_maximum']:,}")
    if values.get("maximum_qos") is not None:
        parts.append(f"QoS up to {values['maximum_qos']}")
    if values.get("retain_available") is False:
        parts.append("no retained messages")
    rates = [f"{values['max_messages_per_second']:,} messages/s"
             if values.get("max_messages_per_second") else "",
             f"{size(values['max_bytes_per_second'])}/s"
             if values.get("max_bytes_per_second") else ""]
    shown = [rate for rate in rates if rate]
    parts.append("paced to " + " and ".join(shown) if shown else "not paced")
    return ", ".join(parts)


def _block(rows: Sequence[tuple[str, str]]) -> list[str]:
    return [f"{label:>{LABEL}}: {value}" for label, value in rows]


# --------------------------------------------------------------------------- queue


def stats_text(stats: Mapping[str, Any]) -> str:
    """``pigateway queue stats``: commands and forwarded messages apart, sizes with units."""
    forwarded = int(stats.get("forwarded", 0))
    forwarded_bytes = int(stats.get("forwarded_bytes", 0))
    age = stats.get("oldest_age")
    dead = stats.get("dead") or {}
    rows = [
        ("Queued", plural(stats["depth"] - forwarded, "command")
         + f", {size(stats['bytes'] - forwarded_bytes)}"),
        *([("Forwarded", plural(forwarded, "message") + f", {size(forwarded_bytes)}"
            + " (ingest, waiting for the uplink)")] if "forwarded" in stats else []),
        ("In flight", plural(int(stats["in_flight"]), "command")
         + " sent, awaiting the broker's acknowledgement"),
        ("Oldest", f"queued {format_age(age)} ago" if age is not None else "- (empty)"),
        ("Dead", _dead(sum(dead.values()), dead)),
    ]
    return "\n".join(_block(rows))


def where_text(where: Mapping[str, Any], now: float) -> str:
    """``pigateway queue show``: where one command is, in words."""
    state = where.get("state")
    rows: list[tuple[str, str]] = [("Command", str(where.get("id")))]
    if where.get("key"):
        rows.append(("Producer key", str(where["key"])))
    if state == "queued":
        ahead = int(where.get("position") or 0)
        rows.append(("State", "queued, next to go" if not ahead
                     else f"queued, {plural(ahead, 'command')} before it"))
    elif state == "in-flight":
        rows.append(("State", "in flight: sent, awaiting the broker's acknowledgement"))
    elif state == "delivered":
        at = where.get("at")
        rows.append(("State", "delivered: the broker acknowledged it"
                     + (f" {since(at, now)}" if at else "")))
        rows.append(("Batch", str(where.get("batch"))))
    elif state == "dead":
        rows.append(("State", f"dead-lettered: {where.get('reason')}"))
        if where.get("detail"):
            rows.append(("Why", error(where["detail"])))
    else:
        rows.append(("State", "unknown: never queued here, or delivered more than a day ago "
                              "(only --wait'ed or keyed commands are remembered)"))
    if where.get("attempts") is not None and state != "delivered":
        rows.append(("Attempts", str(where["attempts"])))
    if where.get("last_error"):
        rows.append(("Last error", error(where["last_error"])))
    return "\n".join(_block(rows))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], now: float) -> str:
    """A table for people: a header, one row per item, times as local time with their age,
    sizes with units, ``-`` for nothing; ``(none)`` for no rows."""
    if not rows:
        return "(none)"
    cells = [[_cell(column, row.get(column), now) for column in columns] for row in rows]
    heads = [column.replace("_", " ").upper() for column in columns]
    widths = [max(len(head), *(len(line[i]) for line in cells)) for i, head in enumerate(heads)]
    lines = ["  ".join(head.ljust(w) for head, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip()
              for line in cells]
    return "\n".join(lines)


def more(shown: int, total: int | None, label: str, hint: int) -> str | None:
    """The line under a listing cut at ``--limit``: how many there are (``None``: more than
    ``shown``, not counted), and how to see more. ``None`` when nothing was cut."""
    if total is not None and total <= shown:
        return None
    count = f"{shown:,} of {total:,}" if total is not None else f"the first {shown:,}"
    return f"({count} {label} shown; --limit {hint} for more, --json for every field)"


_TIMES: Final = frozenset({"queued_at", "expires_at", "dead_at", "received_at", "started_at",
                           "finished_at", "at"})


def _cell(column: str, value: Any, now: float) -> str:
    if value is None:
        return "-"
    if column in _TIMES and isinstance(value, int | float):
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        age = format_age(abs(now - value))
        return f"{text} ({age} ago)" if value <= now else f"{text} (in {age})"
    if column == "size" and isinstance(value, int):
        return size(value)
    if column in {"last_error", "detail"}:
        value = error(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = bounded(text, CELL)
    return text
