"""Per-device alert state machine: raise on k anomalous verdicts of the last n, resolve on m
consecutive normal ones, never repeat while the state holds.

Pure: verdicts in, transitions out. States and transitions::

    normal ──(k of the last n verdicts anomalous)──▶ active  emits "raised"
    active ──(an anomalous verdict of a higher severity)──▶ active  emits "escalated"
    active ──(m consecutive normal verdicts)──▶ normal  emits "resolved"

Anything else emits nothing: a device in alert does not alert again on every reading, and a
lone anomalous verdict on a normal device does not page anyone. Severity comes from the
margin (the score's distance above the threshold, in normal spreads; see
``daemon.pipeline.severity``) of the verdict that caused the transition; it never goes down
while active, so a fault that flickers between levels does not flap. After "resolved" the
window starts empty, so a new alert again needs k fresh anomalous verdicts.

An operator can *silence* a device until a given time (a maintenance window): its verdicts
are then not fed to the state machine at all, so nothing is raised, escalated or resolved
until the silence ends (an active alert stays active, retained, meanwhile); the caller
asks ``silenced_until`` before feeding. Silences are kept and saved with the alert states.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

SEVERITIES = ("minor", "major", "critical")
Transition = Literal["raised", "escalated", "resolved"]
STATE_FORMAT = 1


@dataclass(slots=True)
class AlertState:
    recent: deque[bool]
    active: bool = False
    severity: str | None = None
    normal_run: int = 0  # consecutive normal verdicts while active
    raised_at: float | None = None  # timestamp of the reading that raised it
    peak_margin: float = 0.0


@dataclass(frozen=True, slots=True)
class AlertEvent:
    transition: Transition
    severity: str | None  # for "resolved": the severity the alert had
    raised_at: float
    anomalous_in_window: int
    peak_margin: float


@dataclass(slots=True)
class AlertTracker:
    raise_after: int  # k
    window: int  # n
    resolve_after: int  # m
    devices: dict[str, AlertState] = field(default_factory=dict)
    silences: dict[str, float] = field(default_factory=dict)  # device -> until (epoch s)

    def __post_init__(self) -> None:
        if not 1 <= self.raise_after <= self.window:
            raise ValueError("alerts need 1 <= raise_after <= window")
        if self.resolve_after < 1:
            raise ValueError("alerts need resolve_after >= 1")

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
            if is_anomaly and hits >= self.raise_after:
                st.active, st.severity, st.normal_run = True, severity, 0
                st.raised_at, st.peak_margin = timestamp, margin
                return AlertEvent("raised", severity, timestamp, hits, margin)
            return None
        assert st.raised_at is not None  # set whenever active
        if is_anomaly:
            st.normal_run = 0
            st.peak_margin = max(st.peak_margin, margin)
            if _rank(severity) > _rank(st.severity):
                st.severity = severity
                return AlertEvent("escalated", severity, st.raised_at, hits, st.peak_margin)
            return None
        st.normal_run += 1
        if st.normal_run >= self.resolve_after:
            event = AlertEvent("resolved", st.severity, st.raised_at, hits, st.peak_margin)
            self.devices[device_id] = AlertState(deque(maxlen=self.window))
            return event
        return None

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
        }

    def forget(self, device_id: str) -> AlertState | None:
        """Drop the device's alert state (the next alert again needs k fresh anomalous
        verdicts); returns what was dropped, None if the device was unknown."""
        return self.devices.pop(device_id, None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "devices": {
                dev: {
                    "recent": list(st.recent),
                    "active": st.active,
                    "severity": st.severity,
                    "normal_run": st.normal_run,
                    "raised_at": st.raised_at,
                    "peak_margin": st.peak_margin,
                }
                for dev, st in self.devices.items()
            },
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
            if st.active and (st.severity is None or st.raised_at is None):
                raise ValueError(f"alert state of {dev!r} is active without severity or time")
            devices[str(dev)] = st
        saved = data.get("silences", {})  # state saved before silences existed has none
        if not isinstance(saved, dict):
            raise ValueError("saved silences are not a mapping of device to end time")
        silences = {str(dev): float(until) for dev, until in saved.items()}
        if not all(math.isfinite(until) for until in silences.values()):
            raise ValueError("a saved silence does not end at a finite time")
        self.devices, self.silences = devices, silences
        return len(devices)


def _rank(severity: str | None) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1
