"""Credentials and TLS: where secrets are read, for the uplink and the ``mqtt`` handler.

Secrets come from a file named in the config or from a systemd credential
(``LoadCredential=``, found under ``$CREDENTIALS_DIRECTORY``); they never sit in the config
itself. The TLS context always verifies the broker's certificate and hostname.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from pigateway.config import LocalConfig, MqttConfig, TlsConfig
from pigateway.errors import LinkFault


def credential(name: str) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` (systemd ``LoadCredential=``) when it exists."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / name
    return path if path.is_file() else None


#: The most bytes an MQTT password (binary data with a two-byte length) carries.
MAX_PASSWORD_BYTES = 65_535


def read_secret(path: Path) -> str:
    """The secret in ``path`` (UTF-8; trailing line breaks, CR or LF, dropped: an editor or an
    ``echo`` adds them, and no broker password ends with one in practice).

    Raises ``OSError`` or ``UnicodeDecodeError``: the caller says which setting named it;
    ``ValueError`` for one longer than an MQTT password carries (read no further: a file
    named by mistake, a certificate bundle or a log, would make every CONNECT fail to pack).
    """
    with path.open("rb") as file:
        data = file.read(MAX_PASSWORD_BYTES + 3)  # the secret and a CRLF, and one byte more
    secret = None if len(data) > MAX_PASSWORD_BYTES + 2 else data.decode().rstrip("\r\n")
    if secret is None or len(secret.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"it holds more than {MAX_PASSWORD_BYTES:,} bytes, the most an "
                         "MQTT password carries")
    return secret


def broker_password(mqtt: MqttConfig) -> str | None:
    """The broker password from ``password_file`` or the credential ``mqtt-password``."""
    path = mqtt.password_file or credential("mqtt-password")
    if path is None:
        return None
    try:
        return read_secret(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError too
        raise LinkFault(f"cannot read the MQTT password from {path}: {exc}") from exc


def local_password(local: LocalConfig) -> str | None:
    """The local broker's password (``[local]``: ingest's, and the Home Assistant link's when
    it uses that broker) from ``password_file`` or the credential ``local-password``; none
    without a ``username``."""
    path = local.password_file or credential("local-password")
    if local.username is None or path is None:
        return None
    try:
        return read_secret(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError too
        raise LinkFault(f"cannot read local.password_file {path}: {exc}") from exc


def tls_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """A client TLS context that verifies the broker's certificate and hostname."""
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            key = tls.key_file or credential("mqtt-key")
            context.load_cert_chain(str(tls.cert_file), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise LinkFault(f"TLS set-up failed (mqtt.tls): {exc}") from exc
    return context
