"""``WORKERS=N``: run N daemon processes on one subscription.

Each worker is a full daemon (``anomalyd run --worker-index i``) with its own client id,
its own persistent session, state file and HTTP port (``HEALTH_PORT + i``). With device
dispatch (the default) every worker subscribes to all readings and judges those of the
devices it owns (``daemon.partition``); with shared dispatch the broker spreads readings
over them through ``$share/<group>/<filter>``. SIGTERM, SIGINT and SIGHUP (reload
the model set: ``systemctl reload``) are forwarded to every worker; the supervisor exits
with the worst exit code of its workers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import structlog

from daemon import state
from daemon.config import Settings

log = structlog.get_logger("anomalyd.supervisor")


def run_workers(settings: Settings, config: Path | None) -> int:
    n = settings.service.workers
    # Before any worker reads its file: each device's saved state to the worker that
    # owns it now (the number of workers or the dispatch may have changed).
    state.check_writable(settings.state.dir)
    state.repartition(settings.state.dir, n, settings.service.dispatch)
    base = [sys.executable, "-m", "daemon"] + (["--config", str(config)] if config else [])
    procs = [
        subprocess.Popen([*base, "run", "--worker-index", str(i)])  # noqa: S603
        for i in range(n)
    ]
    log.info("workers_started", workers=n, pids=[p.pid for p in procs])

    def forward(signum: int, frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
    codes = [p.returncode for p in procs]
    log.info("workers_stopped", exit_codes=codes)
    return max(codes)
