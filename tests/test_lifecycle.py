"""Shutdown: a reading that arrives while the scorer finishes is left to the broker."""

from __future__ import annotations

import time
from typing import Any

import pytest

from daemon.acks import Inbound
from tests.broker import Broker

pytestmark = pytest.mark.integration


def test_reading_queued_after_the_scorer_stopped_does_not_hold_up_shutdown(
    broker: Broker, start_daemon: Any
) -> None:
    svc = start_daemon(broker)
    svc._stopping.set()  # the scorer finishes what it has and exits
    svc._worker.join(5)
    assert not svc._worker.is_alive()
    late = Inbound(mid=4242, qos=1, topic="sensors/late/readings", payload=b"{}",
                   received_at=time.monotonic(), received_wall=time.time())
    svc.mqtt.acks.register(late)  # as the intake would, just before handing it over
    svc.queue.put(late)
    assert svc.shutdown() is True  # not "work left": the broker redelivers it
    assert len(svc.mqtt.acks) == 0
    assert svc.queue.qsize() == 0
