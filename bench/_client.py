"""The paho set-up every bench process shares: MQTT v5, TCP_NODELAY, loopback only."""

from __future__ import annotations

import socket
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

LOOPBACK = "127.0.0.1"


def connect(
    port: int, client_id: str, *, receive_maximum: int | None = None, max_inflight: int = 1000,
    subscribe: list[str] | None = None,
) -> paho.Client:
    """A started, connected v5 client; subscriptions (QoS 1) confirmed before returning."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5)

    def nodelay(c: Any, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on; the daemon turns it off, so every bench client does too.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = nodelay
    client.max_inflight_messages_set(max_inflight)
    props = None
    if receive_maximum is not None:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_maximum
    connected, subscribed = threading.Event(), threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(LOOPBACK, port, 60, clean_start=True, properties=props)
    client.loop_start()
    if not connected.wait(10):
        raise TimeoutError(f"{client_id}: no CONNACK from 127.0.0.1:{port}")
    if subscribe:
        client.subscribe([(f, 1) for f in subscribe])
        if not subscribed.wait(10):
            raise TimeoutError(f"{client_id}: no SUBACK")
    return client


def seqs_in(doc: Any) -> list[int]:
    """The reading seqs a verdict (single or batch) or an echoed reading carries."""
    if not isinstance(doc, dict):
        return []
    if "seq" in doc:
        return [doc["seq"]]
    for key in ("predictions", "readings"):
        entries = doc.get(key)
        if isinstance(entries, list):
            return [e["seq"] for e in entries if isinstance(e, dict) and "seq" in e]
    return []
