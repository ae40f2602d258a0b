"""Which worker owns which device, and splitting saved device state between workers.

With ``WORKERS=N`` and ``service.dispatch = "device"`` (the default) every worker
subscribes to all readings and keeps only those of the devices it owns: device ``d``
belongs to worker ``crc32(d) % N``. One device's readings are then always judged by one
worker, in order, so its feature window, baseline, alert state and presence stay whole
with any broker. Readings of the other workers' devices are acknowledged unread. A topic
that names no valid device is owned by ``crc32(topic) % N``, so exactly one worker
dead-letters it.

A stable hash (CRC-32), never Python's ``hash()``: that one differs between processes.

When the layout changes (another number of workers, one worker after several, device
dispatch after shared), the saved state of every device must reach the worker that now
owns it: :func:`split` re-cuts the saved snapshots (pure; ``daemon.state.repartition``
reads and writes the files, once, before any worker starts). Coming to shared dispatch,
where any worker may judge any device, each worker gets the whole (a split for one).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

from daemon.topics import TopicMatcher

#: The per-device mappings of a snapshot (``Fleet.snapshot``): section, key.
DEVICE_MAPS = (
    ("devices", "devices"), ("devices", "kept_seqs"),
    ("alerts", "devices"), ("alerts", "silences"),
    ("presence", "last_seen"),
)
#: Section headers that must be equal for two files' entries to be mixed.
_DEVICE_HEADER = ("format", "window", "warmup", "n_features")


#: The dispatch a layout of one process records: there is nothing to dispatch.
SINGLE = "single"


def layout_dispatch(workers: int, dispatch: str) -> str:
    """How a layout of ``workers`` processes, configured with ``service.dispatch =
    dispatch``, spreads readings: :data:`SINGLE` for one process, else ``dispatch``
    (``"device"`` or ``"shared"``). What ``layout.json`` and ``sessions.json`` record."""
    return SINGLE if workers == 1 else dispatch


def owner(key: str, workers: int) -> int:
    """The index of the worker that owns ``key`` (a device id, or a topic without one)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % workers


class TopicOwnership:
    """``owns(topic)``: whether this worker judges the message (called per message on the
    intake's network thread; the topic's device id is cached by the matcher)."""

    def __init__(self, matcher: TopicMatcher, index: int, workers: int) -> None:
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is not below the {workers} workers")
        self._matcher = matcher
        self.index = index
        self.workers = workers

    def owns(self, topic: str) -> bool:
        return self.owner_of(topic) == self.index

    def owner_of(self, topic: str) -> int:
        """The index of the worker that judges a message on ``topic``."""
        device_id = self._matcher.device_id(topic)
        return owner(topic if device_id is None else device_id, self.workers)


def split(
    sources: Sequence[tuple[str, dict[str, Any]]], workers: int, note: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Re-cut saved snapshots for ``workers`` owners: one snapshot per worker index.

    ``sources`` are (name, snapshot), newest first: a device kept in several (under shared
    dispatch every worker kept its own view of it) takes each part from the newest that
    has it. A part is mixed in only from a snapshot whose headers match the newest one's
    (the same model schema and warm-up for windows and baselines, the same format for
    alert states); other parts are dropped and named through ``note`` (those devices warm
    up again, as when a single file no longer fits the model). A malformed part is named
    and dropped the same way: this runs before anything is judged and must not stop the
    start.
    """
    if not sources:
        return []
    base = sources[0][1]
    out = [_empty_like(base) for _ in range(workers)]
    for name, snap in sources:
        for section in ("devices", "alerts", "presence"):
            if section not in out[0]:
                continue
            if not _fits(snap, base, section):
                if section in snap:
                    note(f"{name}: its {section} were saved for another model schema, "
                         "warm-up or format")
                continue
            quiet = snap[section].get("quiet", []) if section == "presence" else []
            quiet = set(map(str, quiet)) if isinstance(quiet, list) else set()
            for sec, key in DEVICE_MAPS:
                if sec != section:
                    continue
                entries = snap[sec].get(key, {})
                if not isinstance(entries, dict):
                    note(f"{name}: {sec}.{key} is not a mapping of device to state")
                    continue
                for dev, value in entries.items():
                    target = out[owner(str(dev), workers)][sec]
                    if str(dev) in target[key]:
                        continue  # a newer file had it
                    target[key][str(dev)] = value
                    if sec == "presence" and str(dev) in quiet:
                        target["quiet"].append(str(dev))
    return out


def _empty_like(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with its headers and every per-device mapping empty."""
    part = dict(base)
    for section in ("devices", "alerts", "presence"):
        head = base.get(section)
        if not isinstance(head, dict):
            part.pop(section, None)
            continue
        part[section] = dict(head)
        for sec, key in DEVICE_MAPS:
            if sec == section:
                part[section][key] = {}
        if section == "presence":
            part[section]["quiet"] = []
    return part


def _fits(snap: dict[str, Any], base: dict[str, Any], section: str) -> bool:
    """Whether ``snap``'s ``section`` may be mixed with the newest snapshot's."""
    mine, theirs = snap.get(section), base.get(section)
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        return False
    if section == "devices":
        return snap.get("schema") == base.get("schema") and all(
            mine.get(k) == theirs.get(k) for k in _DEVICE_HEADER)
    return mine.get("format") == theirs.get("format")
