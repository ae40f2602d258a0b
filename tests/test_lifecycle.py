"""Shutdown: signals, and a reading that arrives while the scorer finishes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import service
from daemon.acks import Inbound
from tests.broker import Broker, free_port
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.faults import DaemonProcess, http_get

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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_daemon_still_waiting_for_its_broker(
    tmp_path: Path, trained_model_dir: Path, sig: int
) -> None:
    """No broker yet and ``connect_timeout_s = 0`` (wait for ever): the daemon is alive
    (``/health`` 200, ``starting``) but not ready, and SIGTERM or Ctrl-C stops it at once
    with exit 0 (it has taken nothing). Before, both signals were logged and ignored until
    the broker came (with the default 30 s: until the timeout, exit 3); a liveness probe
    saw ``unhealthy`` meanwhile."""
    config = tmp_path / "anomalyd.toml"
    config.write_text("[mqtt]\nconnect_timeout_s = 0\n")
    daemon = DaemonProcess("127.0.0.1", free_port(), trained_model_dir, tmp_path, config)
    daemon.start(wait=False)
    try:
        for _ in range(600):
            if "broker_unreachable" in daemon.log_tail() and daemon.status("/health"):
                break
            time.sleep(0.05)
        status, body = http_get(daemon.http_port, "/health")
        assert status == 200 and json.loads(body)["status"] == "starting", body
        assert daemon.status("/ready") == 503
        daemon.signal(sig)
        assert daemon.wait(10) == 0, daemon.log_tail()
        assert "before any reading was taken" in daemon.log_tail()
    finally:
        daemon.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_signal_stops_a_daemon_whose_handover_waits_for_its_broker(
    tmp_path: Path, trained_model_dir: Path, workers: int
) -> None:
    """A change of layout to hand over while the broker is down (``connect_timeout_s =
    0``): SIGTERM stops the wait at once, exit 0, and the record is left for the next
    start. Before, the handover's connection retried until the broker came (a single
    daemon until 0ee62f8; the supervisor of ``workers = 2`` until it watched for signals
    during its handover)."""
    from daemon import sessions

    port = free_port()
    config = tmp_path / "anomalyd.toml"
    config.write_text(f"[mqtt]\nconnect_timeout_s = 0\n[service]\nworkers = {workers}\n")
    daemon = DaemonProcess("127.0.0.1", port, trained_model_dir, tmp_path, config)
    # the other layout's sessions: two workers' for a single daemon, and the other way
    record = {"broker": f"127.0.0.1:{port}", "dispatch": "device",
              "sessions": {f"{daemon.client_id}-0": "sensors/+/readings",
                           f"{daemon.client_id}-1": "sensors/+/readings"}} if workers == 1 else {
        "broker": f"127.0.0.1:{port}", "dispatch": "single",
        "sessions": {daemon.client_id: "sensors/+/readings"}}
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / sessions.SESSIONS_FILE).write_text(json.dumps(record))
    daemon.start(wait=False)
    try:
        for _ in range(600):
            if "broker_unreachable" in daemon.log_tail():
                break
            time.sleep(0.05)
        assert "broker_unreachable" in daemon.log_tail()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, daemon.log_tail()
        left = json.loads((tmp_path / "state" / sessions.SESSIONS_FILE).read_text())
        assert sorted(left["sessions"]) == sorted(record["sessions"])  # for the next start
        assert "workers_started" not in daemon.log_tail()
    finally:
        daemon.close()


def test_a_stop_whose_state_cannot_be_saved_exits_1_and_says_so(
    tmp_path: Path, trained_model_dir: Path
) -> None:
    """A full state disk made the stop's save fail: the daemon logged the failure, then
    "stopped", and exited 0, so a service manager took it for a clean stop while every
    device's window, baseline and alert state since the last save was lost. It now exits
    1 with ``stopped_without_saving_state``. Here a directory stands where the state file
    goes (the atomic rename cannot replace it), so every save fails as on a full disk;
    the same stop without it exits 0."""
    from tests.mqtt_client import Collector, Publisher

    broker = Broker().start()
    collector = Collector(broker.host, broker.port, ["anomaly/+/verdict"])
    publisher = Publisher(broker.host, broker.port)
    try:
        for blocked in (True, False):
            work = tmp_path / ("blocked" if blocked else "free")
            work.mkdir()
            daemon = DaemonProcess(broker.host, broker.port, trained_model_dir, work)
            try:
                daemon.start()
                if blocked:
                    (work / "state" / "devices.json" / "in-the-way").mkdir(parents=True)
                device = f"pump-{work.name}"
                publisher.send(f"sensors/{device}/readings", NORMAL)
                collector.wait_for(lambda t, _, d=device: t == f"anomaly/{d}/verdict")
                daemon.signal(signal.SIGTERM)
                code = daemon.wait(30)
                log = daemon.log_tail(20_000)
                if blocked:
                    assert code == 1, log
                    assert '"event": "state_save_failed"' in log
                    assert '"event": "stopped_without_saving_state"' in log
                    assert '"event": "stopped",' not in log
                else:
                    assert code == 0, log
                    assert (work / "state" / "devices.json").is_file()
                    assert "stopped_without_saving_state" not in log
            finally:
                daemon.close()
    finally:
        publisher.close()
        collector.close()
        broker.stop()


def test_a_clean_stop_logs_its_own_disconnects_as_info_and_a_broker_stop_as_warning(
    fresh_broker: Broker, start_daemon: Any
) -> None:
    """Every SIGTERM logged two broker_disconnected warnings ("Normal disconnection"): a
    clean stop paged whoever alerts on the log's warnings."""
    from structlog.testing import capture_logs

    svc = start_daemon(fresh_broker)
    with capture_logs() as logs:
        fresh_broker.stop()  # the broker goes away: that is worth a warning
        _until(lambda: not svc.mqtt.connected)
        _until(lambda: sum(e["event"] == "broker_disconnected" for e in logs) == 2)
    assert {e["log_level"] for e in logs if e["event"] == "broker_disconnected"} == {"warning"}
    fresh_broker.start()
    _until(lambda: svc.mqtt.connected)
    with capture_logs() as logs:
        assert svc.shutdown() is True
    said = [e for e in logs if e["event"] == "broker_disconnected"]
    assert said and {e["log_level"] for e in said} == {"info"}, said


