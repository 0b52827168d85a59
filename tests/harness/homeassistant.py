"""A real Home Assistant for the tests: installed once into ``build/ha-venv``, started on a
free 127.0.0.1 port with only ``http``, ``api`` and ``mqtt`` configured, its MQTT
integration pointed at the test's mosquitto, and read through its own REST API.

Nothing is clicked: the MQTT config entry and a long-lived access token are written into
its ``.storage`` before it starts (the token is a JWT signed with the refresh token's key,
as HA issues them). HA runs with ``--skip-pip`` (it installs nothing at run time) and
listens on 127.0.0.1 only. Only the process this object started is ever signalled.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import http.client
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any

from harness.ports import free_port
from harness.service import terminate

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "build" / "ha-venv"
HASS = VENV / "bin" / "hass"
REQUIREMENTS = Path(__file__).with_name("ha-requirements.txt")
#: Seconds the one-time install may take (measured: ~2-4 minutes on a loaded machine).
INSTALL_TIMEOUT = 900.0

__all__ = ["ApiError", "HomeAssistant", "ensure_installed"]


class ApiError(Exception):
    """Home Assistant's API answered an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body!r}")
        self.status = status


def ensure_installed() -> str | None:
    """Install Home Assistant into build/ha-venv unless it is there (one installer at a time:
    a lock file). Returns why it cannot be had (None: it is there)."""
    if _installed():
        return None
    if sys.version_info[:2] != (3, 11):
        return f"Home Assistant 2024.3 needs Python 3.11, this is {sys.version.split()[0]}"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with (VENV.parent / "ha-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed():
            return None
        log = VENV.parent / "ha-venv-install.log"
        started = time.monotonic()
        try:
            with log.open("w") as out:
                subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)],
                               check=True, stdout=out, stderr=out, timeout=120)
                subprocess.run([str(VENV / "bin" / "pip"), "install", "--prefer-binary",
                                "-r", str(REQUIREMENTS)], check=True, stdout=out, stderr=out,
                               timeout=INSTALL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"Home Assistant could not be installed into {VENV} ({exc}); see {log}"
        (VENV / "installed").write_text(f"{time.monotonic() - started:.0f} s\n")
    return None


def _installed() -> bool:
    return HASS.exists() and (VENV / "installed").exists()


def _b64(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: str, key: str) -> str:
    """An HS256 JWT as Home Assistant issues for a refresh token (``iss``: its id)."""
    now = int(time.time())
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": issuer, "iat": now, "exp": now + 86_400}).encode())
    signature = hmac.new(key.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


class HomeAssistant:
    """One Home Assistant in ``folder``, MQTT on 127.0.0.1:``mqtt_port``."""

    def __init__(self, folder: Path, mqtt_port: int) -> None:
        self.folder = folder
        self.mqtt_port = mqtt_port
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.log_path = folder / "home-assistant.log"
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        (self.folder / "configuration.yaml").write_text(
            "homeassistant:\n  name: pigateway test\n  latitude: 52.5\n  longitude: 13.4\n"
            "  elevation: 0\n  unit_system: metric\n  time_zone: UTC\n  currency: EUR\n"
            "  country: DE\n"
            f"http:\n  server_host: 127.0.0.1\n  server_port: {self.port}\n"
            "api:\nlogger:\n  default: warning\n")
        storage = self.folder / ".storage"
        storage.mkdir(exist_ok=True)
        mqtt = {"broker": "127.0.0.1", "port": self.mqtt_port, "discovery": True,
                "discovery_prefix": "homeassistant"}
        entry = {"entry_id": uuid.uuid4().hex, "version": 1, "minor_version": 1,
                 "domain": "mqtt", "title": "127.0.0.1", "data": mqtt, "options": {},
                 "pref_disable_new_entities": False, "pref_disable_polling": False,
                 "source": "user", "unique_id": None, "disabled_by": None}
        self._store(storage, "core.config_entries", {"entries": [entry]})
        user, refresh, key = uuid.uuid4().hex, uuid.uuid4().hex, secrets.token_hex(64)
        self._store(storage, "auth", {
            "users": [{"id": user, "group_ids": ["system-admin"], "is_owner": True,
                       "is_active": True, "name": "pigateway test", "system_generated": False,
                       "local_only": False}],
            "groups": [{"id": "system-admin", "name": "Administrators"},
                       {"id": "system-users", "name": "Users"},
                       {"id": "system-read-only", "name": "Read Only"}],
            "credentials": [],
            "refresh_tokens": [{
                "id": refresh, "user_id": user, "client_id": None,
                "client_name": "pigateway test", "client_icon": None,
                "token_type": "long_lived_access_token",
                "created_at": "2024-03-01T00:00:00+00:00",
                "access_token_expiration": 86_400.0, "token": secrets.token_hex(64),
                "jwt_key": key, "last_used_at": None, "last_used_ip": None,
                "credential_id": None, "version": "2024.3.3"}]})
        self._store(storage, "onboarding", {"done": ["user", "core_config", "analytics",
                                                      "integration"]})
        self.token = _jwt(refresh, key)

    @staticmethod
    def _store(storage: Path, key: str, data: dict[str, Any]) -> None:
        (storage / key).write_text(json.dumps({"version": 1, "minor_version": 1, "key": key,
                                               "data": data}))

    def start(self, timeout: float = 90.0) -> None:
        """Start it (again: with the storage it kept) and wait until its API answers."""
        if not self.token:
            self.write_config()
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [str(HASS), "--config", str(self.folder), "--skip-pip", "--log-no-color"],
                stdout=out, stderr=out, cwd=self.folder, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Home Assistant exited: {self.tail()}")
            try:
                if self.get("/api/").get("message") == "API running.":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Home Assistant's API did not answer in {timeout}s: {self.tail()}")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One call of HA's REST API; an HTTP error is :class:`ApiError` (with its status)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Authorization": f"Bearer {self.token}",
                                  "Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
        finally:
            conn.close()
        if reply.status >= 400:
            raise ApiError(reply.status, data[:300])
        return json.loads(data)

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """The entity's state object, None when HA has no such entity."""
        try:
            state: dict[str, Any] = self.get(f"/api/states/{entity_id}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return state

    def listening(self) -> list[str]:
        """The addresses its process listens on (TCP and UDP), as ``ss`` shows them."""
        assert self.process is not None
        table = subprocess.run(["ss", "-Htulnp"], capture_output=True, text=True, timeout=10,
                               check=True).stdout
        mine = [line.split() for line in table.splitlines()
                if f"pid={self.process.pid}," in line]
        return sorted(fields[4] for fields in mine)

    def tail(self, size: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        terminate(process)

    def __enter__(self) -> HomeAssistant:
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ is not called when __enter__ fails
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
