"""Which devices have gone quiet: no reading of theirs judged for ``quiet_after_s``.

A sensor that stops reporting (a dead transmitter, a PLC down, a cut cable, a firmware
update that renamed a feature so every reading is dead-lettered) is the failure an
anomaly detector cannot see in the readings, because there are none. Each device's last
judged reading is remembered; a periodic check (``due``) names the devices that have been
quiet for longer than the limit, once each, and the next judged reading of such a device
(``seen``) says it is back. A device's first reading also says it is reporting, so every
device known has a presence. Pure: the caller passes the time and publishes.

After a restart, or while anomalyd is cut off from the broker (``hold``), nothing is
declared quiet until ``quiet_after_s`` has passed: the broker first delivers what the
devices published meanwhile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    device_id: str
    state: str  # "quiet" or "reporting"
    last_seen: float  # the device's last judged reading before this event (epoch s)
    at: float  # when: the check that found it quiet, or the reading that is back
    first: bool = False  # "reporting" for the first time (a device not seen before)


class PresenceTracker:
    def __init__(self, quiet_after_s: float) -> None:
        self.quiet_after_s = quiet_after_s
        self.last_seen: dict[str, float] = {}
        self.quiet: set[str] = set()  # announced quiet, not back yet
        # The first check's time, or the last time anomalyd was cut off from the broker
        self._checks_from: float | None = None

    @property
    def enabled(self) -> bool:
        return self.quiet_after_s > 0

    def seen(self, device_id: str, now: float) -> PresenceEvent | None:
        """A reading of the device was judged at ``now``; the event if it was quiet or is
        new."""
        before = self.last_seen.get(device_id)
        self.last_seen[device_id] = now
        if before is None:
            return PresenceEvent(device_id, "reporting", now, now, first=True)
        if device_id in self.quiet:
            self.quiet.discard(device_id)
            return PresenceEvent(device_id, "reporting", before, now)
        return None

    def hold(self, now: float) -> None:
        """No reading can arrive now (anomalyd is cut off from the broker): nothing is
        declared quiet before ``quiet_after_s`` after the last call (the broker delivers
        the readings published meanwhile once the connection is back)."""
        self._checks_from = now

    def due(self, now: float, skip: set[str] | frozenset[str] = frozenset()) -> list[PresenceEvent]:
        """Devices quiet for longer than the limit and not announced yet (``skip``: those
        not to announce now, e.g. silenced; they are announced once no longer skipped)."""
        if not self.enabled:
            return []
        if self._checks_from is None:
            self._checks_from = now
        limit = self.quiet_after_s
        if now - self._checks_from < limit:  # a backlog may still be on its way
            return []
        events = []
        for dev, last in self.last_seen.items():
            if now - last > limit and dev not in self.quiet and dev not in skip:
                self.quiet.add(dev)
                events.append(PresenceEvent(dev, "quiet", last, now))
        return events

    def forget(self, device_id: str) -> None:
        self.last_seen.pop(device_id, None)
        self.quiet.discard(device_id)

    def summary(self, device_id: str) -> dict[str, Any] | None:
        last = self.last_seen.get(device_id)
        if last is None:
            return None
        return {"last_seen": last, "quiet": device_id in self.quiet}

    # -- persistence ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"last_seen": dict(self.last_seen), "quiet": sorted(self.quiet)}

    def restore(self, data: dict[str, Any]) -> int:
        """Load saved last-seen times; returns how many. ValueError if malformed."""
        raw = data.get("last_seen")
        if not isinstance(raw, dict):
            raise ValueError("saved presence has no mapping of device to last-seen time")
        last_seen = {str(dev): float(t) for dev, t in raw.items()}
        if not all(math.isfinite(t) for t in last_seen.values()):
            raise ValueError("a saved last-seen time is not finite")
        quiet = {str(dev) for dev in data.get("quiet", [])} & last_seen.keys()
        self.last_seen, self.quiet = last_seen, quiet
        return len(last_seen)
