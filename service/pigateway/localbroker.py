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

#: Debian's mosquitto config; it includes /etc/mosquitto/conf.d.
MOSQUITTO_CONF: Final = Path("/etc/mosquitto/mosquitto.conf")
#: mosquitto 2's defaults for what ingest relies on.
DEFAULTS: Final = {"persistence": "false", "autosave_interval": "1800",
                   "max_queued_messages": "1000"}
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
    """What the local broker's config leaves at a default that loses ingest's messages
    while pigateway is away; empty when ingest is off, the broker is elsewhere, or its
    config cannot be read."""
    if not config.ingest or not is_loopback(config.local.host):
        return []
    options = read_options(path)
    if options is None:
        return []
    effective = {**DEFAULTS, **options}
    out = []
    where = f"the local broker ({path})"
    queued = effective["max_queued_messages"]
    if queued == DEFAULTS["max_queued_messages"]:
        out.append(f"{where} keeps at most {queued} messages for a stopped pigateway "
                   "(mosquitto's default max_queued_messages) and drops the rest silently")
    if effective["persistence"].lower() != "true":
        out.append(f"{where} has persistence off: a restart of the broker loses ingest's "
                   "session and every message waiting in it")
    elif effective["autosave_interval"] == DEFAULTS["autosave_interval"]:
        out.append(f"{where} saves to disk every {DEFAULTS['autosave_interval']} s (the "
                   "default autosave_interval): a crash of the broker loses what it kept "
                   "for a stopped pigateway since")
    if out:
        out.append(f"install {DROP_IN} (the pigateway package and the Ansible role do) and "
                   "restart mosquitto; see docs/ingest.md")
    return out
