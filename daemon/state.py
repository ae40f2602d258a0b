"""Reading and writing the daemon's per-device state file (JSON, never a pickle).

The file is replaced atomically: written beside its final name, flushed to disk, then
renamed over it, so a crash leaves the previous complete file or the new one. The snapshot
records the model schema it belongs to; ``Fleet.restore`` decides what of it still
applies (alert states always do; baselines and windows only for the same schema).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import orjson

from daemon.errors import AnomalydError, ConfigError

FORMAT = 1


class StateError(AnomalydError):
    """The state file is unreadable or of an unknown format."""


def state_file(directory: Path, worker_index: int | None) -> Path:
    """One file per worker: with shared subscriptions each worker sees its own devices."""
    name = "devices.json" if worker_index is None else f"devices-{worker_index}.json"
    return directory / name


def check_writable(directory: Path) -> None:
    """Create ``directory`` if need be and prove a file can be written in it.

    Run at start-up: a daemon that cannot save its per-device state would lose every
    device's baseline and alert state at its next restart (and never resolve an alert the
    broker holds as raised), which is worth refusing to start for.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-check-", dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(
            f"state.dir {directory} is not writable ({exc.strerror or exc}): set [state] dir "
            "(or STATE_DIR) to a directory anomalyd may write, e.g. /var/lib/anomalyd/state"
        ) from exc


def save(path: Path, snapshot: dict[str, Any]) -> None:
    """Write ``snapshot`` atomically. orjson, not the standard library: it runs on the
    scoring thread, and at 10,000 devices with baselines it wrote in 0.11 s, not 0.87 s
    (floats are written in their shortest exact form either way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = orjson.dumps({"format": FORMAT, **snapshot})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any] | None:
    """The saved snapshot, or None if there is no file yet."""
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise StateError(f"{path}: unreadable state: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StateError(f"{path}: unknown state format")
    return raw
