"""Which readings arrived late: each device's newest timestamp, and a clock set back.

A device's readings normally arrive in the order of their timestamps. A reading whose
timestamp is more than ``late_after_s`` older than the newest one its device has sent is
*late*: a gateway's store-and-forward backlog sent after its live readings, two gateways
relaying one device, a resend of a reading without ``seq``. Judged in arrival order, it
would put an old value into the device's window, teach its baseline out of order and move
its alert on old news; the pipeline judges it apart or dead-letters it
(``readings.late_policy``).

A device whose clock was set back (a reboot without a real-time clock, a corrected clock,
a lone timestamp from the future before it) would send nothing but late readings from then
on. So when every reading of a device has been late for ``late_after_s`` of receipt time
(the daemon's clock, not the device's), its clock is taken to have moved: that reading is
on time and its timestamp the newest. A backlog interleaved with live readings never does
that (each live reading is on time); one sent alone for longer would have its rest judged
in arrival order, as before this module existed.

Pure: the timestamps and receipt times are passed in. Two floats a device; the newest
timestamp is saved with its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Arrival(Enum):
    ON_TIME = "on_time"
    LATE = "late"
    #: late, but every reading has been for ``late_after_s``: the device's clock moved,
    #: and this reading is taken as on time
    CLOCK_RESET = "clock_reset"


@dataclass(slots=True)
class EventClock:
    newest: float | None = None  # the newest timestamp of the device's on-time readings
    late_since: float | None = None  # receipt time of the first late one since the last
    late_count: int = 0  # late readings since the daemon started (for operators; not saved)

    def arrive(self, timestamp: float, received_at: float, late_after_s: float) -> Arrival:
        """Whether a reading with this timestamp, received now, is on time; advances the
        device's newest timestamp if it is."""
        if self.newest is None:  # the device's first reading
            self.newest, self.late_since = timestamp, None
            return Arrival.ON_TIME
        if self.all_on_time((timestamp,), late_after_s):
            return Arrival.ON_TIME
        since = self.late_since
        if since is not None and since <= received_at and received_at - since >= late_after_s:
            self.newest, self.late_since = timestamp, None
            return Arrival.CLOCK_RESET
        if since is None or received_at < since:  # (or the daemon's own clock went back)
            self.late_since = received_at
        self.late_count += 1
        return Arrival.LATE

    def all_on_time(self, stamps: Sequence[float], late_after_s: float) -> bool:
        """Whether readings with these timestamps, in this order, would each be on time,
        and if so, take them as ``arrive`` would one by one; False (nothing changed) if
        one would not be, or the device has no newest timestamp yet. A reading is judged
        against the newest of those before it, so [t + 100, t + 20] is late where
        [t + 20, t + 100] is not."""
        top = self.newest
        if top is None:
            return False
        for t in stamps:
            if t < top - late_after_s:
                return False
            if t > top:
                top = t
        self.newest, self.late_since = top, None
        return True

    def to_json(self) -> dict[str, Any]:
        """The newest timestamp only: a run of late readings is counted in receipt time,
        and one begun before a restart would count the daemon's downtime as lateness."""
        return {"newest_ts": self.newest}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> EventClock:
        """From ``to_json``'s key; state saved before it existed has none (no clock)."""
        newest = raw.get("newest_ts")
        if newest is None:
            return cls()
        if type(newest) not in (int, float) or newest != newest:
            raise ValueError("device state has an invalid newest timestamp")
        return cls(float(newest))
