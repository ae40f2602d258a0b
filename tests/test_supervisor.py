"""The supervisor's decisions, on small real processes standing in for workers (the
workers themselves: tests/test_workers.py)."""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon import supervisor
from daemon.supervisor import Worker, exit_code

# Stops with exit 0 on SIGTERM, as a worker's graceful stop does.
SERVES = ("import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
          "while True: time.sleep(0.05)\n")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _stop_after(signals: queue.SimpleQueue[int], seconds: float) -> None:
    def stop() -> None:
        time.sleep(seconds)
        signals.put(signal.SIGTERM)

    threading.Thread(target=stop, daemon=True).start()


def test_exit_codes_read_as_a_shell_reads_them() -> None:
    assert exit_code(0) == 0 and exit_code(3) == 3
    assert exit_code(-signal.SIGKILL) == 137 and exit_code(-signal.SIGTERM) == 143


def test_a_worker_stopped_while_it_starts_counts_as_stopped() -> None:
    """A worker still starting (importing, loading its models: no signal handler yet),
    or just started again after an exit, dies of the SIGTERM the supervisor forwards:
    the stop asked for, exit 0, where the supervisor exited 143 and systemd called the
    service failed (seen in tests/test_soak.py)."""
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    serving = Worker(0, _python(SERVES))
    starting = Worker(1, _python("import time; time.sleep(30)"))
    _stop_after(signals, 0.5)
    with capture_logs() as logs:
        assert supervisor._supervise([serving, starting], signals) == 0
    assert [e["exit_codes"] for e in logs if e["event"] == "workers_stopped"] == [[0, 0]]


@pytest.mark.parametrize("code", [2, 4])  # its configuration; its broker login refused
def test_a_worker_that_fails_on_its_configuration_stops_them_all(code: int) -> None:
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    serving = Worker(0, _python(SERVES))
    failing = Worker(1, _python(f"import sys; sys.exit({code})"))
    _stop_after(signals, 5.0)  # so that a supervisor that went on would still return
    with capture_logs() as logs:
        assert supervisor._supervise([serving, failing], signals) == code
    assert [e["worker"] for e in logs if e["event"] == "worker_failed"] == [1]
    assert not [e for e in logs if e["event"] == "worker_exited"]  # not started again


def test_a_worker_that_keeps_exiting_is_started_again_later_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "RESTART_FIRST_S", 0.1)
    monkeypatch.setattr(supervisor, "RESTART_MAX_S", 0.4)
    starts = tmp_path / "starts"
    crashing = Worker(1, _python(f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(1)"))
    serving = Worker(0, _python(SERVES))
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    _stop_after(signals, 2.0)
    with capture_logs() as logs:
        code = supervisor._supervise([serving, crashing], signals)
    waits = [e["restart_in_s"] for e in logs if e["event"] == "worker_exited"]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.4]  # doubling, capped
    # each exit before the stop was followed by a start (the first start is the initial one)
    assert len(starts.read_text()) >= len(waits) >= 4
    assert code == 1  # it had exited when the stop came; the other stopped with 0
