"""``WORKERS=N``: run N daemon processes on one subscription.

Each worker is a full daemon (``anomalyd run --worker-index i``) with its own client id,
its own persistent session, state file and HTTP port (``HEALTH_PORT + i``). With device
dispatch (the default) every worker subscribes to all readings and judges those of the
devices it owns (``daemon.partition``); with shared dispatch the broker spreads readings
over them through ``$share/<group>/<filter>``.

SIGTERM, SIGINT and SIGHUP (reload the model set: ``systemctl reload``) are forwarded to
every worker, once: the workers run in their own session, so a Ctrl-C in a terminal
reaches them through the supervisor only (a second signal would force their stop). A
worker that exits while nobody asked it to (killed by the kernel's OOM killer, its scorer
crashed, the broker unreachable at its start) is started again after a delay that doubles
while it keeps failing; its persistent session has kept its readings meanwhile. A worker
that exits with a configuration or model error (exit 2), or whose login the broker refused
(exit 4), stops them all: the others would meet the same error. The supervisor exits with
the worst exit code of its workers (a worker killed by a signal counts as 128 + the
signal's number, except by the stop it was sent while still starting: that is the stop
asked for, 0).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from daemon import sessions, state
from daemon.config import Settings
from daemon.errors import ConfigError, StoppedWhileStartingError
from daemon.exit_codes import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from daemon.http import check_port_free

log = structlog.get_logger("anomalyd.supervisor")

#: The first restart of a worker that exited waits this long; each further exit within
#: ``STABLE_S`` of its start doubles the wait, up to ``RESTART_MAX_S``.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
POLL_S = 0.2


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it: killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Worker:
    """One worker process, started again after an exit nobody asked for."""

    def __init__(self, index: int, command: list[str], keep_fds: tuple[int, ...] = ()) -> None:
        self.index = index
        self.command = command
        self._keep_fds = keep_fds
        self.delay = RESTART_FIRST_S
        self.restart_at: float | None = None
        self.started_at = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        # Its own session: signals sent to the supervisor's process group (a terminal's
        # Ctrl-C) do not reach it twice.
        # The state directory's lock goes with it (``keep_fds``): a worker that outlives a
        # killed supervisor still holds the directory against a second daemon.
        self.proc = subprocess.Popen(self.command, start_new_session=True,  # noqa: S603
                                     pass_fds=self._keep_fds)
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signum)

    def exited(self) -> int | None:
        """The exit code of a process that has exited and not been handled yet."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = exit_code(self.proc.returncode)
        self.proc = None
        return code

    def schedule_restart(self, now: float) -> float:
        if now - self.started_at >= STABLE_S:
            self.delay = RESTART_FIRST_S
        wait = self.delay
        self.restart_at = now + wait
        self.delay = min(self.delay * 2, RESTART_MAX_S)
        return wait


def run_workers(settings: Settings, config: Path | None) -> int:
    n = settings.service.workers
    state.check_writable(settings.state.dir)
    # each worker's port, before anything changes for workers that could not serve
    # (seen: the state re-cut and the sessions handed over to 2 workers, then worker 1
    # failed on its port and every worker stopped)
    try:
        for i in range(n if settings.http.port else 0):
            check_port_free(settings.http.host, settings.http.port + i)
    except ConfigError:
        # the same configuration started twice takes the port too: the state directory's
        # lock says so better ("in use by another anomalyd (pid ...)") than the port
        if (settings.state.dir / state.LOCK_FILE).exists():  # (none: no one holds it)
            os.close(state.lock(settings.state.dir))
        raise
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def hand_over(signum: int, frame: FrameType | None) -> None:
        signals.put(signum)  # acted on below: a handler must take no lock

    # Before the handover below, which a stop ends where it waits (for the broker, or
    # between two connection attempts): what it took is on disk for the next start.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, hand_over)
    try:
        lock = _take_over(settings, signals)
    except StoppedWhileStartingError as exc:
        log.info("stopped", note=f"{exc}: before any worker started; the next start "
                                 "finishes the handover")
        return EXIT_OK
    base = [sys.executable, "-m", "daemon"] + (["--config", str(config)] if config else [])
    workers = [Worker(i, [*base, "run", "--worker-index", str(i),
                          "--supervisor-pid", str(os.getpid())], (lock,)) for i in range(n)]
    log.info("workers_started", workers=n, pids=[w.proc.pid for w in workers if w.proc])
    return _supervise(workers, signals)


def _take_over(settings: Settings, signals: queue.SimpleQueue[int]) -> int:
    """``sessions.take_over`` before any worker reads its file: each device's saved state
    to the worker that owns it now, the previous layout's broker sessions handed over to
    this one's (the number of workers or the dispatch may have changed). Returns the state
    directory's lock, held until the supervisor and its workers end.

    A SIGTERM or SIGINT meanwhile stops it where it waits (a broker that is down, with
    ``connect_timeout_s = 0``, is waited for without end) and, if it had finished, keeps
    the workers from starting: StoppedWhileStartingError either way. A SIGHUP is dropped:
    the workers load the model set as they start."""
    stop = threading.Event()
    done = threading.Event()

    def take_signals() -> None:
        while not done.is_set():
            try:
                signum = signals.get(timeout=POLL_S)
            except queue.Empty:
                continue
            log.warning("signal", signal=signal.Signals(signum).name,
                        action="ignored: no worker has started yet" if signum == signal.SIGHUP
                        else "stop the handover")
            if signum != signal.SIGHUP:
                stop.set()

    taker = threading.Thread(target=take_signals, name="signals", daemon=True)
    taker.start()
    try:
        lock = sessions.take_over(settings, settings.state.dir, settings.service.workers, stop)
    finally:
        done.set()
        taker.join()
    if stop.is_set():
        os.close(lock)
        raise StoppedWhileStartingError("stopped after the handover")
    return lock


def _supervise(workers: list[Worker], signals: queue.SimpleQueue[int]) -> int:
    stopping = False
    worst = EXIT_OK
    codes: dict[int, int] = {}
    stops_sent: set[int] = set()
    while True:
        try:
            signum: int | None = signals.get(timeout=POLL_S)
        except queue.Empty:
            signum = None
        if signum is not None:
            stopping = stopping or signum != signal.SIGHUP
            if signum != signal.SIGHUP:
                stops_sent.add(signum)
            for w in workers:
                w.signal(signum)
        now = time.monotonic()
        for w in workers:
            code = w.exited()
            if code is not None:
                if stopping and code - 128 in stops_sent:
                    # ended by the stop it was sent, before its handlers were in place (a
                    # worker still starting, or started again after an exit): it had taken
                    # nothing yet, so this is the stop asked for, not a failure
                    code = EXIT_OK
                codes[w.index] = code
                if stopping:
                    continue
                if code in (EXIT_USAGE, EXIT_REFUSED):
                    log.error("worker_failed", worker=w.index, exit_code=code,
                              action="stopping every worker: they share its configuration, "
                                     "models and broker login")
                    worst, stopping = code, True
                    stops_sent.add(signal.SIGTERM)
                    for other in workers:
                        other.signal(signal.SIGTERM)
                    continue
                wait = w.schedule_restart(now)
                log.warning("worker_exited", worker=w.index, exit_code=code,
                            restart_in_s=wait)
            elif not stopping and w.restart_at is not None and now >= w.restart_at:
                w.start()
                log.info("worker_restarted", worker=w.index, pid=w.proc.pid if w.proc else None)
        if stopping and not any(w.running for w in workers):
            log.info("workers_stopped", exit_codes=[codes.get(w.index) for w in workers])
            return max([worst, *codes.values()])
