"""A daemon whose user may subscribe to the readings but not read them gets nothing from
Mosquitto 2.0, and no error: it grants the subscription and filters every message. After
a while of hearing nothing at all, the daemon says so (``no_readings``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from pydantic import SecretStr

from daemon import service
from tests.broker import Broker, acl_broker
from tests.conftest import make_settings
from tests.conftest_models import NORMAL_READING as NORMAL

pytestmark = pytest.mark.integration

# Anonymous clients (the test's publisher and collector) may do anything; the daemon logs
# in as ``anomalyd`` and may write its results, but (at first) read nothing.
ACL_WITHOUT_READ = "topic readwrite #\n\nuser anomalyd\ntopic write anomaly/#\n"
ACL_WITH_READ = ACL_WITHOUT_READ + "topic read sensors/+/readings\n"


@pytest.fixture
def deaf_broker() -> Iterator[tuple[Broker, Path]]:
    with acl_broker(ACL_WITHOUT_READ) as pair:
        yield pair


def _warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in list(logs) if e.get("event") == "no_readings"]


def test_a_subscription_that_delivers_nothing_is_said_to_once_per_silence(
    deaf_broker: tuple[Broker, Path], start_daemon: Any, collector_for: Any,
    publisher_for: Any, trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, acl = deaf_broker
    monkeypatch.setattr(service, "NO_READINGS_WARN_S", 2.0)  # 300 s live
    settings = make_settings(broker, trained_model_dir, username="anomalyd",
                             password=SecretStr("secret"))
    col = collector_for(broker, ["anomaly/+/verdict"])
    pub = publisher_for(broker)
    with structlog.testing.capture_logs() as logs:
        svc = start_daemon(settings=settings)
        for seq in range(1, 6):  # the broker takes them, and hands the daemon none
            pub.send("sensors/deaf-1/readings", {**NORMAL, "seq": seq})
            time.sleep(0.5)
        deadline = time.monotonic() + 10
        while not _warnings(logs):
            assert time.monotonic() < deadline, "no no_readings warning"
            time.sleep(0.05)
        (warning,) = _warnings(logs)  # once, not every second
        assert warning["subscription"] == svc.subscription
        assert "may this daemon's user read it" in warning["hint"]
        assert not [m for m in col.messages if m[0] == "anomaly/deaf-1/verdict"]

        # The ACL fixed (and re-read by the broker): readings arrive, the silence is over.
        acl.write_text(ACL_WITH_READ)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        pub.send("sensors/deaf-1/readings", {**NORMAL, "seq": 100})
        col.wait_for(lambda t, p: t == "anomaly/deaf-1/verdict" and orjson.loads(p)["seq"] == 100)
        # (set once the batch's verdicts are handed to the broker: just after this one)
        deadline = time.monotonic() + 10
        while svc.metrics.last_reading._value.get() == 0:
            assert time.monotonic() < deadline, "anomalyd_last_reading_timestamp_seconds"
            time.sleep(0.05)
        # Silent again: a new warning, counted from that reading, not from the start.
        deadline = time.monotonic() + 10
        while len(_warnings(logs)) < 2:
            assert time.monotonic() < deadline, "no warning for the second silence"
            time.sleep(0.05)
        assert _warnings(logs)[1]["silent_s"] <= 3
