"""TLS for the broker connection: a client context with safe defaults.

Certificates are verified against ``ca_file`` (or the system's trusted CAs), the broker's
host name is checked unless turned off, and nothing older than TLS 1.2 is offered.
"""

from __future__ import annotations

import ssl

from daemon.config import TlsConfig
from daemon.errors import ConfigError


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """An SSLContext for connecting to the broker; ConfigError names an unusable file."""
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file) if cfg.ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca_file {cfg.ca_file}: {_why(exc)}") from exc
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.check_hostname = cfg.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"mqtt.tls.cert_file/key_file {cfg.cert_file}: {_why(exc)}"
            ) from exc
    return ctx


def describe_failure(exc: ssl.SSLError) -> str:
    """A person's reading of a failed handshake (expired, unknown CA, wrong host...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate was rejected: {exc.verify_message}"
    return f"TLS handshake failed: {exc.reason or exc}"


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
