"""Shutdown: signals, and a reading that arrives while the scorer finishes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from daemon import service
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


class _LogRecorder:
    """Stands in for the service module's logger: each line with the thread it was
    written on."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def write(event: str, **kw: Any) -> None:
            self.lines.append((threading.current_thread().name, event, kw))
        return write


@pytest.fixture
def own_signal_handlers() -> Iterator[None]:
    """Puts back this process's handlers after a test installed the daemon's."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


def _until(check: Any) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_signal_is_acted_on_and_logged_outside_its_handler(
    broker: Broker, start_daemon: Any, monkeypatch: pytest.MonkeyPatch,
    own_signal_handlers: None,
) -> None:
    """A handler runs on the main thread, perhaps while that thread is inside a log line
    and holds its lock: a handler that logged would wait for itself forever."""
    svc = start_daemon(broker)
    recorder = _LogRecorder()
    monkeypatch.setattr(service, "log", recorder)
    svc.install_signal_handlers()  # as run() does, on this (the main) thread
    os.kill(os.getpid(), signal.SIGTERM)
    _until(lambda: svc.stopping)
    assert not svc._forced.is_set()
    os.kill(os.getpid(), signal.SIGTERM)  # a second one forces the stop
    _until(svc._forced.is_set)
    signals = [(thread, kw["action"]) for thread, event, kw in recorder.lines
               if event == "signal"]
    assert signals == [("signals", "graceful stop"), ("signals", "forced stop")]
