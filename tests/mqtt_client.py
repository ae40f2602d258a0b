"""A test-side MQTT client that publishes and collects what arrives, with waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


class Collector:
    """Subscribes to ``filters`` and keeps every message: (topic, payload, retained, t)."""

    def __init__(self, host: str, port: int, filters: list[str], client_id: str | None = None):
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        if not subscribed.wait(5):
            raise TimeoutError("subscription not acknowledged")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[str, bytes], bool], count: int = 1, timeout: float = 10.0
    ) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [(t, p) for t, p, _, _ in self.messages if predicate(t, p)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"saw {len(found)} of {count} expected messages; "
                        f"all topics: {sorted({t for t, *_ in self.messages})}"
                    )
                self._cond.wait(remaining)

    def json_on(self, topic: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
        return [orjson.loads(p) for _, p in self.wait_for(lambda t, _: t == topic, count, timeout)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Publisher:
    def __init__(self, host: str, port: int):
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.connect(host, port, 30)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | dict[str, Any], qos: int = 1) -> float:
        """Publish and wait for the broker's ack; returns the monotonic time of sending."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        t = time.monotonic()
        info = self.client.publish(topic, body, qos=qos)
        info.wait_for_publish(5)
        return t

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
