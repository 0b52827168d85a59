"""The remote overlay of ``config-set``: written pending, tried at a start, committed or
rolled back by itself.

Files, all beside ``manage.overlay`` (``/var/lib/pigateway/remote.toml`` by default, a
folder the Ansible role does not template, so a playbook run and a remote change never
write the same file; the overlay's keys override ``/etc/pigateway/config.toml``'s while
``[manage] enabled`` is true):

- ``remote.toml``: the committed overlay, read by every :func:`pigateway.config.load`;
- ``remote.pending.toml`` + ``remote.pending.json`` (the command id, whether a start has
  tried it): a ``config-set`` that waits for its proof;
- ``remote.outcome.json``: how the last ``config-set`` ended (applied or rolled back, why),
  which the command's second run turns into its one result.

Why this works under systemd: the service exits with :data:`EXIT_RESTART` (not 78, which
the unit never restarts), so systemd starts it again. :func:`service_config` at that start
marks the pending overlay tried and loads it; a config error in it is rolled back there and
then (the base config loads instead, so a bad overlay can never meet
``RestartPreventExitStatus=78``). The service commits it once READY and online
(:meth:`Trial.commit`); when ``manage.rollback_after`` passes first, it rolls back and
restarts, and any start that finds a pending overlay already tried (the trial crashed, was
killed, or a power cut came) rolls it back too. Every write is atomic (a temporary file,
fsync, rename, fsync of the folder): never half a file. None of it touches the queue.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pigateway import config as configuration
from pigateway.config import Config
from pigateway.errors import ConfigError
from pigateway.logs import NOTICE
from pigateway.text import bounded

log = logging.getLogger("pigateway.manage")

#: The exit status that asks systemd for a restart (EX_TEMPFAIL; ``Restart=on-failure``).
EXIT_RESTART: Final = 75


def pending_path(overlay: Path) -> Path:
    return overlay.with_name(overlay.stem + ".pending.toml")


def _meta_path(overlay: Path) -> Path:
    return overlay.with_name(overlay.stem + ".pending.json")


def _outcome_path(overlay: Path) -> Path:
    return overlay.with_name(overlay.stem + ".outcome.json")


def write_atomically(path: Path, text: str) -> None:
    """``text`` at ``path``, whole or not at all, on disk when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def stage(overlay: Path, command_id: str, text: str) -> None:
    """Write ``text`` as the pending overlay of ``command_id`` (the overlay file before the
    meta, so a meta never names a pending file that is not whole)."""
    _outcome_path(overlay).unlink(missing_ok=True)
    write_atomically(pending_path(overlay), text)
    write_atomically(_meta_path(overlay), json.dumps({"id": command_id, "tried": False}))


def outcome(overlay: Path) -> dict[str, Any] | None:
    """``{"id", "applied": bool, "reason"?}`` of the last config-set, if it ended."""
    return _read_json(_outcome_path(overlay))


def pending_id(overlay: Path) -> str | None:
    meta = _read_json(_meta_path(overlay))
    return str(meta["id"]) if meta and isinstance(meta.get("id"), str) else None


@dataclass
class Trial:
    """A pending overlay this process runs on, to commit or roll back."""

    overlay: Path
    id: str

    def commit(self) -> None:
        """The gateway is READY and online with it: it becomes the overlay. The outcome is
        written first and is the commit point: a stop after it is finished by the next
        start (:func:`_settle`), one before it is rolled back there, so the one result
        always says what the gateway runs."""
        write_atomically(_outcome_path(self.overlay), json.dumps({"id": self.id,
                                                                  "applied": True}))
        _settle(self.overlay, self.id, applied=True)

    def roll_back(self, reason: str) -> None:
        rollback(self.overlay, self.id, reason)


def rollback(overlay: Path, command_id: str, reason: str) -> None:
    """Drop the pending overlay of ``command_id``; the outcome says why."""
    pending_path(overlay).unlink(missing_ok=True)
    _sync_folder(overlay.parent)
    _finish(overlay, {"id": command_id, "applied": False, "reason": bounded(reason, 500)})
    log.warning("manage: config-set %s rolled back: %s", command_id, bounded(reason, 500))


def _settle(overlay: Path, command_id: str, *, applied: bool) -> None:
    """Finish a config-set whose outcome is written: the pending overlay becomes the
    overlay (applied) or goes, then the meta goes. Each step may be repeated."""
    pending = pending_path(overlay)
    if applied and pending.exists():
        os.replace(pending, overlay)
    else:
        pending.unlink(missing_ok=True)
    _sync_folder(overlay.parent)
    _meta_path(overlay).unlink(missing_ok=True)
    _sync_folder(overlay.parent)
    if applied:
        log.log(NOTICE, "manage: config-set %s applied: the gateway is online with it",
                command_id)


def _finish(overlay: Path, result: dict[str, Any]) -> None:
    write_atomically(_outcome_path(overlay), json.dumps(result))
    _meta_path(overlay).unlink(missing_ok=True)
    _sync_folder(overlay.parent)


def service_config(path: str | os.PathLike[str] | None) -> tuple[Config, Trial | None]:
    """The config the service starts with: the committed one, or that with a pending overlay
    to try. A pending overlay that was tried before, or that the checks refuse, is rolled
    back here, so only the base config's own errors end the start (exit 78)."""
    config = configuration.load(path)
    if not config.manage.enabled:
        return config, None
    overlay = config.manage.overlay
    meta = _read_json(_meta_path(overlay))
    if meta is None or not isinstance(meta.get("id"), str):
        if pending_path(overlay).exists():
            pending_path(overlay).unlink()  # a stage cut short: no command waits for it
        return config, None
    command_id: str = meta["id"]
    done = outcome(overlay)
    if done is not None and done.get("id") == command_id:  # ended; a stop cut its finish
        _settle(overlay, command_id, applied=done.get("applied") is True)
        return configuration.load(path), None
    if meta.get("tried") or not pending_path(overlay).exists():
        rollback(overlay, command_id, "the gateway did not come back READY and online with "
                 "it (it stopped or was restarted before)")
        return config, None
    write_atomically(_meta_path(overlay), json.dumps({"id": command_id, "tried": True}))
    try:
        trying = configuration.load(path, overlays=(overlay, pending_path(overlay)))
    except ConfigError as exc:
        rollback(overlay, command_id, f"the config it makes is refused: {exc}")
        return config, None
    log.log(NOTICE, "manage: trying config-set %s; committed once online, rolled back after "
            "%.0fs otherwise", command_id, trying.manage.rollback_after)
    return trying, Trial(overlay, command_id)
