"""Which readings arrived late: each device's newest timestamp, and a clock set back.

A device's messages normally arrive in the order of their timestamps. A reading whose
timestamp is more than ``late_after_s`` older than the newest one of its device's earlier
messages is *late*: a gateway's store-and-forward backlog sent after its live readings,
two gateways relaying one device, a resend of a reading without ``seq``. Judged in arrival
order, it would put an old value into the device's window, teach its baseline out of
order and move its alert on old news; the pipeline judges it apart or dead-letters it
(``readings.late_policy``). The readings of one message are compared with the device's
earlier messages, not with each other: a batch is one transmission, some gateways list it
newest first, and the windowed inputs (means and deviations) do not depend on the order
within it. A reading whose ``seq`` the device sent before is a repeat, never late (known
from the ``seq`` values before the message: in a message whose ``seq`` values jump by more
than the repeat window, an old one may be spared here that the judge then takes as new,
``daemon.repeats``).

A timestamp from the future (a clock glitch, a device set a year ahead) moves the device's
newest no further than ``late_after_s`` past the reading's receipt, by the daemon's clock:
otherwise one such reading would make the next ones late until the device's clock was
taken to have moved back (below). A device whose clock runs ahead by more than that still
has its readings on time (each is newer than the capped newest); its late readings are
then those more than its clock's lead behind.

A device whose clock was set back (a reboot without a real-time clock, a corrected clock)
would send nothing but late readings from then on. So when every reading of a device has
been late for ``late_after_s`` of receipt time (the daemon's clock, not the device's), its
clock is taken to have moved: that message is on time and its newest timestamp the
device's. A backlog interleaved with live readings never does that (each live message is
on time); one sent alone for longer would have its rest judged in arrival order, as
before this module existed.

Pure: the timestamps and receipt times are passed in. Two floats a device; the newest
timestamp is saved with its state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Arrival:
    """What one message's readings are: which are late (None: none is), and whether the
    device's clock was taken to have moved back with this message (then none is late)."""

    late: list[bool] | None = None
    clock_reset: bool = False
    #: the newest timestamp of the device's earlier messages: what the late ones are late
    #: against
    newest: float | None = None


ON_TIME = Arrival()


@dataclass(slots=True)
class EventClock:
    newest: float | None = None  # the newest timestamp of the device's on-time readings
    late_since: float | None = None  # receipt time of the first late one since the last
    late_count: int = 0  # late readings since the daemon started (for operators; not saved)

    def take(
        self, stamps: Sequence[float], received_at: float, late_after_s: float,
        repeat: Callable[[int], bool],
    ) -> Arrival:
        """Judge one message's readings (their timestamps, in order) and move the clock:
        the on-time ones advance the newest timestamp and end a run of late ones.
        ``repeat(i)``, asked only of a reading that would be late, says whether it is a
        repeat (then it counts as on time)."""
        if self.on_time(min(stamps), max(stamps), late_after_s, received_at):
            return ON_TIME
        newest = self.newest
        assert newest is not None  # (on_time takes a device's first message)
        floor = newest - late_after_s
        late = [t < floor and not repeat(i) for i, t in enumerate(stamps)]
        on_time = [t for t, lt in zip(stamps, late, strict=True) if not lt]
        ceiling = received_at + late_after_s
        if on_time:  # the run of late readings, if any, ends here
            self.newest, self.late_since = max(newest, min(max(on_time), ceiling)), None
            n_late = len(stamps) - len(on_time)
            self.late_count += n_late
            return Arrival(late, newest=newest) if n_late else ON_TIME
        since = self.late_since
        if since is not None and since <= received_at and received_at - since >= late_after_s:
            self.newest, self.late_since = min(max(stamps), ceiling), None
            return Arrival(None, clock_reset=True)
        if since is None or received_at < since:  # (or the daemon's own clock went back)
            self.late_since = received_at
        self.late_count += len(stamps)
        return Arrival(late, newest=newest)

    def on_time(
        self, earliest: float, latest: float, late_after_s: float, received_at: float
    ) -> bool:
        """The usual case, cheaply: whether a message whose readings are stamped from
        ``earliest`` to ``latest`` is on time as a whole (a device's first message is),
        and if so, take it as ``take`` would; False (nothing changed) otherwise."""
        newest = self.newest
        if newest is not None and earliest < newest - late_after_s:
            return False
        if latest > received_at + late_after_s:  # from the future: no further than this
            latest = received_at + late_after_s
        if newest is None or latest > newest:
            self.newest = latest
        self.late_since = None
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
