"""What ``config check`` refuses in ``[local]`` and ``[[ingest]]``, each naming the keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.gateway import settings
from pigateway.config import Config, from_dict
from pigateway.errors import ConfigError


def ingest_config(folder: Path, *rules: dict[str, Any], **tables: Any) -> Config:
    data = settings(folder, port=18830, **tables)
    data["local"] = {"host": "127.0.0.1", "port": 1883, **data.get("local", {})}
    data["ingest"] = list(rules)
    return from_dict(data)


def test_qos_zero_is_refused_because_nothing_would_be_acknowledged(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ingest_config(tmp_path, {"topic": "z2m/#", "qos": 0})
    assert caught.value.key == "ingest[0].qos"
    assert "never acknowledged" in str(caught.value)


@pytest.mark.parametrize("qos", [1, 2])
def test_qos_one_and_two_are_accepted(tmp_path: Path, qos: int) -> None:
    assert ingest_config(tmp_path, {"topic": "z2m/#", "qos": qos}).ingest[0].qos == qos
