"""The MQTT client of the command-line tools (simulate, watch): same broker settings as
the daemon (protocol, credentials, TLS), none of its delivery machinery."""

from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config import MqttConfig
from daemon.errors import BrokerError
from daemon.tls import client_context, describe_failure


def connect_tool_client(
    cfg: MqttConfig, client_id: str = "", max_inflight: int | None = None
) -> paho.Client:
    """A connected (not yet looping) paho client; BrokerError if the broker is unreachable."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311,
    )
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.secret())
    if cfg.tls.enabled:
        client.tls_set_context(client_context(cfg.tls))
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)  # only possible before connecting
    try:
        client.connect(cfg.host, cfg.port, 30)
    except ssl.SSLError as exc:
        raise BrokerError(f"broker at {cfg.host}:{cfg.port}: {describe_failure(exc)}") from exc
    except OSError as exc:
        raise BrokerError(f"cannot reach broker at {cfg.host}:{cfg.port}: {exc}") from exc
    return client
