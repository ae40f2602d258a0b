"""Two daemons with one client id: the broker closes the older connection each time the
other connects (Mosquitto 2.0 without a reason), and both would take the session from each
other at the reconnect delay for ever. Each says so, waits longer, loses no reading, and
the one left alone becomes ready again."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon import mqtt_link
from daemon.service import Service
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_end_to_end import http_get, metric

pytestmark = pytest.mark.integration


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_two_daemons_with_one_client_id_say_so_back_off_and_lose_nothing(
    fresh_broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
    trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same rule on a shorter clock: a connection is "stable" after 4 s (60 s live),
    # and the grown reconnect delay stops at 2 s (30 s live).
    monkeypatch.setattr(mqtt_link, "STABLE_S", 4.0)
    monkeypatch.setattr(mqtt_link, "EARLY_DROP_MAX_DELAY_S", 2.0)
    settings = make_settings(fresh_broker, trained_model_dir)
    twin = settings.model_copy(update={"state": settings.state.model_copy(
        update={"dir": Path(tempfile.mkdtemp(prefix="anomalyd-state-"))})})
    col = collector_for(fresh_broker, ["anomaly/+/verdict"])
    first: Service = start_daemon(settings=settings)
    second: Service = start_daemon(settings=twin)
    assert first.settings.mqtt.client_id == second.settings.mqtt.client_id

    # Readings keep coming while the two fight over the session.
    pub = publisher_for(fresh_broker)
    sent: list[int] = []
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            pub.send("sensors/twin-1/readings", {**NORMAL, "seq": seq})
            sent.append(seq)
            time.sleep(0.02)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        _wait(lambda: first.mqtt.dropping and second.mqtt.dropping, 30,
              "both daemons to say that the broker keeps closing their links")
    finally:
        stop.set()
        publisher.join(10)

    for svc in (first, second):
        client_id = svc.settings.mqtt.client_id
        status, body = http_get(svc.http.port, "/ready")
        assert status == 503
        assert f"client id {client_id!r}" in body["broker_error"]
        assert "mqtt.client_id" in body["broker_error"]
        _, text = http_get(svc.http.port, "/metrics")
        assert metric(text, "anomalyd_broker_connection_errors_total",
                      reason="dropped_early") >= 1
        # the reconnect delay grew beyond the configured minimum on a dropping link, in
        # paho itself (which otherwise starts again from the minimum at each connection)
        links = [link for link in (svc.mqtt.intake, svc.mqtt.output) if link.dropping]
        assert links
        for link in links:
            assert link.reconnect_delay_s > svc.settings.mqtt.reconnect_min_delay_s
            assert link.client._reconnect_min_delay == link.reconnect_delay_s

    # Not one reading lost: each has a verdict from one of the two (or both).
    def judged() -> set[int]:
        return {orjson.loads(p)["seq"] for t, p, _, _ in list(col.messages)
                if t == "anomaly/twin-1/verdict"}

    _wait(lambda: judged() >= set(sent), 30,
          f"a verdict for each of the {len(sent)} readings sent during the fight")

    # Alone again, the first settles: its connection lasts, and it is ready.
    second.shutdown()
    _wait(lambda: first.mqtt.dropping is None, 20,
          "the remaining daemon to find its connection stable")
    _wait(lambda: http_get(first.http.port, "/ready")[0] == 200, 10,
          "the remaining daemon to be ready")
    for link in (first.mqtt.intake, first.mqtt.output):
        assert link.reconnect_delay_s == first.settings.mqtt.reconnect_min_delay_s
        assert link.client._reconnect_min_delay == link.reconnect_delay_s
    pub.send("sensors/twin-1/readings", {**NORMAL, "seq": 100_000})
    col.wait_for(lambda t, p: t == "anomaly/twin-1/verdict"
                 and orjson.loads(p)["seq"] == 100_000)
