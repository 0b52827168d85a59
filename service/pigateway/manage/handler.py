"""Remote management: the verbs a fleet operator runs on the gateway over its own link.

A manage command arrives on ``{prefix}/{gateway}/manage`` as the device commands' document
without a device (``{"v":1,"id","name","params"}``; :func:`pigateway.inbound.parse_manage`)
and takes their path: persisted in the inbox before its PUBACK, deduplicated by id, run by
the worker pool in a lane of its own (:data:`DEVICE`), answered once on
``{prefix}/{gateway}/results``. So a verb is never run twice for one id and its result
survives a restart. Only the verbs of ``manage.allow`` run (checked at receipt and again
here); each remote action is logged at NOTICE with its id and outcome.

The verbs use the control socket's code where one exists (:data:`pigateway.listeners.control.VERBS`:
pause, resume, flush, status). ``config-set`` is :mod:`~pigateway.manage.remoteconfig`'s: staged,
tried after a restart, committed once online or rolled back by itself. Its command stays
``running`` in the inbox across those restarts, and its one result says how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from typing import Any, Final, Protocol

from pigateway import config as configuration
from pigateway import handlers, logs
from pigateway.cli import access
from pigateway.config import Config
from pigateway.errors import ConfigError, HandlerError, InvalidCommand
from pigateway.handlers import Request
from pigateway.listeners.control import VERBS, Controls
from pigateway.logs import NOTICE
from pigateway.manage import remoteconfig
from pigateway.manage.remoteconfig import Trial
from pigateway.state import Link
from pigateway.store import Store
from pigateway.text import bounded

log = logging.getLogger("pigateway.manage")

#: The inbox lane (``device``) of manage commands: no configured device can be named so.
DEVICE: Final = "@gateway"
#: Sections a ``config-set`` may change. Not ``store`` (the queue is never touched), not
#: ``manage`` (a remote change cannot widen its own rights), not ``gateway_id`` (the topics
#: the operator reaches it on), not ``devices``/``ingest`` (code and local wiring).
SETTABLE: Final = ("mqtt", "uplink", "inbound", "log", "metrics", "local", "gpio")
#: The params each verb takes (none where not named).
PARAMS: Final = {"requeue-dead": ("id", "expired"), "logs": ("lines",), "config-set": ("set",)}
#: Words of the keys whose values config-get withholds (credential paths and names), in any
#: section or device's options: ``username``, ``password_file``, ``password_credential``,
#: ``key_file``, ``cert_file`` and any key a handler adds that names a secret so.
WITHHELD: Final = ("user", "password", "credential", "secret", "token", "key_file",
                   "cert_file")
#: Seconds ``logs`` may take; bytes of journal it returns at most.
LOGS_TIMEOUT: Final = 10.0
#: A restart is asked this long after the verb returned, so its result is recorded first.
RESTART_DELAY: Final = 0.5
POLL: Final = 0.5


class Controlled(Controls, Protocol):
    """What the verbs may do to the service beyond the control socket's."""

    def restart(self) -> None: ...

    def manage_reachable(self) -> bool: ...


