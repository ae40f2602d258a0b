"""A broker that lost the daemon's session (restarted without its database, or the session
expired) kept none of the readings published meanwhile. The daemon cannot get them back,
but it says so: ``broker_session_lost`` and ``anomalyd_broker_sessions_lost_total``."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.broker import Broker
from tests.conftest import make_settings

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
