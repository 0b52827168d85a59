"""What the gateway's own mosquitto keeps for ingest while pigateway is away, from its config.

Ingest's promise (docs/ingest.md) holds only as far as the local broker keeps the messages
published while pigateway is stopped: mosquitto's defaults keep 1000 of them at most and
drop the rest without a word, and save nothing to disk unless ``persistence`` is on (and
then every 1800 s). ``config check`` reads the broker's config when it can (a broker on
this host, its file readable) and says which of these defaults still hold; the package and
the Ansible role install ``/etc/mosquitto/conf.d/pigateway-ingest.conf`` to change them.
Reading never fails the check: a file that cannot be read is no warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from pigateway.config import Config, is_loopback
from pigateway.text import format_size

#: Debian's mosquitto config; it includes /etc/mosquitto/conf.d.
MOSQUITTO_CONF: Final = Path("/etc/mosquitto/mosquitto.conf")
#: mosquitto 2's defaults for what ingest relies on.
DEFAULTS: Final = {"persistence": "false", "autosave_interval": "1800",
                   "max_queued_messages": "1000", "max_queued_bytes": "0"}
#: A ``max_queued_bytes`` below the drop-in's (64 MiB) is warned of: mosquitto drops what
#: is over it as silently as what is over ``max_queued_messages`` (0: no bound).
MIN_QUEUED_BYTES: Final = 64 * 1024 * 1024
#: The drop-in the package installs.
DROP_IN: Final = "/etc/mosquitto/conf.d/pigateway-ingest.conf"
#: Files read at most (include_dir), and bytes of each: a config is small.
MAX_FILES: Final = 64
MAX_BYTES: Final = 1024 * 1024


def read_options(path: Path) -> dict[str, str] | None:
    """The options of interest as mosquitto would end with them (the last one wins, an
    ``include_dir`` read in place, its ``*.conf`` files in name order); None: unreadable."""
    found: dict[str, str] = {}
    budget = [MAX_FILES]
    return found if _read(path, found, budget) else None


def _read(path: Path, found: dict[str, str], budget: list[int]) -> bool:
    budget[0] -= 1
    if budget[0] < 0:
        return True
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) != 2 or words[0].startswith("#"):
            continue
        key, value = words[0], words[1].strip()
        if key in DEFAULTS:
            found[key] = value
        elif key == "include_dir":
            try:
                files = sorted(p for p in Path(value).iterdir() if p.name.endswith(".conf"))
            except OSError:
                continue
            for each in files:
                _read(each, found, budget)
    return True


def warnings(config: Config, path: Path = MOSQUITTO_CONF) -> list[str]:
    """What the local broker's config leaves at a default (or worse) that loses ingest's messages
    while pigateway is away; empty when ingest is off, the broker is elsewhere, or its
    config cannot be read."""
    if not config.ingest or not is_loopback(config.local.host):
        return []
    options = read_options(path)
    if options is None:
        return []
    effective = {**DEFAULTS, **options}
    where = f"the local broker ({path})"
    out = [f"{where} {problem}" for problem in (_queue_problems(effective)
                                                 + _saving_problems(effective))]
    if out:
        out.append(f"install {DROP_IN} (the pigateway package and the Ansible role do) and "
                   "restart mosquitto; see docs/ingest.md")
    return out


def _number(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:  # mosquitto itself refuses to start on it
        return None


def _queue_problems(effective: dict[str, str]) -> list[str]:
    """Bounds at or below mosquitto's defaults: more is dropped silently, never less."""
    out = []
    default = int(DEFAULTS["max_queued_messages"])
    queued = _number(effective["max_queued_messages"])
    if queued is not None and 0 < queued <= default:
        said = "mosquitto's default" if queued == default else f"below the default {default}"
        out.append(f"keeps at most {queued} messages for a stopped pigateway "
                   f"(max_queued_messages, {said}) and drops the rest silently")
    size = _number(effective["max_queued_bytes"])
    if size is not None and 0 < size < MIN_QUEUED_BYTES:
        out.append(f"keeps at most {format_size(size)} of messages for a stopped pigateway "
                   f"(max_queued_bytes, below {format_size(MIN_QUEUED_BYTES)}) and drops "
                   "the rest silently")
    return out


def _saving_problems(effective: dict[str, str]) -> list[str]:
    """Persistence off, or saved to disk no more often than mosquitto's default."""
    if effective["persistence"].lower() != "true":
        return ["has persistence off: a restart of the broker loses ingest's session and "
                "every message waiting in it"]
    default = int(DEFAULTS["autosave_interval"])
    interval = _number(effective["autosave_interval"])
    if interval == 0:
        return ["saves to disk only when it exits (autosave_interval 0): a crash of the "
                "broker loses everything it kept for a stopped pigateway"]
    if interval is not None and interval >= default:
        said = "the default autosave_interval" if interval == default else \
            f"autosave_interval, longer than the default {default} s"
        return [f"saves to disk every {interval} s ({said}): a crash of the broker loses "
                "what it kept for a stopped pigateway since"]
    return []
