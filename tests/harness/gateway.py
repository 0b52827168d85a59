"""The one gateway config writer: a mapping as a config file holds it, then a ``Config``
(``config``) or a TOML file (``write``).

``settings`` gives what every test gateway shares (its files in one folder, a broker on
127.0.0.1); each caller adds its own tables. Keys a caller does not give keep the service's
defaults, so a writer says only what its test is about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pigateway.config import Config, from_dict

GATEWAY = "gw-test"
HOST = "127.0.0.1"


def settings(folder: Path | None = None, *, gateway_id: str = GATEWAY, port: int | None = None,
             prefix: str | None = None, devices: Mapping[str, Any] | None = None,
             **tables: Mapping[str, Any] | None) -> dict[str, Any]:
    """A config mapping: the store and control socket in ``folder``, a broker on
    127.0.0.1:``port`` under ``prefix``, and ``tables`` (``uplink={...}``...) merged over them."""
    data: dict[str, Any] = {"gateway_id": gateway_id}
    if folder is not None:
        data["store"] = {"path": str(folder / "queue.db"), "min_free_bytes": 0}
        data["control"] = {"socket": str(folder / "control.sock")}
    if port is not None:
        data["mqtt"] = {"host": HOST, "port": port}
        if prefix is not None:
            data["mqtt"]["topic_prefix"] = prefix
    for name, table in tables.items():
        data[name] = {**data.get(name, {}), **(table or {})}
    if devices is not None:
        data["devices"] = {name: dict(options) for name, options in devices.items()}
    return data


def config(folder: Path | None = None, **options: Any) -> Config:
    """``settings(folder, **options)`` as the service's ``Config``."""
    return from_dict(settings(folder, **options))


def to_toml(data: Mapping[str, Any]) -> str:
    """A config mapping as TOML text (tables after the keys; ``None`` means unset)."""
    def lines(table: Mapping[str, Any], prefix: str, head: str = "") -> list[str]:
        out, subs = [head or f"[{prefix}]"] if prefix else [], []
        for key, item in table.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(item, Mapping):
                subs += lines(item, name)
            elif isinstance(item, list) and item and all(isinstance(i, Mapping) for i in item):
                for entry in item:  # an array of tables: [[ingest]]
                    subs += lines(entry, name, f"[[{name}]]")
            elif item is not None:
                out.append(f"{key} = {json.dumps(item)}")
        return out + subs
    return "\n".join(lines(data, "")) + "\n"


def write(path: Path, data: Mapping[str, Any]) -> Path:
    """``data`` as the TOML file ``path`` (for ``pigateway`` in a child process)."""
    path.write_text(to_toml(data))
    return path


def plain(cfg: Config) -> dict[str, Any]:
    """``cfg`` as the mapping a config file would hold (no unset options, no devices)."""
    def drop(table: dict[str, Any]) -> dict[str, Any]:
        return {k: drop(v) if isinstance(v, dict) else v for k, v in table.items()
                if v is not None and v != []}
    data = drop(cfg.as_dict())
    data.pop("devices", None)
    return data