def test_the_started_line_names_the_state_file_in_full(
    monkeypatch: pytest.MonkeyPatch,  # first: its chdir is undone after the daemon stops
    broker: Broker, start_daemon: Any, trained_model_dir: Path, tmp_path: Path,
) -> None:
    """The default state.dir, "state", is relative to the working directory: a daemon run
    from another directory starts every device afresh in another state/, and with no
    saved state there the log named no path at all."""
    from structlog.testing import capture_logs

    from daemon.config import StateConfig
    from tests.conftest import make_settings

    monkeypatch.chdir(tmp_path)
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(update={"state": StateConfig(dir=Path("plant-state"))})
    with capture_logs() as logs:
        start_daemon(settings=settings)
    started = [e for e in logs if e["event"] == "started"]
    assert started and started[0]["state_file"] == str(tmp_path / "plant-state" / "devices.json")


def test_run_warns_of_a_variable_it_does_not_read(
    monkeypatch: pytest.MonkeyPatch, broker: Broker, trained_model_dir: Path, tmp_path: Path,
) -> None:
    """MQTT_PASWORD (misspelt) was ignored without a word: the daemon ran without the
    password its operator meant to give (check-config says so too, tests/test_cli.py)."""
    monkeypatch.setenv("MQTT_PASWORD", "pw-123456")
    daemon = DaemonProcess(broker.host, broker.port, trained_model_dir, tmp_path).start()
    try:
        said = [json.loads(line) for line in daemon.log_text().splitlines()
                if "environment_not_read" in line]
        assert len(said) == 1 and said[0]["variables"] == ["MQTT_PASWORD"], daemon.log_tail()
        assert said[0]["level"] == "warning" and "pw-123456" not in daemon.log_text()
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        daemon.close()
