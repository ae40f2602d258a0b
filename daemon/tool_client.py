"""The MQTT client of the command-line tools (simulate, watch, record): same broker
settings as the daemon (protocol, credentials, TLS), none of its delivery machinery.

The tools' sessions are clean by default (nothing is kept for them at the broker while
they are away), so a connection that drops loses the subscriptions with it: they are made
again on every connection, and the tool is told when the link goes down and comes back
(paho reconnects by itself), so it can say that readings may be missing. A tool that must
not miss readings (``record``) asks for a session the broker keeps for a while
(``session_expiry_s``, MQTT 5): a dropped link then resumes it, with what was published
meanwhile, and ``end_session`` lets the broker forget it when the tool is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import MqttConfig
from daemon.errors import BrokerError
from daemon.mqtt_link import connect_failure, set_credentials

#: ``on_link(True, RESUMED)``: the broker had kept the tool's session.
RESUMED = "resumed"


def connect_tool_client(
    cfg: MqttConfig, client_id: str = "", max_inflight: int | None = None,
    subscriptions: Sequence[tuple[str, int]] = (),
    on_link: Callable[[bool, str], None] | None = None,
    session_expiry_s: int = 0,
) -> paho.Client:
    """A connecting (not yet looping) paho client; BrokerError if the broker is unreachable.

    ``subscriptions`` (filter, QoS) are made on each connection; ``on_link(up, why)`` is
    called on the network thread when a connection is made (True: ``RESUMED`` if the broker
    kept the session, else "") or lost or refused (False, the reason: e.g. the broker
    refused our credentials). With ``session_expiry_s`` > 0 and MQTT 5 (it needs a fixed
    ``client_id``) the first connection starts a clean session that the broker keeps that
    long after a link drops, and reconnections resume it.
    """
    keep = session_expiry_s > 0 and cfg.protocol == "5"
    if keep and not client_id:
        raise ValueError("a kept session needs a fixed client id")
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
            on_link(True, RESUMED if keep and flags.session_present else "")

    def disconnected(c: paho.Client, userdata: Any, flags: Any, reason: Any,
                     props: Any) -> None:
        if on_link is not None and not refused[0]:
            on_link(False, "connection lost")

    client.on_connect = connected
    client.on_disconnect = disconnected
    properties = None
    if keep:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry_s
    try:
        # paho's default clean_start for MQTT 5: clean on the first connection only
        client.connect(cfg.host, cfg.port, 30, properties=properties)
    except OSError as exc:  # ssl.SSLError included: connect_failure says which
        raise BrokerError(connect_failure(cfg, exc)) from exc
    return client


def end_session(client: paho.Client, cfg: MqttConfig) -> None:
    """Disconnect; with MQTT 5, tell the broker to drop the session now (expiry 0) rather
    than keep queueing readings for a tool that has finished."""
    if cfg.protocol != "5":
        client.disconnect()
        return
    properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    client.disconnect(properties=properties)
