"""The MQTT client of the command-line tools (simulate, watch, record): same broker
settings as the daemon (protocol, credentials, TLS), none of its delivery machinery.

The tools' sessions are clean (nothing is kept for them at the broker while they are
away), so a connection that drops loses the subscriptions with it: they are made again on
every connection, and the tool is told when the link goes down and comes back (paho
reconnects by itself), so it can say that readings may be missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config import MqttConfig
from daemon.errors import BrokerError
from daemon.mqtt_link import connect_failure, set_credentials


def connect_tool_client(
    cfg: MqttConfig, client_id: str = "", max_inflight: int | None = None,
    subscriptions: Sequence[tuple[str, int]] = (),
    on_link: Callable[[bool], None] | None = None,
) -> paho.Client:
    """A connecting (not yet looping) paho client; BrokerError if the broker is unreachable.

    ``subscriptions`` (filter, QoS) are made on each connection; ``on_link(up)`` is called
    on the network thread when a connection is made (True) or lost (False).
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311,
    )
    set_credentials(client, cfg)
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)  # only possible before connecting

    def connected(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        if subscriptions:
            c.subscribe(list(subscriptions))
        if on_link is not None:
            on_link(True)

    def disconnected(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                     props: Any) -> None:
        if on_link is not None:
            on_link(False)

    client.on_connect = connected
    client.on_disconnect = disconnected
    try:
        client.connect(cfg.host, cfg.port, 30)
    except OSError as exc:  # ssl.SSLError included: connect_failure says which
        raise BrokerError(connect_failure(cfg, exc)) from exc
    return client