class Manage:
    """The handler of the :data:`DEVICE` lane (see the module docstring)."""

    def __init__(self, config: Config, controls: Controlled, store: Store,
                 trial: Trial | None = None) -> None:
        self.config = config
        self.controls = controls
        self.store = store
        self.trial = trial
        #: a config-set waits for its proof longer than a device handler may take
        self.timeout = config.manage.rollback_after + 30.0
        self._settled = asyncio.Event()
        self._later: set[asyncio.TimerHandle] = set()

    async def close(self) -> None:
        for handle in self._later:
            handle.cancel()

    async def run(self, request: Request) -> Any:
        if request.name not in self.config.manage.allow:
            raise InvalidCommand(f"the verb {request.name!r} is not allowed here "
                                 "(manage.allow)")
        verb = getattr(self, "_" + request.name.replace("-", "_"))
        try:
            _only(request, PARAMS.get(request.name, ()))
            result = await verb(request)
        except Exception as exc:
            log.log(NOTICE, "manage: %s %s failed: %s", request.name, request.id, bounded(exc),
                    extra={"command_id": request.id})
            raise
        log.log(NOTICE, "manage: %s %s done", request.name, request.id,
                extra={"command_id": request.id})
        return result

    # ---- the control socket's verbs

    async def _status(self, request: Request) -> Any:
        return self.controls.state.as_dict()

    async def _control(self, verb: str) -> Any:
        action = VERBS[verb]
        if action is not None:
            action(self.controls)
        return self.controls.state.as_dict()

    async def _pause(self, request: Request) -> Any:
        return await self._control("pause")

    async def _resume(self, request: Request) -> Any:
        return await self._control("resume")

    async def _flush(self, request: Request) -> Any:
        return await self._control("flush")

    # ---- the queue

    async def _queue_stats(self, request: Request) -> Any:
        return (await self.store.stats()).as_dict()

    async def _requeue_dead(self, request: Request) -> Any:
        params = request.params
        command_id, expired = params.get("id"), params.get("expired", False)
        if not isinstance(command_id, str) or not command_id:
            raise InvalidCommand("requeue-dead needs params.id, the dead letter's id")
        if not isinstance(expired, bool):
            raise InvalidCommand("params.expired must be true or false")
        count = await self.store.requeue_dead(command_id, expired=expired)
        return {"requeued": count}

    # ---- the service

    async def _logs(self, request: Request) -> Any:
        lines = request.params.get("lines", 50)
        limit = self.config.manage.log_lines
        if isinstance(lines, bool) or not isinstance(lines, int) or not 0 < lines <= limit:
            raise InvalidCommand(f"params.lines must be 1-{limit} (manage.log_lines)")
        room = self.config.store.max_params_bytes // 2
        journal = await _journal_tail(lines)
        if journal is not None:
            return {"lines": _tail(journal, room), "source": "journal"}
        # the journal is not there or not ours to read: this run's own lines, from memory
        return {"lines": _tail("\n".join(logs.RECENT.last(lines)), room),
                "source": "memory: this run's lines only (the service's user may not read "
                          "the journal; SupplementaryGroups=systemd-journal would allow it)"}

    async def _restart(self, request: Request) -> Any:
        if request.attempt > 1:  # the restart ended its first run: it happened
            return {"restarted": True}
        self._soon(self.controls.restart)
        return {"restarting": True}

    def _soon(self, action: Any) -> None:
        self._later.add(asyncio.get_running_loop().call_later(RESTART_DELAY, action))

    # ---- the config

    async def _config_get(self, request: Request) -> Any:
        overlay = self.config.manage.overlay
        try:
            remote = configuration.read_toml(overlay) if overlay.exists() else {}
        except ConfigError as exc:
            remote = {"(unreadable)": str(exc)}
        return {"effective": withheld(self.config.as_dict()), "overlay": withheld(remote),
                "overlay_path": str(overlay)}

    async def _config_set(self, request: Request) -> Any:
        overlay = self.config.manage.overlay
        done = remoteconfig.outcome(overlay)
        if done is not None and done.get("id") == request.id:
            return _ended(done)
        if self.trial is not None and self.trial.id == request.id:
            await self._settled.wait()  # watch_trial commits or rolls back
            ended = remoteconfig.outcome(overlay) or {"applied": False,
                                                      "reason": "no outcome recorded"}
            if ended.get("applied"):
                return _ended(ended)
            # rolled back: the start on the config before answers (the first branch), on the
            # topics the operator reaches; this config may be what kept them out
            await asyncio.Event().wait()
            raise AssertionError("unreachable")
        waiting = remoteconfig.pending_id(overlay)
        if waiting is not None and waiting != request.id:
            raise HandlerError(f"config-set {waiting} is being tried; send this one after it")
        if waiting is None:
            text = self._checked_overlay(request)
            remoteconfig.stage(overlay, request.id, text)
            log.log(NOTICE, "manage: config-set %s staged at %s; restarting to try it",
                    request.id, remoteconfig.pending_path(overlay),
                    extra={"command_id": request.id})
        self._soon(self.controls.restart)
        await asyncio.Event().wait()  # the restart ends this run; the next one answers
        raise AssertionError("unreachable")

    def _checked_overlay(self, request: Request) -> str:
        """The overlay with the request's keys, as TOML, checked as ``pigateway config
        check`` checks a config (values, device options, files as the service meets them);
        a refusal names the key."""
        changes = request.params.get("set")
        if not isinstance(changes, dict) or not changes:
            raise InvalidCommand('config-set needs params.set, e.g. {"set": {"mqtt.port": 8883}}')
        overlay = self.config.manage.overlay
        data = configuration.read_toml(overlay) if overlay.exists() else {}
        for key, value in changes.items():
            _put(data, key, value)
        if self.config.source is None:
            raise HandlerError("this gateway runs without a config file; nothing to overlay")
        base = configuration.read_toml(self.config.source)
        try:
            config = configuration.from_dict(configuration.merged(base, data))
            handlers.check(config)
            access.check(config, access.Account.current(), staged=False)
        except ConfigError as exc:
            raise InvalidCommand(f"refused: {exc}") from None
        return toml_text(data)

    async def watch_trial(self) -> None:
        """Commit the tried overlay once the gateway is online with it; roll it back and
        restart when ``manage.rollback_after`` passes first. Runs with the service."""
        if self.trial is None:
            return
        trial, limit = self.trial, self.config.manage.rollback_after
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            if self.controls.manage_reachable():  # online, and the operator can reach it
                trial.commit()
                self._settled.set()
                return
            await asyncio.sleep(POLL)
        error = self.controls.state.last_error or "no error said"
        if self.controls.state.link is Link.ONLINE:
            error = ("online, but the broker refused the manage topic's subscription or the "
                     "state document (its ACL): the operator could not reach the gateway")
        trial.roll_back(f"the gateway was not online within {limit:g}s "
                        f"(manage.rollback_after); last error: {error}")
        self._settled.set()
        self._soon(self.controls.restart)


