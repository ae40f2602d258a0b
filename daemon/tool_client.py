"""The MQTT client of the command-line tools (simulate, watch): same broker settings as
the daemon (protocol, credentials, TLS), none of its delivery machinery."""

from __future__ import annotations

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config import MqttConfig
from daemon.errors import BrokerError
from daemon.mqtt_link import connect_failure, set_credentials


def connect_tool_client(
    cfg: MqttConfig, client_id: str = "", max_inflight: int | None = None
) -> paho.Client:
    """A connected (not yet looping) paho client; BrokerError if the broker is unreachable."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311,
    )
    set_credentials(client, cfg)
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)  # only possible before connecting
    try:
        client.connect(cfg.host, cfg.port, 30)
    except OSError as exc:  # ssl.SSLError included: connect_failure says which
        raise BrokerError(connect_failure(cfg, exc)) from exc
    return client
