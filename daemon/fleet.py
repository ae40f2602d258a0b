"""Everything kept per device, as one object the pipeline owns: each device's feature
window and baseline (``daemon.devices``), alert state and silence (``daemon.alerts``) and
when it was last seen (``daemon.presence``); how many devices may have state
(``limits.max_devices``); saving and restoring all of it; forgetting a device.

Pure, and touched by the scoring thread only (operators' commands reach it through
``daemon.control``). ``restore`` replaces the trackers, so callers look them up on the
fleet each time rather than keeping them.
"""

from __future__ import annotations

from typing import Any

from daemon.alerts import AlertTracker
from daemon.baseline import THRESHOLD_MARGIN
from daemon.config import AlertConfig
from daemon.devices import DeviceTracker, WarmupChange
from daemon.models import ModelBundle
from daemon.presence import PresenceEvent, PresenceTracker

# what saved state of the wrong shape raises in the trackers' restore (valid JSON: a hand
# edit, a bug); it costs the part it is in, never the start
_BAD_STATE = (ValueError, KeyError, TypeError, AttributeError)


class Fleet:
    def __init__(
        self, bundle: ModelBundle, alerts: AlertConfig, warmup: int, max_devices: int | None,
        threshold_margin: float = THRESHOLD_MARGIN,
    ) -> None:
        self.bundle = bundle
        self.alerts = alerts
        self.warmup = warmup
        self.threshold_margin = threshold_margin
        # Feature windows and warm-up baselines, then alert states: both fed in arrival
        # order, so micro-batch boundaries never change a verdict.
        self.devices = self._new_devices()
        self.alert_states = self._new_alerts()
        # When each device's last reading was judged: who has gone quiet.
        self.presence = PresenceTracker(alerts.quiet_after_s)
        # At most this many devices get state; readings of more are dead-lettered.
        self.max_devices = max_devices
        self._admitting: set[str] = set()  # new devices of the batch being decoded
        #: set by ``restore`` from state saved for another warm-up length: what was kept
        self.warmup_change: WarmupChange | None = None

    def _new_devices(self) -> DeviceTracker:
        b = self.bundle
        return DeviceTracker(len(b.features), b.window, self.warmup, b.mean, b.std,
                             self.threshold_margin)

    def _new_alerts(self) -> AlertTracker:
        a = self.alerts
        return AlertTracker(a.raise_after, a.window, a.resolve_after, a.flap_backoff)

    # -- how many devices -------------------------------------------------------------

    def new_batch(self) -> None:
        """A micro-batch begins: the last one's new devices have state now."""
        self._admitting.clear()

    def has_room(self, device_id: str) -> bool:
        """Whether the device's readings may be judged: it has state, or there is room."""
        if self.max_devices is None:
            return True
        known, admitting = self.devices.devices, self._admitting
        if device_id in known or device_id in admitting:
            return True
        return len(known) + len(admitting) < self.max_devices

    def admit(self, device_id: str) -> None:
        """A reading of the device was decoded: a new device counts from now on."""
        if self.max_devices is not None and device_id not in self.devices.devices:
            self._admitting.add(device_id)

    # -- operators ----------------------------------------------------------------------

    def forget(self, device_id: str) -> None:
        """Drop everything kept of the device: window, baseline, alert state, silence and
        when it was last seen (a device taken out of service)."""
        self.devices.forget(device_id)
        self.alert_states.forget(device_id)
        self.alert_states.silence(device_id, None)
        self.presence.forget(device_id)

    def newly_quiet(self, now: float) -> list[PresenceEvent]:
        """The devices that have just gone quiet (not while silenced)."""
        presence = self.presence
        if not presence.last_seen:
            return []
        alerts = self.alert_states
        silenced = {d for d in list(alerts.silences) if alerts.silenced_until(d, now) is not None}
        return presence.due(now, silenced)

    # -- persistence (plain data; ``daemon.state`` writes it) ---------------------------

    def schema(self) -> dict[str, Any]:
        """What saved device state must match to be reused with this model."""
        return {"features": list(self.bundle.features), "window": self.bundle.window}

    def snapshot(self) -> dict[str, Any]:
        return {"schema": self.schema(), "devices": self.devices.to_json(),
                "alerts": self.alert_states.to_json(), "presence": self.presence.to_json()}

    def restore(self, snapshot: dict[str, Any]) -> tuple[int, int, list[str]]:
        """Reload what of a snapshot still applies: (devices, alert states, what was not).

        Alert states and when each device was last seen are kept whatever else changed:
        the broker still holds each device's last retained alert (and presence), and only
        a tracker that knows the alert is raised (the device quiet) will publish its
        "resolved" ("reporting"). Windows, baselines and seq windows are kept only for the
        same schema and window; otherwise those devices warm up again. State saved for
        another warm-up length keeps them too, except the progress of warm-ups that cannot
        continue under the new length (``DeviceTracker.restore``): ``warmup_change`` then
        says what was kept and what restarts.
        """
        self.warmup_change = None
        problems: list[str] = []
        alerts = self._new_alerts()
        n_alerts = 0
        try:
            n_alerts = alerts.restore(snapshot["alerts"])
        except _BAD_STATE as exc:
            problems.append(f"alert states: {exc!s}")
            alerts = self._new_alerts()
        presence = PresenceTracker(self.alerts.quiet_after_s)
        if "presence" in snapshot:  # state saved before presence was kept has none
            try:
                presence.restore(snapshot["presence"])
            except _BAD_STATE as exc:
                problems.append(f"presence: {exc!s}")
                presence = PresenceTracker(self.alerts.quiet_after_s)
        devices = self._new_devices()
        n_devices = 0
        schema = self.schema()
        if snapshot.get("schema") != schema:
            problems.append(f"device state was saved for {_inputs(snapshot.get('schema'))}; "
                            f"the model reads {_inputs(schema)}")
        else:
            try:
                n_devices = devices.restore(snapshot["devices"])
            except _BAD_STATE as exc:
                problems.append(f"device state: {exc!s}")
                devices = self._new_devices()
        self.devices, self.alert_states, self.presence = devices, alerts, presence
        self.warmup_change = devices.warmup_change
        return n_devices, n_alerts, problems


def describe_warmup_change(change: WarmupChange) -> str:
    """What a restart with another warm-up length kept and what restarts, in words."""
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    fitted, restarted = change.fitted, len(change.restarted)
    if change.now:
        said = (f"warm-up length changed from {change.saved} to {change.now} readings: "
                f"{n(fitted, 'fitted baseline')} kept as fitted, "
                f"{n(change.continued, 'unfinished warm-up')} continued towards "
                f"{change.now} readings, {n(restarted, 'unfinished warm-up')} restarted "
                "(from their next reading)")
    else:
        said = (f"warm-up length changed from {change.saved} readings to 0 (per-device "
                f"baselines off): {n(fitted, 'fitted baseline')} kept, unused and not "
                f"adapting while baselines are off; {n(restarted, 'unfinished warm-up')} "
                "dropped")
    return said + ". Every device's window, seq window (repeats) and alert state is kept"


def _inputs(schema: object) -> str:
    """A state schema in words: "features ['a', 'b'] (window 10)"."""
    if isinstance(schema, dict):
        return f"features {schema.get('features')} (window {schema.get('window')})"
    return f"an unknown schema ({schema!r})"
