"""Reading and writing the daemon's per-device state file (JSON, never a pickle).

The file is replaced atomically: written beside its final name, flushed to disk, then
renamed over it, so a crash leaves the previous complete file or the new one. The snapshot
records the model schema it belongs to; ``Fleet.restore`` decides what of it still
applies (alert states always do; baselines and windows only for the same schema).

The scoring thread takes the snapshot (``Fleet.snapshot``: each device's entry is made
when the encoding reaches it, ``daemon.snapshots``) and encodes it in slices between
micro-batches; :class:`StateWriter` says why, and writes the bytes on a thread of its own.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import structlog

from daemon import partition
from daemon.errors import AnomalydError, ConfigError

log = structlog.get_logger("anomalyd.state")

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


#: Which worker layout the files of a state directory were written for.
LAYOUT_FILE = "layout.json"


def repartition(directory: Path, workers: int, dispatch: str) -> dict[str, Any] | None:
    """Give every device's saved state to the worker that owns it under this layout.

    Run once, before any worker starts (by the supervisor, or by a single daemon). With one
    worker, or N workers with device dispatch, each device belongs to one file; when the
    files on disk were written for another layout (another number of workers, one after
    several, shared dispatch), they are re-cut (``daemon.partition.split``: a device kept
    in several files takes the newest file's state) and written as this layout's files;
    the files no worker reads any more are renamed ``*.retired``, unreadable ones
    ``*.unreadable``. Under shared dispatch each worker keeps its own view of every device:
    its files are left alone, except when the daemon comes to shared dispatch from another
    layout, where every worker starts from the same copy of every device (re-cut for one
    owner). What is done is logged. Returns the layout recorded before (None if none was).
    """
    layout = {"workers": workers, "dispatch": partition.layout_dispatch(workers, dispatch)}
    layout_path = directory / LAYOUT_FILE
    try:
        recorded = orjson.loads(layout_path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        recorded = None
    present = sorted(directory.glob("devices*.json"))
    targets = [state_file(directory, None if workers == 1 else i) for i in range(workers)]
    strays = [p for p in present if p not in targets]
    shared = layout["dispatch"] == "shared"
    # a single daemon's file, or shared workers' files, from before layouts were recorded
    # are already their own
    as_written = not strays and (
        recorded == layout or (recorded is None and (workers == 1 or shared)))
    if not present or as_written:
        if recorded != layout:
            write_bytes(layout_path, orjson.dumps(layout))
        return recorded if isinstance(recorded, dict) else None
    sources: list[tuple[str, dict[str, Any]]] = []
    newest_first = sorted(present, key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in newest_first:
        try:
            snapshot = load(path)
        except StateError as exc:
            log.warning("state_discarded", path=str(path), error=str(exc),
                note=f"kept as {path.name}.unreadable")
            path.rename(path.with_name(path.name + ".unreadable"))
            continue
        if snapshot is not None:
            sources.append((path.name, snapshot))

    def note(problem: str) -> None:
        log.warning("state_partly_discarded", error=problem, note="those devices warm up again")

    if shared:  # every worker sees every device: each starts from the whole
        parts = partition.split(sources, 1, note) * workers
    else:
        parts = partition.split(sources, workers, note)
    for target, part in zip(targets, parts, strict=False):
        save(target, part)
    for path in strays:
        if path.exists():
            path.rename(path.with_name(path.name + ".retired"))
    write_bytes(layout_path, orjson.dumps(layout))
    log.info("state_repartitioned", workers=workers, dispatch=layout["dispatch"],
        read=[name for name, _ in sources], retired=[p.name for p in strays],
        devices=[len(part.get("devices", {}).get("devices", {})) for part in parts],
        alert_states=[len(part.get("alerts", {}).get("devices", {})) for part in parts])
    return recorded if isinstance(recorded, dict) else None


#: Held (``flock``) by the process that owns a state directory while it runs.
LOCK_FILE = ".lock"


class StateDirInUseError(ConfigError):
    """Another anomalyd runs on this state directory."""


def lock(directory: Path) -> int:
    """Take the state directory for this process; returns the descriptor that holds it
    (closing it, or the process's end however it comes, lets it go).

    Two daemons (or a daemon and the supervisor of others) on one directory would
    overwrite each other's device state, re-cut each other's files and end each other's
    broker sessions (``daemon.sessions``): the second is refused with the first's pid.
    Taken by a single daemon or the supervisor, never by its workers.
    """
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock state.dir {directory}: {exc.strerror}") from exc
        if _gone(holder):  # its workers hold the lock they inherited
            raise StateDirInUseError(
                f"state.dir {directory} is in use by the workers of an anomalyd that has "
                f"ended (pid {holder}); a worker stops on its own once its supervisor is "
                "gone, within seconds: start again then, or stop them (their command line "
                "holds --worker-index)") from exc
        raise StateDirInUseError(
            f"state.dir {directory} is in use by another anomalyd (pid {holder}): two on "
            "one directory would overwrite each other's device state and broker sessions; "
            "stop it, or give this one its own [state] dir (STATE_DIR)") from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _gone(pid: str) -> bool:
    """Whether the process a lock file names has ended (False when unsure)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False
    return False


def check_writable(directory: Path) -> None:
    """Create ``directory`` if need be and prove a file can be written in it.

    Run at start-up: a daemon that cannot save its per-device state would lose every
    device's baseline and alert state at its next restart (and never resolve an alert the
    broker holds as raised), which is worth refusing to start for.
    """
    hint = ("set [state] dir (or STATE_DIR) to a directory anomalyd may write, e.g. "
            "/var/lib/anomalyd/state")
    if directory.exists() and not directory.is_dir():  # said "not writable (File exists)"
        raise ConfigError(f"state.dir {directory} is a file, not a directory: {hint}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # a block written and flushed: a full disk still lets an empty file be created
        with tempfile.NamedTemporaryFile(prefix=".write-check-", dir=directory) as probe:
            probe.write(bytes(4096))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ConfigError(
            f"state.dir {directory} is not writable ({exc.strerror or exc}): {hint}") from exc


def encode(snapshot: dict[str, Any]) -> bytes:
    """The state file's bytes for ``snapshot`` (numpy arrays are written as lists)."""
    return b"".join(_chunks({"format": FORMAT, **snapshot}, 0))


def _chunks(value: Any, depth: int) -> Iterator[bytes]:
    """``value`` as JSON in pieces: mappings above ``STREAMED_DEPTH`` entry by entry, so
    that the encoding can stop after any device (~20 µs each)."""
    if depth >= STREAMED_DEPTH or not isinstance(value, Mapping):
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
    """Encode ``snapshot`` and write it atomically, here and now (tests, tools; the daemon
    uses :class:`StateWriter`).

    orjson, not the standard library: ~8x faster, numpy arrays written directly, floats in
    their shortest exact form. At 10,000 devices with baselines (14 MB) encoding and
    writing take ~0.2 s (``bench.state_save``)."""
    write_bytes(path, encode(snapshot))


def write_bytes(path: Path, body: bytes | Sequence[bytes]) -> None:
    """Replace ``path`` with ``body`` (or its pieces, in order) atomically: beside it,
    flushed to disk, renamed, and the rename flushed to disk too (the directory's fsync:
    without it a power cut may leave the old file, or none, after this returned)."""
    tmp = stage_bytes(path, body)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def stage_bytes(path: Path, body: bytes | Sequence[bytes]) -> Path:
    """``body`` written and flushed to disk in a new file beside ``path`` (hidden: a dot
    and ``.tmp``), for the caller to rename over ``path``; nothing is left if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for piece in (body,) if isinstance(body, bytes) else body:
                fh.write(piece)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def sync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (files created, renamed or removed in it) to disk.
    Where a directory cannot be opened for that (not POSIX), nothing is done."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system that cannot sync a directory: the rename stands as it is
    finally:
        os.close(fd)


class StateWriter:
    """Saves snapshots without holding up verdicts for long: the scoring thread encodes a
    snapshot a slice at a time between micro-batches, and a thread of its own writes it.

    The encoding runs on the scoring thread on purpose. On another thread it would need
    the interpreter lock, which the busy scorer kept: measured with 1,000 devices, 21 ms of
    encoding took 6.1 s of wall time beside ``Pipeline.process`` in a loop (8.9 s beside
    ``ModelBundle.score`` alone, 0.25 s beside a loop of plain Python), and at 10,000
    devices it did not finish in 10 minutes (BENCHMARKS.md). The likely cause: the scorer
    releases the lock briefly and often and takes it back before the waiting thread runs.
    So :meth:`submit` (the scorer, with ``Fleet.snapshot``, whose device entries are made
    at their turn and hold nothing the scorer changes later) starts the encoding,
    :meth:`step` (the scorer, once per loop) encodes for at most ``slice_s`` and joins
    that slice's bytes into one piece, and once the pieces are complete the writer thread
    writes them one after the other, atomically (``write_bytes``), mostly without the
    lock. (Joining the whole file at the end held the scorer up for ~20 ms at 10,000
    devices with baselines: a 15 MB copy in one call.)

    A snapshot submitted while an older one is still being encoded or waits to be written
    replaces it (only the newest state matters). :meth:`flush` finishes the encoding at
    once and waits until the file is written (operators' commands and the shutdown). A
    failed write is reported to ``on_error``, a completed one to ``on_written``; the next
    snapshot is tried as usual.
    """

    def __init__(
        self,
        path: Path,
        on_error: Callable[[Exception], None],
        on_written: Callable[[], None] | None = None,
        slice_s: float = 0.005,
    ) -> None:
        self.path = path
        self.slice_s = slice_s
        self._on_error = on_error
        self._on_written = on_written
        self._encoding: Iterator[bytes] | None = None  # the scorer's side only
        self._pieces: list[bytes] = []  # the encoding so far, a piece per slice
        self._cond = threading.Condition()
        # encoded, not yet taken by the writer thread
        self._pending: list[bytes] | None = None
        self._handed = 0  # encoded snapshots handed to the writer thread
        self._finished = 0  # of those, how many are written, failed or superseded
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def encoding(self) -> bool:
        """Whether a snapshot is still being encoded (more :meth:`step` calls to come)."""
        return self._encoding is not None

    @property
    def idle(self) -> bool:
        """Nothing being encoded, and every encoded snapshot written (or failed)."""
        with self._cond:
            return self._encoding is None and self._finished >= self._handed

    def submit(self, snapshot: dict[str, Any]) -> None:
        """Start encoding ``snapshot`` (dropping one not yet encoded in full)."""
        self._encoding = _chunks({"format": FORMAT, **snapshot}, 0)
        self._pieces = []

    def step(self, budget_s: float | None = None) -> None:
        """Encode for at most ``budget_s`` seconds (default ``slice_s``; ``math.inf``: all
        of it); hand the bytes to the writer thread once they are complete. The scorer's
        thread only (or any thread once the scorer has stopped)."""
        encoding = self._encoding
        if encoding is None:
            return
        deadline = time.perf_counter() + (self.slice_s if budget_s is None else budget_s)
        parts: list[bytes] = []
        for i, part in enumerate(encoding, 1):
            parts.append(part)
            if not i % 64 and time.perf_counter() >= deadline:
                self._pieces.append(b"".join(parts))
                return
        pieces, self._encoding, self._pieces = self._pieces, None, []
        pieces.append(b"".join(parts))
        self._hand_over(pieces)

    def flush(self, timeout: float | None = None) -> bool:
        """Finish encoding now and wait until the file is written; False on timeout."""
        self.step(math.inf)
        with self._cond:
            target = self._handed
            return self._cond.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was submitted (False if that took over ``timeout``) and stop the
        writer thread; a later snapshot is written on the caller's thread."""
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        return done

    def _hand_over(self, body: list[bytes]) -> None:
        with self._cond:
            if self._closed:  # after close: write here and now
                self._handed += 1
                self._write(body)
                self._finished = self._handed
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-writer",
                                                daemon=True)
                self._thread.start()
            self._pending = body
            self._handed += 1
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                body, self._pending = self._pending, None
                upto = self._handed
            self._write(body)
            with self._cond:
                self._finished = upto
                self._cond.notify_all()

    def _write(self, body: list[bytes]) -> None:
        try:
            write_bytes(self.path, body)
        except Exception as exc:  # noqa: BLE001 - a full disk, or a bug: the thread goes on
            self._on_error(exc)
            return
        if self._on_written is not None:
            self._on_written()


def set_aside(path: Path) -> Path | None:
    """Rename a state file that could not be used to ``<name>.unreadable-<UTC time>``
    beside it, so the first save does not overwrite what an operator may want to look at
    or mend; returns the new path, None if it could not be renamed (or is gone)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.unreadable-{stamp}")
    try:
        os.replace(path, kept)
    except OSError:
        return None
    sync_directory(path.parent)
    return kept


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
