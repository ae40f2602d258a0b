"""A soak under load: one fault after another, drawn at random (seeded), against the daemon
as a real process behind a proxy and a real Mosquitto, while a paced QoS 1 load runs
throughout (``tests.faults``).

The faults: the daemon stopped and started again (SIGTERM); its layout changed (one
process <-> two workers, so the broker sessions are handed over while readings keep
coming); such a change cut short (the new start SIGKILLed, with its workers, at a random
moment of its handover or just after it, then started again with the same layout); the
daemon, or one worker, SIGKILLed; the broker restarted (SIGTERM: it saves its database);
every link through the proxy reset. Each one alone has its own test; here they
meet each other's leftovers (a handover after a kill, a broker restart right after a
layout change, ...). At the end every reading the broker acknowledged must have a verdict;
duplicates are allowed (at least once) and printed with the tally.

``ANOMALYD_SOAK_SEED`` and ``ANOMALYD_SOAK_FAULTS`` choose another run; a failure names
its seed and faults, so it can be run again.
"""

from __future__ import annotations

import bisect
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.faults import (
    DATA,
    DaemonProcess,
    LoadPublisher,
    Proxy,
    VerdictCounter,
    record,
    tally,
    worker_pid,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = int(os.environ.get("ANOMALYD_SOAK_SEED", "20261207"))
FAULTS = int(os.environ.get("ANOMALYD_SOAK_FAULTS", "12"))
RATE = 100.0  # readings/s over 8 devices
KINDS = ("restart", "layout", "cut", "kill", "broker", "reset")


def _flowing(counter: VerdictCounter, more: int, daemon: DaemonProcess, what: str) -> None:
    """Until ``more`` further verdicts have arrived: the load flows end to end again."""
    target = counter.count() + more
    deadline = time.monotonic() + 90
    while counter.count() < target:
        assert time.monotonic() < deadline, f"no verdicts after {what}: " + daemon.log_tail()
        time.sleep(0.05)


def _handover_begun(daemon: DaemonProcess) -> None:
    """Until the start has re-cut the saved state for its layout, the step before its
    handover."""
    deadline = time.monotonic() + 60
    while "state_repartitioned" not in daemon.log_tail():
        assert time.monotonic() < deadline, "no handover began: " + daemon.log_tail()
        time.sleep(0.01)


def _repeats_by_fault(counter: VerdictCounter, began: list[float],
                      done: list[str]) -> list[tuple[str, int]]:
    """How many readings were judged more than once with their last verdict after each
    fault (before the next): which faults the duplicates come from."""
    counts = [0] * len(done)
    with counter._lock:
        again = [counter.last_at[k] for k, n in counter.keys.items() if n > 1]
    for t in again:
        i = bisect.bisect_right(began, t) - 1
        if i >= 0:
            counts[i] += 1
    return list(zip(done, counts, strict=True))


def test_a_run_of_faults_under_load_loses_no_acknowledged_reading(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    broker = Broker().start()
    proxy = Proxy(broker.host, broker.port)
    config = tmp_path / "anomalyd.toml"
    layout = {"workers": 1}

    def configure() -> None:
        config.write_text((DATA / "faults.toml").read_text()
                          + f"\n[service]\nworkers = {layout['workers']}\n")

    configure()
    daemon = DaemonProcess(broker.host, proxy.port, trained_model_dir, tmp_path, config)
    counter = VerdictCounter(broker.host, broker.port, prefix="soak")
    pub: LoadPublisher | None = None
    done: list[str] = []
    began: list[float] = []  # when each fault began (monotonic)
    try:
        daemon.start()
        pub = LoadPublisher(broker.host, broker.port, RATE, devices=8, prefix="soak").start()
        _flowing(counter, 200, daemon, "the start")
        for _ in range(FAULTS):
            time.sleep(rng.uniform(0.2, 3.0))  # the faults land at other moments each time
            kind = rng.choice(KINDS)
            began.append(time.monotonic())
            if kind in ("restart", "layout", "cut"):
                daemon.signal(signal.SIGTERM)
                assert daemon.wait(60) == 0, daemon.log_tail()
                if kind != "restart":
                    layout["workers"] = 3 - layout["workers"]
                    configure()
                if kind == "cut":
                    daemon.start(wait=False)
                    _handover_begun(daemon)
                    time.sleep(rng.uniform(0.0, 0.4))  # a handover takes 0.1-0.5 s here
                    daemon.close()  # SIGKILL, and its workers'
                daemon.start()
            elif kind == "kill" and layout["workers"] == 1:
                daemon.kill()
                daemon.start()
            elif kind == "kill":  # a worker: its supervisor starts it again
                assert daemon.proc is not None
                os.kill(worker_pid(daemon.proc.pid, rng.randrange(2)), signal.SIGKILL)
            elif kind == "broker":
                broker.restart()
            else:
                proxy.reset()
            done.append(f"{kind} ({layout['workers']} worker{'s' * (layout['workers'] > 1)})")
            _flowing(counter, 100, daemon, done[-1])
        result = tally("soak", pub, counter, timeout=120.0)
        with counter._lock:
            unmarked = sum(1 for k, n in counter.keys.items() if counter.marked[k] < n - 1)
        result.notes.update(seed=SEED, faults=done,
                            judged_twice_after=_repeats_by_fault(counter, began, done),
                            judged_again_without_repeat_mark=unmarked)
        record(result)
        print(result)
        dead = list(counter.dead)
    finally:
        if pub is not None:
            pub.close()
        counter.close()
        daemon.close()
        proxy.close()
        broker.stop(signal.SIGKILL)
    assert result.accepted > 0.9 * result.sent, result  # the load did reach the broker
    assert result.lost == 0, (f"seed {SEED}, faults {done}: {result.lost} acknowledged "
                              f"readings without a verdict, e.g. {result.lost_seqs[:10]}\n"
                              + daemon.log_tail())
    assert not dead, dead[:3]
