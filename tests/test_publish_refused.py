"""A verdict or alert the broker refuses (MQTT 5: a PUBACK with "Not authorized" when its
ACL does not let the daemon write the topic) is not at the broker: its reading stays
unacknowledged, readiness says why, and it is published again until it is accepted."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from daemon.config import Settings
from tests.broker import Broker
from tests.broker import acl_broker as make_acl_broker
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_end_to_end import _alert_at_once, http_get, metric

pytestmark = pytest.mark.integration

# Anonymous clients (the test's publisher and collector) may do anything; the daemon logs
# in as ``anomalyd`` and may write its results, except (at first) alerts.
ACL_WITHOUT_ALERTS = """\
topic readwrite #

user anomalyd
topic read sensors/+/readings
topic write anomaly/status
topic write anomaly/dead-letter
topic write anomaly/+/verdict
topic write anomaly/+/presence
"""
ACL_WITH_ALERTS = ACL_WITHOUT_ALERTS + "topic write anomaly/+/alert\n"


@pytest.fixture
def acl_broker() -> Iterator[tuple[Broker, Path]]:
    with make_acl_broker(ACL_WITHOUT_ALERTS) as pair:
        yield pair


def _as_anomalyd(broker: Broker, model_dir: Path) -> Settings:
    """The daemon's settings on the ACL broker: logged in as ``anomalyd``, an alert at the
    first anomalous verdict."""
    return _alert_at_once(make_settings(
        broker, model_dir, username="anomalyd", password=SecretStr("secret")))


def test_a_refused_alert_holds_its_reading_until_the_broker_accepts_it(
    acl_broker: tuple[Broker, Path], start_daemon: Any, collector_for: Any,
    publisher_for: Any, trained_model_dir: Path,
) -> None:
    broker, acl = acl_broker
    settings = _as_anomalyd(broker, trained_model_dir)
    svc = start_daemon(settings=settings)
    port = svc.http.port
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    pub.send("sensors/acl-1/readings", {**NORMAL, "seq": 1})
    col.wait_for(lambda t, p: t == "anomaly/acl-1/verdict")
    assert http_get(port, "/ready")[0] == 200

    pub.send("sensors/acl-1/readings", {**ANOMALOUS, "seq": 2})  # raises the alert
    col.wait_for(lambda t, p: t == "anomaly/acl-1/verdict" and orjson.loads(p)["seq"] == 2)
    deadline = time.monotonic() + 10
    while (status := http_get(port, "/ready"))[0] == 200:
        assert time.monotonic() < deadline, "the refusal never showed in /ready"
        time.sleep(0.05)
    assert status[0] == 503
    assert status[1]["broker_error"] == (
        "the broker refuses publishes to anomaly/acl-1/alert: Not authorized")
    _, text = http_get(port, "/metrics")
    assert metric(text, "anomalyd_publish_refusals_total", reason="Not authorized") >= 1
    assert http_get(port, "/info")[1]["unacked_inputs"] == 1  # the reading waits for its alert
    assert not [t for t, *_ in col.messages if t == "anomaly/acl-1/alert"]

    # The operator fixes the ACL and reloads the broker: the alert goes out, by itself.
    acl.write_text(ACL_WITH_ALERTS)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    (_, alert), = col.wait_for(lambda t, p: t == "anomaly/acl-1/alert", timeout=40)
    assert orjson.loads(alert)["state"] == "raised"
    deadline = time.monotonic() + 10
    while (status := http_get(port, "/ready"))[0] != 200:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert "broker_error" not in status[1]
    deadline = time.monotonic() + 10
    while http_get(port, "/info")[1]["unacked_inputs"] != 0:
        assert time.monotonic() < deadline, "the held reading was never acknowledged"
        time.sleep(0.05)


def test_a_graceful_stop_does_not_wait_for_a_refused_result(
    acl_broker: tuple[Broker, Path], start_daemon: Any, collector_for: Any,
    publisher_for: Any, trained_model_dir: Path,
) -> None:
    broker, _ = acl_broker
    settings = _as_anomalyd(broker, trained_model_dir)
    service = settings.service.model_copy(update={"shutdown_timeout_s": 60.0})
    svc = start_daemon(settings=settings.model_copy(update={"service": service}))
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    pub.send("sensors/acl-2/readings", {**ANOMALOUS, "seq": 1})  # its alert is refused
    col.wait_for(lambda t, p: t == "anomaly/acl-2/verdict")
    deadline = time.monotonic() + 10
    while svc.mqtt.refusal is None:
        assert time.monotonic() < deadline, "the alert was not refused"
        time.sleep(0.05)

    t0 = time.monotonic()
    clean = svc.shutdown()
    took = time.monotonic() - t0
    # Not the 60 s allowed: nothing but the refused alert was left to wait for. Its
    # reading stays unacknowledged at the broker, for the next run.
    assert took < 30, took
    assert clean is False  # "stopped_with_work_left": the reading was not acknowledged
