"""Reading and writing the daemon's per-device state file (JSON, never a pickle).

The file is replaced atomically: written beside its final name, flushed to disk, then
renamed over it, so a crash leaves the previous complete file or the new one. The snapshot
records the model schema it belongs to; ``Fleet.restore`` decides what of it still
applies (alert states always do; baselines and windows only for the same schema).

The scoring thread only takes the snapshot (``Fleet.snapshot``: references and small
copies); :class:`StateWriter` encodes and writes it on a thread of its own. The encoding
is done a device at a time (:func:`encode`): a serialiser call holds the interpreter lock
for as long as it runs, so one call for 10,000 devices would stop the scoring thread as
surely as running it there.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from daemon.errors import AnomalydError, ConfigError

FORMAT = 1
#: Mappings this deep in a snapshot are written an entry at a time (the top level is 0:
#: its "devices" and "alerts" sections are 1, their per-device mappings 2).
STREAMED_DEPTH = 3
_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


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


def encode(snapshot: dict[str, Any]) -> bytes:
    """The state file's bytes for ``snapshot`` (numpy arrays are written as lists)."""
    return b"".join(_chunks({"format": FORMAT, **snapshot}, 0))


def _chunks(value: Any, depth: int) -> Iterator[bytes]:
    """``value`` as JSON in pieces: mappings above ``STREAMED_DEPTH`` entry by entry, so
    that no one serialiser call holds the interpreter lock for long (~20 µs a device)."""
    if depth >= STREAMED_DEPTH or not isinstance(value, dict):
        yield orjson.dumps(value, option=_OPTIONS)
        return
    yield b"{"
    for i, (key, item) in enumerate(value.items()):
        if i:
            yield b","
        yield orjson.dumps(key)
        yield b":"
        yield from _chunks(item, depth + 1)
    yield b"}"


def save(path: Path, snapshot: dict[str, Any]) -> None:
    """Write ``snapshot`` atomically (any thread: see :class:`StateWriter`).

    orjson, not the standard library: ~8x faster, numpy arrays written directly, floats in
    their shortest exact form. At 10,000 devices with baselines (14 MB) this takes ~0.2 s,
    on the writer's thread (``bench.state_save``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = encode(snapshot)
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


class StateWriter:
    """Writes snapshots on a thread of its own, so that verdicts do not wait for the disk.

    The scoring thread hands a snapshot over with :meth:`submit` (it must hold nothing the
    scorer changes later: ``Fleet.snapshot`` copies what changes in place) and goes on.
    Snapshots are written in the order taken; one submitted while another waits replaces
    it (only the newest state matters), so a slow disk delays the file, never the
    verdicts. :meth:`flush` waits until everything submitted so far is written or failed:
    operators' commands and the shutdown use it, so "written at once" holds there.
    A failed write is reported to ``on_error`` and the next snapshot is tried as usual.
    """

    def __init__(self, path: Path, on_error: Callable[[Exception], None]) -> None:
        self.path = path
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: dict[str, Any] | None = None
        self._submitted = 0  # snapshots handed over
        self._finished = 0  # of those, how many are written, failed or superseded
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, snapshot: dict[str, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the state writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-writer",
                                                daemon=True)
                self._thread.start()
            self._pending = snapshot
            self._submitted += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every snapshot submitted so far is finished; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was submitted (False if that took over ``timeout``) and stop."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                snapshot, self._pending = self._pending, None
                upto = self._submitted
            try:
                save(self.path, snapshot)
            except Exception as exc:  # noqa: BLE001 - a full disk, or a bug: the thread goes on
                self._on_error(exc)
            with self._cond:
                self._finished = upto
                self._cond.notify_all()


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
