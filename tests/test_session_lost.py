"""A broker that lost the daemon's session (restarted without its database, or the session
expired) kept none of the readings published meanwhile. The daemon cannot get them back,
but it says so: ``broker_session_lost`` and ``anomalyd_broker_sessions_lost_total``."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import structlog

from daemon.config import AlertConfig
from daemon.control import Command
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL

pytestmark = pytest.mark.integration


def _reconnected(svc: Any, after: float) -> None:
    deadline = time.monotonic() + 20
    while svc.metrics.reconnects._value.get() <= after or not svc.mqtt.connected:
        assert time.monotonic() < deadline, "the daemon did not reconnect"
        time.sleep(0.05)


def _lost(svc: Any) -> float:
    value: float = svc.metrics.sessions_lost._value.get()
    return value


def test_a_broker_that_forgot_the_session_is_said_to_and_one_that_kept_it_is_not(
    fresh_broker: Broker, start_daemon: Any,
) -> None:
    svc = start_daemon(fresh_broker)
    assert _lost(svc) == 0  # its first connection ever: there was no session to find

    fresh_broker.restart()  # SIGTERM: Mosquitto saves its database and keeps the session
    _reconnected(svc, 0)
    assert _lost(svc) == 0

    fresh_broker.stop()
    (fresh_broker.workdir / "mosquitto.db").unlink()  # a broker back without its database
    fresh_broker.start()
    _reconnected(svc, 1)
    deadline = time.monotonic() + 10
    while _lost(svc) < 1:
        assert time.monotonic() < deadline, "the lost session was not noticed"
        time.sleep(0.05)
    assert _lost(svc) == 1


def test_a_restarted_daemon_expects_its_session_when_it_ran_before(
    fresh_broker: Broker, start_daemon: Any, trained_model_dir: Any,
) -> None:
    settings = make_settings(fresh_broker, trained_model_dir)
    first = start_daemon(settings=settings)
    first.shutdown()  # saves its device state: the next start knows it ran before

    again = start_daemon(settings=settings)
    assert again.mqtt.expects_session
    assert _lost(again) == 0  # the broker kept the session
    again.shutdown()

    fresh_broker.stop()
    (fresh_broker.workdir / "mosquitto.db").unlink()
    fresh_broker.start()
    third = start_daemon(settings=settings)
    deadline = time.monotonic() + 10
    while _lost(third) < 1:
        assert time.monotonic() < deadline, "the lost session was not noticed at start"
        time.sleep(0.05)


def test_readings_a_full_broker_queue_dropped_are_counted_missing(
    start_daemon: Any, collector_for: Any, publisher_for: Any, trained_model_dir: Any,
) -> None:
    """Mosquitto keeps at most ``max_queued_messages`` for an absent client and drops the
    rest without a word (the publisher got its PUBACK). A device that numbers its readings
    shows the hole: the daemon counts the readings that never arrived."""
    broker = Broker(extra_conf="max_queued_messages 10\n").start()
    try:
        settings = make_settings(broker, trained_model_dir)
        col = collector_for(broker, ["anomaly/+/verdict"])
        pub = publisher_for(broker)
        first = start_daemon(settings=settings)
        pub.send("sensors/gap-1/readings", {**NORMAL, "seq": 0})
        col.wait_for(lambda t, p: t == "anomaly/gap-1/verdict")
        first.shutdown()  # its session stays at the broker

        for seq in range(1, 51):  # 50 readings for an absent daemon: the broker keeps 10
            pub.send("sensors/gap-1/readings", {**NORMAL, "seq": seq})
        again = start_daemon(settings=settings)
        for seq in range(51, 151):  # and the device carries on
            pub.send("sensors/gap-1/readings", {**NORMAL, "seq": seq})
        col.wait_for(lambda t, p: t == "anomaly/gap-1/verdict"
                     and orjson.loads(p)["seq"] == 150)

        judged = {orjson.loads(p)["seq"] for t, p, _, _ in list(col.messages)
                  if t == "anomaly/gap-1/verdict"}
        never = set(range(151)) - judged
        assert len(never) >= 30  # the broker dropped most of the 50
        missing = again.metrics.missing._value.get()
        assert missing == len(never), sorted(never)
        summary = again.pipeline.devices.summary("gap-1")
        assert summary is not None and summary["missing_readings"] == len(never)
    finally:
        broker.stop()


def test_retained_alerts_and_presence_lost_with_the_session_are_published_again(
    fresh_broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
    trained_model_dir: Any,
) -> None:
    """A broker back without its database has lost the retained messages with the session:
    a dashboard subscribing then would see no alert where one is raised. The daemon
    publishes each active alert again as it stood (acknowledged too: the same bytes) and
    each device known to be quiet."""
    settings = make_settings(fresh_broker, trained_model_dir)
    settings = settings.model_copy(update={"alerts": AlertConfig(
        raise_after=1, window=1, quiet_after_s=1.0)})
    svc = start_daemon(settings=settings)
    pub = publisher_for(fresh_broker)
    pub.send("sensors/held-1/readings", {**ANOMALOUS, "seq": 1})
    pub.send("sensors/held-2/readings", {**ANOMALOUS, "seq": 1})
    pub.send("sensors/gone-1/readings", {**NORMAL, "seq": 1})
    watch = collector_for(fresh_broker, ["anomaly/#"])
    watch.wait_for(lambda t, p: t.endswith("/alert"), count=2)
    svc.control.call(Command("ack", "held-2", by="alice", note="isolated"))
    watch.wait_for(lambda t, p: t == "anomaly/held-2/alert"
                   and orjson.loads(p)["state"] == "acknowledged")
    watch.wait_for(lambda t, p: t.endswith("/presence") and orjson.loads(p)["state"] == "quiet",
                   count=3)
    before = _retained(collector_for(fresh_broker, ["anomaly/+/alert", "anomaly/+/presence"]), 5)
    assert orjson.loads(before["anomaly/held-2/alert"])["state"] == "acknowledged"

    with structlog.testing.capture_logs() as logs:
        fresh_broker.stop()
        (fresh_broker.workdir / "mosquitto.db").unlink()  # back without its database
        fresh_broker.start()
        deadline = time.monotonic() + 20
        while not (done := [e for e in list(logs)
                            if e.get("event") == "retained_state_published_again"]):
            assert time.monotonic() < deadline, "retained state was not published again"
            time.sleep(0.05)
    assert done[0]["alerts"] == 2 and done[0]["quiet_devices"] == 3
    after = _retained(collector_for(fresh_broker, ["anomaly/+/alert", "anomaly/+/presence"]), 5)
    # the alerts as they were, byte for byte (an acknowledged one still acknowledged)
    assert after["anomaly/held-1/alert"] == before["anomaly/held-1/alert"]
    assert after["anomaly/held-2/alert"] == before["anomaly/held-2/alert"]
    for dev in ("held-1", "held-2", "gone-1"):
        was, now = (orjson.loads(m[f"anomaly/{dev}/presence"]) for m in (before, after))
        assert now["state"] == "quiet" and now["last_seen"] == was["last_seen"]


def _retained(col: Any, count: int) -> dict[str, bytes]:
    """The retained messages a new subscriber gets: {topic: payload}."""
    col.wait_for(lambda t, p: True, count=count)
    time.sleep(0.3)  # no more than these
    got = {t: p for t, p, retained, _ in col.messages if retained}
    assert len(got) == count == len(col.messages), [m[0] for m in col.messages]
    return got
