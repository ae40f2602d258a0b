"""Which worker layout the daemon on a state directory runs, for the commands that talk
to it (``daemon.device_client``).

The configuration alone cannot say: ``WORKERS`` is often set only in the service's
environment (a systemd unit, a compose file), so an operator's shell, with the same
``--config`` but without ``WORKERS=2``, would take worker 0 for the whole daemon, and a
per-device command would reach a worker that does not own the device (a silence set
there is never used: the tester's page during a silence).

So the layout is read from ``state.dir/layout.json``. It is sound while the daemon runs:
it is written only by ``daemon.state.repartition``, called by ``daemon.sessions.take_over``
after taking the directory's lock (``state.lock``) and before any worker starts, by the
supervisor (or the one daemon); a second daemon on the directory is refused before it
writes anything, and the workers never write it. It is replaced atomically, so it is
never read half written. When no daemon runs it is the last one's layout, and the
commands then fail to reach it either way. Probing ``http.port + i`` instead was not
chosen: an answer on a port does not say which daemon or which worker it is (another
program, or another daemon's worker, may listen there), and a worker down for a restart
would make the daemon look smaller than it is. A directory without the file (never run
by this version, or another ``state.dir``) or one this user cannot read leaves the
configuration's layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from daemon import partition
from daemon.config import MAX_WORKERS
from daemon.state import LAYOUT_FILE

if TYPE_CHECKING:
    from daemon.config import Settings


@dataclass(frozen=True)
class Layout:
    """``workers`` processes; ``dispatch`` is ``"single"`` (one), ``"device"`` (each device
    judged by its owner only) or ``"shared"`` (any worker may judge any device)."""

    workers: int
    dispatch: str

    def owner(self, device_id: str) -> int | None:
        """The worker that alone holds ``device_id``'s state; None when any may hold it
        (shared dispatch) or there is one."""
        if self.dispatch != "device":
            return None
        return partition.owner(device_id, self.workers)

    def describe(self) -> str:
        if self.workers == 1:
            return "1 process"
        return f"{self.workers} workers with {self.dispatch} dispatch"


def configured(settings: Settings) -> Layout:
    n = settings.service.workers
    return Layout(n, partition.layout_dispatch(n, settings.service.dispatch))


def recorded(directory: Path) -> Layout | None:
    """The layout ``layout.json`` records; None without a readable, well-formed file."""
    try:
        raw = orjson.loads((directory / LAYOUT_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    workers, dispatch = raw.get("workers"), raw.get("dispatch")
    if type(workers) is not int or not 1 <= workers <= MAX_WORKERS:
        return None
    if dispatch not in ((partition.SINGLE,) if workers == 1 else ("device", "shared")):
        return None
    return Layout(workers, str(dispatch))


def running(settings: Settings) -> tuple[Layout, str | None]:
    """The layout to talk to, and a line for stderr when it is not the configuration's."""
    mine = configured(settings)
    directory = settings.state.dir
    found = recorded(directory)
    if found is None or found == mine:
        return mine, None
    env = os.environ.get("WORKERS")
    here = "WORKERS is not set here" if env is None else f"WORKERS={env} here"
    return found, (f"the daemon in {directory} runs {found.describe()} ({LAYOUT_FILE}); "
                   f"this configuration says {mine.describe()} ({here}): going by "
                   f"{LAYOUT_FILE}")
