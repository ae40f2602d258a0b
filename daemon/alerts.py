"""Per-device alert state machine: raise on k anomalous verdicts of the last n, resolve on m
consecutive normal ones, never repeat while the state holds.

Pure: verdicts in, transitions out. States and transitions::

    normal ──(k of the last n verdicts anomalous)──▶ active  emits "raised"
    active ──(an anomalous verdict of a higher severity)──▶ active  emits "escalated"
    active ──(m consecutive normal verdicts)──▶ normal  emits "resolved"

Anything else emits nothing: a device in alert does not alert again on every reading, and a
lone anomalous verdict on a normal device does not page anyone.

An alert that comes back soon after it resolved is *flapping* (an intermittent fault, a
reading hovering at the threshold): each such raise doubles the normal run the alert needs
to resolve (m, 2m, 4m, … up to ``2**backoff_max`` × m), so an intermittent fault pages less
and less often instead of once per flicker. "Soon" is within twice the normal run its last
resolution needed; a device that stayed normal longer than that starts again from m. The
raise still pages (it says ``flapping``); only the all-clear waits longer. Exponential
backoff of the all-clear, after Kapacitor's ``flapping`` (which instead mutes the alert).

Severity comes from the margin (the score's distance above the threshold, in normal
spreads; see ``daemon.pipeline.severity``) of the verdict that caused the transition; it
never goes down while active, so a fault that flickers between levels does not flap.
After "resolved" the window starts empty, so a new alert again needs k fresh anomalous
verdicts.

An operator can *silence* a device until a given time (a maintenance window): its verdicts
are then not fed to the state machine at all, so nothing is raised, escalated or resolved
until the silence ends (an active alert stays active, retained, meanwhile); the caller
asks ``silenced_until`` before feeding. Silences are kept and saved with the alert states.

An operator can *acknowledge* an active alert (someone is on it): it changes no
transition, but it is kept with the alert until the alert resolves (the "resolved" event
says who acknowledged it) or escalates (a more severe fault asks for a new look: the
acknowledgement is dropped). The alert's last message (``message``, recorded by the
caller when it publishes "raised" or "escalated") is kept with it, so that the
acknowledgement can be published in the same shape.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.snapshots import Deferred

SEVERITIES = ("minor", "major", "critical")
#: The most doublings of a flapping alert's resolve run that can be configured (2**6 = 64 m).
MAX_BACKOFF = 6
Transition = Literal["raised", "escalated", "resolved"]
STATE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    at: float  # epoch seconds
    by: str | None  # who, as the operator gave it
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "by": self.by, "note": self.note}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Acknowledgement:
        at, by, note = float(raw["at"]), raw.get("by"), raw.get("note")
        if not math.isfinite(at) or not all(v is None or isinstance(v, str) for v in (by, note)):
            raise ValueError("a saved acknowledgement has no finite time or a non-text field")
        return cls(at, by, note)


@dataclass(slots=True)
class AlertState:
    recent: deque[bool]
    active: bool = False
    severity: str | None = None
    normal_run: int = 0  # consecutive normal verdicts while active
    raised_at: float | None = None  # timestamp of the reading that raised it
    peak_margin: float = 0.0
    acknowledged: Acknowledgement | None = None  # while active: an operator is on it
    message: dict[str, Any] | None = None  # while active: its last published message
    flaps: int = 0  # raises soon after a resolution in a row: resolving needs m * 2**flaps
    since_resolved: int | None = None  # verdicts since the last resolution, while "soon"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    transition: Transition
    severity: str | None  # for "resolved": the severity the alert had
    raised_at: float
    anomalous_in_window: int
    peak_margin: float
    acknowledged: Acknowledgement | None = None  # for "resolved": if it was acknowledged
    resolve_after: int = 0  # the consecutive normal verdicts this alert needs to resolve
    flapping: bool = False  # it was raised soon after its last resolution (see module)


@dataclass(slots=True)
class AlertTracker:
    raise_after: int  # k
    window: int  # n
    resolve_after: int  # m
    backoff_max: int = 3  # resolving a flapping alert needs at most m * 2**backoff_max
    devices: dict[str, AlertState] = field(default_factory=dict)
    silences: dict[str, float] = field(default_factory=dict)  # device -> until (epoch s)

    def __post_init__(self) -> None:
        if not 1 <= self.raise_after <= self.window:
            raise ValueError("alerts need 1 <= raise_after <= window")
        if self.resolve_after < 1:
            raise ValueError("alerts need resolve_after >= 1")
        if not 0 <= self.backoff_max <= MAX_BACKOFF:
            raise ValueError(f"alerts need 0 <= backoff_max <= {MAX_BACKOFF}")

    def needs(self, st: AlertState) -> int:
        """The consecutive normal verdicts the device's alert needs to resolve."""
        return self.resolve_after << st.flaps

    def _soon(self, flaps: int) -> int:
        """A raise within this many verdicts of a resolution that needed m * 2**flaps is
        a flap: twice that normal run."""
        return self.resolve_after << (flaps + 1)

    def observe(
        self, device_id: str, is_anomaly: bool, severity: str, margin: float, timestamp: float
    ) -> AlertEvent | None:
        """Feed one verdict (in arrival order); the transition it caused, if any."""
        st = self.devices.get(device_id)
        if st is None:
            st = self.devices[device_id] = AlertState(deque(maxlen=self.window))
        st.recent.append(is_anomaly)
        hits = sum(st.recent)
        if not st.active:
            since = st.since_resolved
            if since is not None:  # counted while a new raise would still be "soon"
                since += 1
                st.since_resolved = since = since if since <= self._soon(st.flaps) else None
            if is_anomaly and hits >= self.raise_after:
                flapping = since is not None and self.backoff_max > 0
                st.flaps = min(st.flaps + 1, self.backoff_max) if flapping else 0
                st.active, st.severity, st.normal_run = True, severity, 0
                st.raised_at, st.peak_margin, st.since_resolved = timestamp, margin, None
                return AlertEvent("raised", severity, timestamp, hits, margin,
                                  resolve_after=self.needs(st), flapping=flapping)
            return None
        assert st.raised_at is not None  # set whenever active
        if is_anomaly:
            st.normal_run = 0
            st.peak_margin = max(st.peak_margin, margin)
            if _rank(severity) > _rank(st.severity):
                st.severity, st.acknowledged = severity, None
                return AlertEvent("escalated", severity, st.raised_at, hits, st.peak_margin,
                                  resolve_after=self.needs(st), flapping=st.flaps > 0)
            return None
        st.normal_run += 1
        if st.normal_run >= self.needs(st):
            event = AlertEvent("resolved", st.severity, st.raised_at, hits, st.peak_margin,
                               st.acknowledged, self.needs(st), st.flaps > 0)
            self.devices[device_id] = AlertState(deque(maxlen=self.window), flaps=st.flaps,
                                                 since_resolved=0)
            return event
        return None

    def record_message(self, device_id: str, message: dict[str, Any]) -> None:
        """Keep the message just published for the device's active alert (see module)."""
        st = self.devices.get(device_id)
        if st is not None and st.active:
            st.message = message

    def acknowledge(self, device_id: str, ack: Acknowledgement) -> AlertState | None:
        """Acknowledge the device's active alert (again: the newer one holds); the alert's
        state, or None if the device has no active alert."""
        st = self.devices.get(device_id)
        if st is None or not st.active:
            return None
        st.acknowledged = ack
        return st

    def silence(self, device_id: str, until: float | None) -> None:
        """Silence the device's alerts until ``until`` (epoch seconds); None lifts it."""
        if until is None:
            self.silences.pop(device_id, None)
        else:
            self.silences[device_id] = until

    def silenced_until(self, device_id: str, now: float) -> float | None:
        """When the device's silence ends, if it is silenced at ``now`` (an ended silence
        is dropped here)."""
        until = self.silences.get(device_id)
        if until is not None and now >= until:
            del self.silences[device_id]
            return None
        return until

    def is_active(self, device_id: str) -> bool:
        st = self.devices.get(device_id)
        return st is not None and st.active

    def summary(self, device_id: str) -> dict[str, Any] | None:
        """The device's alert state as plain values; None if unknown."""
        st = self.devices.get(device_id)
        if st is None:
            return None
        return {
            "active": st.active,
            "severity": st.severity,
            "raised_at": st.raised_at,
            "anomalous_in_window": sum(st.recent),
            "window": self.window,
            "peak_margin": st.peak_margin if st.active else None,
            "resolve_after": self.needs(st),
            "flapping": st.active and st.flaps > 0,
            "acknowledged": None if st.acknowledged is None else st.acknowledged.to_json(),
        }

    def forget(self, device_id: str) -> AlertState | None:
        """Drop the device's alert state (the next alert again needs k fresh anomalous
        verdicts); returns what was dropped, None if the device was unknown."""
        return self.devices.pop(device_id, None)

    def to_json(self) -> dict[str, Any]:
        """The alert states, each device's made when the encoding reaches it
        (``daemon.snapshots``)."""
        return {
            "format": STATE_FORMAT,
            "devices": Deferred(self.devices, _saved),
            "silences": dict(self.silences),
        }

    def restore(self, data: dict[str, Any]) -> int:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown alert state format {data.get('format')!r}")
        devices = {}
        for dev, raw in data["devices"].items():
            st = AlertState(
                deque((bool(v) for v in raw["recent"]), maxlen=self.window),
                bool(raw["active"]),
                raw["severity"] if raw["severity"] in SEVERITIES else None,
                int(raw["normal_run"]),
                None if raw["raised_at"] is None else float(raw["raised_at"]),
                float(raw["peak_margin"]),
            )
            # state saved before flapping was tracked has neither: not flapping
            flaps, since = raw.get("flaps", 0), raw.get("since_resolved")
            if type(flaps) is not int or not 0 <= flaps <= MAX_BACKOFF or not (
                    since is None or (type(since) is int and since >= 0)):
                raise ValueError(f"alert state of {dev!r} has an invalid flap count")
            st.flaps, st.since_resolved = min(flaps, self.backoff_max), since
            if st.active and (st.severity is None or st.raised_at is None):
                raise ValueError(f"alert state of {dev!r} is active without severity or time")
            if st.active:  # state saved before acknowledgements were kept has neither
                ack, message = raw.get("acknowledged"), raw.get("message")
                st.acknowledged = None if ack is None else Acknowledgement.from_json(ack)
                if message is not None and not isinstance(message, dict):
                    raise ValueError(f"the saved alert message of {dev!r} is not an object")
                st.message = message
            devices[str(dev)] = st
        saved = data.get("silences", {})  # state saved before silences existed has none
        if not isinstance(saved, dict):
            raise ValueError("saved silences are not a mapping of device to end time")
        silences = {str(dev): float(until) for dev, until in saved.items()}
        if not all(math.isfinite(until) for until in silences.values()):
            raise ValueError("a saved silence does not end at a finite time")
        self.devices, self.silences = devices, silences
        return len(devices)


def _saved(st: AlertState) -> dict[str, Any]:
    return {
        "recent": list(st.recent),
        "active": st.active,
        "severity": st.severity,
        "normal_run": st.normal_run,
        "raised_at": st.raised_at,
        "peak_margin": st.peak_margin,
        "acknowledged": None if st.acknowledged is None else st.acknowledged.to_json(),
        "message": st.message,
        "flaps": st.flaps,
        "since_resolved": st.since_resolved,
    }


def _rank(severity: str | None) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1
