"""A reading the broker delivers with the retain flag is its stored copy of the last one a
device published retained, sent because the daemon subscribed: at every start, and with
MQTT 3.1.1 at every reconnection. It is acknowledged unjudged (``readings.retained``);
live readings, and those queued for the daemon's session while it was away, arrive
without the flag and are judged, whether their device set it or not."""

from __future__ import annotations

import time
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
import structlog

from daemon.config import ReadingsConfig, Settings
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_end_to_end import http_get

pytestmark = pytest.mark.integration


def _publish_retained(broker: Broker, topic: str, body: dict[str, Any]) -> None:
    """What a device that publishes its state retained does (Tasmota, Shelly, ...)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="retaining-device")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish(topic, orjson.dumps(body), qos=1, retain=True).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


def _skipped(svc: Any) -> float:
    value: float = svc.metrics.retained_skipped._value.get()
    return value


def _seqs(col: Any) -> list[int]:
    return [orjson.loads(p)["seq"] for t, p, *_ in col.messages if t.endswith("/verdict")]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_brokers_stored_copy_is_skipped_and_live_or_queued_readings_are_judged(
    fresh_broker: Broker, start_daemon: Any, collector_for: Any, trained_model_dir: Any,
    protocol: str,
) -> None:
    topic = "sensors/ret-1/readings"
    _publish_retained(fresh_broker, topic, {**NORMAL, "seq": 1})  # before the daemon ran
    col = collector_for(fresh_broker, ["anomaly/+/verdict"])
    settings = make_settings(fresh_broker, trained_model_dir, protocol=protocol)
    with structlog.testing.capture_logs() as logs:
        first = start_daemon(settings=settings)
        _publish_retained(fresh_broker, topic, {**NORMAL, "seq": 2})  # live
        col.wait_for(lambda t, p: orjson.loads(p)["seq"] == 2)
    assert _seqs(col) == [2]  # seq 1 came first, if at all: it was not judged
    assert _skipped(first) == 1
    (said,) = [e for e in logs if e.get("event") == "retained_reading_skipped"]
    assert said["topic"] == topic
    first.shutdown()

    _publish_retained(fresh_broker, topic, {**NORMAL, "seq": 3})  # queued for the session
    again = start_daemon(settings=settings)
    col.wait_for(lambda t, p: orjson.loads(p)["seq"] == 3)
    deadline = time.monotonic() + 10
    while _skipped(again) < 1:  # the stored copy of seq 3, sent at the new subscription
        assert time.monotonic() < deadline, "the stored copy was not delivered"
        time.sleep(0.05)
    time.sleep(0.5)
    assert _seqs(col) == [2, 3] and _skipped(again) == 1
    deadline = time.monotonic() + 10  # every message acknowledged, the skipped one too
    while http_get(again.http.port, "/info")[1]["unacked_inputs"] != 0:
        assert time.monotonic() < deadline, "a message was left unacknowledged"
        time.sleep(0.05)


def test_judge_makes_the_stored_copy_a_reading_again(
    fresh_broker: Broker, start_daemon: Any, collector_for: Any, trained_model_dir: Any,
) -> None:
    _publish_retained(fresh_broker, "sensors/ret-2/readings", {**NORMAL, "seq": 7})
    col = collector_for(fresh_broker, ["anomaly/+/verdict"])
    settings: Settings = make_settings(fresh_broker, trained_model_dir)
    settings = settings.model_copy(update={"readings": ReadingsConfig(retained="judge")})
    svc = start_daemon(settings=settings)
    col.wait_for(lambda t, p: orjson.loads(p)["seq"] == 7)
    assert _skipped(svc) == 0


def test_clearing_a_retained_reading_is_no_dead_letter(
    fresh_broker: Broker, start_daemon: Any, collector_for: Any, trained_model_dir: Any,
) -> None:
    """``mosquitto_pub -r -n`` (how a retained reading is cleared) reaches the daemon as a
    zero-length message: it was dead-lettered as ``not_json``; it is acknowledged unjudged
    and counted, and the device's next reading is judged as usual."""
    topic = "sensors/ret-2/readings"
    col = collector_for(fresh_broker, ["anomaly/#"])
    svc = start_daemon(settings=make_settings(fresh_broker, trained_model_dir))
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="clearing-tool")
    c.connect(fresh_broker.host, fresh_broker.port)
    c.loop_start()
    try:
        c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        c.publish(topic, orjson.dumps({**NORMAL, "seq": 7}), qos=1).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()
    col.wait_for(lambda t, p: t.endswith("/verdict") and orjson.loads(p)["seq"] == 7)
    assert not [t for t, *_ in col.messages if t == "anomaly/dead-letter"]
    assert svc.metrics.empty_skipped._value.get() == 1
