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
    on_link: Callable[[bool, str], None] | None = None,
) -> paho.Client:
    """A connecting (not yet looping) paho client; BrokerError if the broker is unreachable.

    ``subscriptions`` (filter, QoS) are made on each connection; ``on_link(up, why)`` is
    called on the network thread when a connection is made (True, "") or lost or refused
    (False, the reason: e.g. the broker refused our credentials).
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id,
        protocol=paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311,
    )
    set_credentials(client, cfg)
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)  # only possible before connecting

    refused = [False]  # the last connection attempt was refused: said already

    def connected(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        refused[0] = bool(reason.is_failure)
        if refused[0]:
            if on_link is not None:
                on_link(False, f"the broker refused the connection: {reason}")
            return
        if subscriptions:
            c.subscribe(list(subscriptions))
        if on_link is not None:
            on_link(True, "")

    def disconnected(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                     props: Any) -> None:
        if on_link is not None and not refused[0]:
            on_link(False, "connection lost")

    client.on_connect = connected
    client.on_disconnect = disconnected
    try:
        client.connect(cfg.host, cfg.port, 30)
    except OSError as exc:  # ssl.SSLError included: connect_failure says which
        raise BrokerError(connect_failure(cfg, exc)) from exc
    return client