def _ended(done: dict[str, Any]) -> Any:
    if done.get("applied"):
        return {"applied": True}
    raise HandlerError(f"rolled back: {done.get('reason', 'no reason recorded')}; the gateway "
                       "runs on its config before this config-set")


def _only(request: Request, names: tuple[str, ...]) -> None:
    extra = sorted(set(request.params) - set(names))
    if extra:
        raise InvalidCommand(f"{request.name} takes no param {bounded(extra[0], 40)!r}"
                             + (f"; its params: {', '.join(names)}" if names else ""))


def _put(data: dict[str, Any], key: Any, value: Any) -> None:
    parts = key.split(".") if isinstance(key, str) else []
    if len(parts) < 2 or parts[0] not in SETTABLE or not all(parts):
        raise InvalidCommand(f"refused: {bounded(key, 80)!r}: config-set takes keys of "
                             f"{', '.join(SETTABLE)} as 'section.key'")
    if not _tomlable(value):
        raise InvalidCommand(f"refused: {key}: a value is a string, number, boolean or a "
                             "list of them")
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise InvalidCommand(f"refused: {key}: {part} is not a table")
    table[parts[-1]] = value


def _tomlable(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(item, (str, int, float)) for item in value)
    return isinstance(value, (str, int, float, bool))


def toml_text(data: dict[str, Any], prefix: str = "") -> str:
    """Tables of scalars and scalar lists as TOML (JSON's strings are TOML's basic strings)."""
    lines = [f"{_key(k)} = {json.dumps(v, ensure_ascii=False, allow_nan=False)}"
             for k, v in data.items() if not isinstance(v, dict)]
    head = [f"[{prefix}]"] if prefix and lines else []
    out = "\n".join(head + lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, dict):
            out += "\n" + toml_text(value, f"{prefix}.{_key(key)}" if prefix else _key(key))
    return out


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def withheld(value: Any) -> Any:
    """``value`` with every credential path and user name replaced by a note."""
    if isinstance(value, dict):
        return {k: "(withheld)" if _secret(k) and v is not None else withheld(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [withheld(item) for item in value]
    return value


def _secret(key: Any) -> bool:
    return isinstance(key, str) and any(word in key.lower() for word in WITHHELD)



async def _journal_tail(lines: int) -> str | None:
    """The unit's last ``lines`` journal lines, or None where the journal cannot say them
    (no journalctl, no permission, no entries: outside systemd)."""
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        return None
    process = await asyncio.create_subprocess_exec(
        journalctl, "-u", "pigateway", "-n", str(lines), "-o", "short-iso", "--no-pager",
        "-q", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(LOGS_TIMEOUT):
            out, err = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return None
    said = err.decode("utf-8", "replace")
    # journalctl says "insufficient permissions" in words (exiting 0 or 1 by version)
    if process.returncode != 0 or "insufficient permissions" in said or "systemd-journal" in said:
        return None
    text = out.decode("utf-8", "replace").strip()
    return text or None

def _tail(text: str, room: int) -> list[str]:
    """The last lines of ``text`` that fit ``room`` bytes together."""
    kept: list[str] = []
    for line in reversed(text.splitlines()):
        room -= len(line.encode()) + 8
        if room < 0:
            break
        kept.append(bounded(line, 1000))
    return kept[::-1]
