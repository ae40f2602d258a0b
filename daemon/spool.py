"""Readings taken over from a previous layout's broker session, waiting for their new owner.

When a change of layout ends a session (``daemon.sessions``), what it had queued (the
readings published during the restart) is taken from the broker and written here before
the session is ended: one file per new owner in the state directory (``handover.jsonl``
for one daemon, ``handover-<i>.jsonl`` for worker ``i``; under device dispatch each
reading goes to its device's worker, under shared dispatch all to worker 0). The daemon or
worker judges its file's readings before any live one, in the order they were queued, and
removes the file once every verdict they caused is safe with the broker; one that dies
first judges them again at its next start (at least once, like the broker's own
redelivery). A file of an earlier handover not yet judged is re-cut with the new readings.

While a session is drained, each reading is appended to ``handover-taking.jsonl``
(:class:`Journal`) as it arrives, before paho acknowledges it to the broker: a handover
killed in the middle (SIGKILL, power cut after the journal's fsync) has every reading the
broker let go on disk, and the next start cuts them for their owners with the rest.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

from daemon.state import stage_bytes, sync_directory

log = structlog.get_logger("anomalyd.spool")


@dataclass(frozen=True)
class Queued:
    """One reading as the broker had queued it."""

    topic: str
    payload: bytes
    received: float  # time.time() when it was taken from the broker


#: Readings being taken from the broker, one line each as it arrives.
JOURNAL = "handover-taking.jsonl"


def _line(q: Queued) -> bytes:
    return orjson.dumps({"topic": q.topic, "payload": base64.b64encode(q.payload).decode(
        "ascii"), "received": q.received}) + b"\n"


class Journal:
    """``JOURNAL``, appended to from paho's threads (one per drained session): a reading
    is written (to the kernel: a killed process loses nothing) before ``add`` returns,
    and so before paho acknowledges it; ``close`` flushes the file to disk. Cut for the
    owners by the next :func:`hand_to_workers`, which removes it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / JOURNAL
        self._directory = directory
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._lock = threading.Lock()
        self.count = 0
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            self._write(b"\n")  # a line cut short (a power cut): the next one starts anew

    def add(self, q: Queued) -> None:
        line = _line(q)
        with self._lock:
            self._write(line)
            self.count += 1

    def _write(self, data: bytes) -> None:
        """All of ``data`` (a write to a full disk may take part of it), or OSError."""
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if not written:
                raise OSError(f"no room to write {JOURNAL}")
            view = view[written:]

    def close(self) -> None:
        with self._lock:
            os.fsync(self._fd)
            os.close(self._fd)
        sync_directory(self._directory)  # the file's own entry, new with the handover


def journal_left(directory: Path) -> bool:
    """Whether a handover was cut short while it took readings from the broker."""
    return (directory / JOURNAL).exists()


def spool_file(directory: Path, worker_index: int | None) -> Path:
    return directory / ("handover.jsonl" if worker_index is None
                        else f"handover-{worker_index}.jsonl")


def hand_to_workers(directory: Path, owner: Callable[[str], int | None]) -> None:
    """Write what the journal and earlier files hold to the file of each reading's owner
    (``owner(topic)``: a worker index, None for a single daemon), in the order they were
    received (a device's readings in their order). All or nothing: every owner's file is
    written in full before any replaces its namesake or an earlier file goes, so one that
    cannot be written (a full disk) leaves the files as they were, for the next start."""
    earlier = sorted(directory.glob("handover*.jsonl"))
    readings = [q for path in earlier for q in _read(path)]
    readings.sort(key=lambda q: q.received)
    parts: dict[int | None, list[bytes]] = {}
    for q in readings:
        parts.setdefault(owner(q.topic), []).append(_line(q))
    staged: list[tuple[Path, Path]] = []
    try:
        for index, lines in parts.items():
            path = spool_file(directory, index)
            staged.append((stage_bytes(path, lines), path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    written = {path for _, path in staged}
    for path in earlier:
        if path not in written:
            path.unlink(missing_ok=True)
    sync_directory(directory)


def take(directory: Path, worker_index: int | None) -> list[Queued]:
    """The readings in this daemon's or worker's file (``spool_file``; none if there is
    no file)."""
    return _read(spool_file(directory, worker_index))


def _read(path: Path) -> list[Queued]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("handover_unreadable", path=str(path), error=str(exc),
                    note="the readings taken over from the previous layout are not judged")
        return []
    readings, bad = [], 0
    for line in lines:
        try:
            entry = orjson.loads(line)
            readings.append(Queued(str(entry["topic"]), base64.b64decode(entry["payload"]),
                                   float(entry["received"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error):
            bad += 1
    if bad:
        log.warning("handover_lines_unreadable", path=str(path), lines=bad)
    return readings
