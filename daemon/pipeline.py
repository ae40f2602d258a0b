"""The pure core of the daemon: a micro-batch of raw messages in, outgoing messages out.

Decode every message (one place: ``daemon.readings``), group the valid readings by
detector, score each group with one vectorised call, update per-device state, and hand the
judgements to ``daemon.payloads`` for the verdict, alert and dead-letter messages. No
sockets, no clocks of its own: the wall time of scoring is passed in, so the same code runs
live and in the offline ``score`` command.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from daemon.alerts import AlertEvent, AlertTracker
from daemon.baseline import THRESHOLD_MARGIN
from daemon.config import AlertConfig, ReadingsConfig, TopicsConfig
from daemon.devices import DeviceTracker
from daemon.errors import ConfigError
from daemon.fleet import Fleet
from daemon.models import BatchScores, ModelBundle
from daemon.payloads import Outbound, Payloads, iso, severity
from daemon.presence import PresenceEvent, PresenceTracker
from daemon.ratelimit import DeviceRateLimiter
from daemon.readings import Decoded, Decoder, Reading, Rejection
from daemon.rejections import entry_fails
from daemon.shadow import ShadowMismatchError, ShadowTally, incompatibility
from daemon.windows import Matrix


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    payload: bytes
    received_at: float  # wall-clock epoch seconds at receipt


@dataclass(slots=True)
class Judgement:
    """The verdict for one reading, as plain Python values."""

    reading: Reading
    detector: str
    score: float
    threshold: float
    is_anomaly: bool
    confidence: float
    margin: float
    scored: BatchScores  # the detector call this reading was part of, at position ``row``
    row: int
    explanation: dict[str, Any] | None = None
    warming_up: bool = False
    #: the device baseline's score, threshold and flag, once its warm-up is complete
    baseline: dict[str, Any] | None = None
    alert: AlertEvent | None = None  # the alert transition this verdict caused
    alert_message: dict[str, Any] | None = None  # and the message that publishes it
    #: the device's reading with this ``seq`` was judged before (a redelivery): judged
    #: again, but it changes no window, baseline or alert state
    repeat: bool = False
    #: older than its device's earlier messages' newest by more than ``late_after_s``
    #: (``daemon.lateness``): judged against the window as it stands, and it changes no
    #: window, baseline or alert state
    late: bool = False
    #: whether the verdict counts towards the device's alert (not during a warm-up in
    #: which the global model looks uninformative for the device; ``daemon.devices``)
    alerts: bool = True
    #: the device's alerts are silenced until then (epoch s): the verdict fed no alert
    silenced_until: float | None = None
    #: this reading says the device is reporting: its first, or back from quiet
    presence: PresenceEvent | None = None
    #: the device's window held fewer than ``window`` readings (its first ones, or after a
    #: rewarm): judged on a partial window, and it feeds no alert
    filling: bool = False

    @property
    def members(self) -> dict[str, float] | None:
        """Each ensemble member's raw score (None for a single detector). Built on demand:
        only single-reading verdicts carry them, and a batch makes thousands."""
        m = self.scored.members
        return None if m is None else {k: float(v[self.row]) for k, v in m.items()}

    @property
    def zscores(self) -> np.ndarray:
        z: np.ndarray = self.scored.zscores[self.row]
        return z


@dataclass(slots=True)
class BatchStats:
    """What one call to ``Pipeline.process`` did, for the canonical log line and metrics."""

    messages: int = 0
    readings: int = 0
    anomalies: int = 0
    filling: int = 0  # of the anomalies, those on a partial window (they feed no alert)
    rejected: int = 0
    repeats: int = 0
    by_detector: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    rejections: list[str] = field(default_factory=list)
    alert_severities: list[str] = field(default_factory=list)
    alert_transitions: int = 0  # raised, escalated, resolved: what the state file must keep
    #: each detector group's margins, and the model inputs' z-scores (``daemon.score_stats``)
    margins: dict[str, np.ndarray] = field(default_factory=dict)
    zscores: list[np.ndarray] = field(default_factory=list)
    inputs: tuple[str, ...] = ()
    #: with a shadow model set: (serving, candidate) final verdicts -> readings, and the
    #: time its scoring took
    shadow: dict[tuple[bool, bool], int] = field(default_factory=dict)
    shadow_seconds: float = 0.0
    reporting: int = 0  # presence events of the batch: devices new, or back from quiet
    late: int = 0  # late readings (``daemon.lateness``), judged apart or dead-lettered
    #: readings the devices numbered that never arrived, found in this batch (``seq`` values
    #: skipped and not filled in within the repeat window: ``daemon.repeats``)
    missing: int = 0
    #: devices whose clock was taken to have moved back in this batch (``daemon.lateness``)
    clock_resets: list[str] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        bundle: ModelBundle,
        decoder: Decoder,
        topics: TopicsConfig,
        alerts: AlertConfig,
        default_detector: str | None = None,
        max_payload_bytes: int = 65536,
        limiter: DeviceRateLimiter | None = None,
        warmup: int = 0,
        shadow: ModelBundle | None = None,
        max_devices: int | None = None,
        threshold_margin: float = THRESHOLD_MARGIN,
        readings: ReadingsConfig | None = None,
    ) -> None:
        self.bundle = bundle
        self.alerts = alerts
        self.readings = readings or ReadingsConfig()
        # Everything kept per device, saved and restored whole (daemon.fleet).
        self.fleet = Fleet(bundle, alerts, warmup, max_devices, threshold_margin)
        self.decoder = decoder
        self.payloads = Payloads(topics, alerts, bundle.version, max_payload_bytes)
        self.limiter = limiter
        self.default_detector = default_detector or bundle.default_detector
        if self.default_detector not in bundle.detector_names:
            raise ConfigError(
                f"model.default_detector = {self.default_detector!r} is not in the model set "
                f"{bundle.version} (it has: {', '.join(bundle.detector_names)}); set one of "
                f"those, or train a set with it (anomalyd train --detectors ...)")
        # A candidate model set judging the same readings, compared only (daemon.shadow).
        self.shadow = shadow
        self.shadow_tally: ShadowTally | None = None
        if shadow is not None:
            problem = incompatibility(bundle, shadow)
            if problem is not None:
                raise ShadowMismatchError(f"the shadow model set {shadow.version} cannot "
                                          f"shadow the serving one: {problem}")
            self.shadow_tally = ShadowTally(shadow.version, shadow.default_detector)

    # The fleet's trackers (``Fleet.restore`` replaces them: look them up each time).
    @property
    def devices(self) -> DeviceTracker:
        return self.fleet.devices

    @property
    def alert_states(self) -> AlertTracker:
        return self.fleet.alert_states

    @property
    def presence(self) -> PresenceTracker:
        return self.fleet.presence

    # -- scoring -----------------------------------------------------------------------

    def judge(
        self, readings: Sequence[Reading], stats: BatchStats, now: float,
        late: Sequence[bool] | None = None,
    ) -> list[Judgement]:
        """Score readings grouped by detector; results in the order given.

        The global model scores each group in one vectorised call (it needs no per-device
        state beyond the window); then, in arrival order, each device's baseline judges
        its reading and learns from it (``daemon.devices``). A reading is anomalous after
        warm-up only if both flag it. A repeat, or a reading of a device whose alerts are
        silenced at ``now`` (a maintenance window: its readings are not its normal), is
        judged the same way but teaches the baseline nothing and does not advance its
        warm-up. A ``late`` reading (``daemon.lateness``) is judged against its device's
        window as it stands and teaches nothing either.
        """
        groups: dict[str, list[int]] = {}
        default = self.default_detector
        devices = self.devices
        missing = devices.missing
        repeats = [devices.repeat(r.device_id, r.seq) for r in readings]
        stats.missing = devices.missing - missing
        flags = [False] * len(readings) if late is None else late
        filling: list[bool] | None = None
        if devices.window == 1:
            observed = [
                devices.observe(r.device_id, r.values, learn=not rep, late=lt)
                for r, rep, lt in zip(readings, repeats, flags, strict=True)
            ]
        else:  # whether each one's window was still filling (a batch message can fill it)
            observed, filling = [], []
            for r, rep, lt in zip(readings, repeats, flags, strict=True):
                observed.append(devices.observe(r.device_id, r.values, learn=not rep, late=lt))
                filling.append(devices.filling(r.device_id))
        for i, r in enumerate(readings):
            groups.setdefault(r.model_name or default, []).append(i)
        out: list[Judgement | None] = [None] * len(readings)
        elapsed: dict[str, float] = {}
        for detector, idx in groups.items():
            X = np.array([observed[i] for i in idx], dtype=np.float64)
            t0 = time.perf_counter()
            scored = self.bundle.score(X, detector)
            elapsed[detector] = time.perf_counter() - t0
            self._collect(scored, readings, idx, out)
            stats.margins[detector] = scored.margin
            stats.zscores.append(scored.zscores)
        stats.inputs = self.bundle.model_features
        judged = [j for j in out if j is not None]
        if any(repeats):
            for j, rep in zip(judged, repeats, strict=True):
                j.repeat = rep
            stats.repeats = sum(repeats)
        if late is not None:
            for j, lt in zip(judged, late, strict=True):
                j.late = lt
        if filling is not None and any(filling):
            for j, f in zip(judged, filling, strict=True):
                j.filling = f
        alert_states = self.alert_states
        if alert_states.silences:
            for j in judged:
                j.silenced_until = alert_states.silenced_until(j.reading.device_id, now)
        anomalies: dict[str, int] = dict.fromkeys(groups, 0)
        warmup = devices.warmup > 0
        shadow = self._shadow_scores(observed, stats)
        for k, (j, row) in enumerate(zip(judged, observed, strict=True)):
            center, scale, z = None, None, None
            baseline_flag = True  # the baseline's say: none unless it is active
            if warmup:
                learn = not j.repeat and not j.late and j.silenced_until is None
                a = devices.assess(j.reading.device_id, row, j.is_anomaly, learn=learn)
                j.warming_up, j.alerts = a.warming_up, a.alerts
                if a.active:
                    j.baseline = {
                        "score": a.score,
                        "threshold": a.threshold,
                        "is_anomaly": a.is_anomaly,
                    }
                    baseline_flag = a.is_anomaly
                    j.is_anomaly = j.is_anomaly and a.is_anomaly
                    z, center, scale = a.z, a.center, a.scale  # explain against the baseline
            if shadow is not None and not j.repeat and not j.filling:
                # (a verdict on a partial window decides nothing, and disagreed most: the
                # second reading of a new device was a tester's only "disagreement")
                self._compare(j, bool(shadow.is_anomaly[k]) and baseline_flag,
                              float(shadow.scores[k]), stats)
            if j.is_anomaly:
                anomalies[j.detector] += 1
                exp = self.bundle.explain(
                    row, j.zscores if z is None else z, center=center, scale=scale
                )
                j.explanation = exp.to_dict()
        for detector, idx in groups.items():
            stats.by_detector[detector] = (len(idx), anomalies[detector], elapsed[detector])
        if self.shadow_tally is not None:
            self.shadow_tally.add(stats.shadow)
        return judged

    def _shadow_scores(self, observed: list[Matrix], stats: BatchStats) -> BatchScores | None:
        """The candidate model set's scores for every reading of the batch, if one is set."""
        if self.shadow is None:
            return None
        t0 = time.perf_counter()
        scored = self.shadow.score(np.array(observed, dtype=np.float64),
                                   self.shadow.default_detector)
        stats.shadow_seconds = time.perf_counter() - t0
        return scored

    def _compare(self, j: Judgement, candidate: bool, score: float, stats: BatchStats) -> None:
        """Count the candidate's final verdict against the serving one's (the batch's
        counts join the tally once, in ``judge``)."""
        tally = self.shadow_tally
        assert tally is not None  # set with the shadow
        both = (j.is_anomaly, candidate)
        stats.shadow[both] = stats.shadow.get(both, 0) + 1
        if j.is_anomaly != candidate:
            tally.disagree({
                "device_id": j.reading.device_id, "key": j.reading.key,
                "serving": {"is_anomaly": j.is_anomaly, "anomaly_score": j.score},
                "candidate": {"is_anomaly": candidate, "anomaly_score": score},
            })

    def _collect(
        self,
        s: BatchScores,
        readings: Sequence[Reading],
        idx: list[int],
        out: list[Judgement | None],
    ) -> None:
        threshold = float(self.bundle.manifest["detectors"][s.detector]["threshold"])
        scores = s.scores.tolist()
        flags = s.is_anomaly.tolist()
        conf = s.confidence.tolist()
        margins = s.margin.tolist()
        detector = s.detector
        for row, i in enumerate(idx):
            score = scores[row]
            if not math.isfinite(score):
                # A non-finite score would leave as JSON null; treat it as the worst case.
                score, flags[row], conf[row], margins[row] = 1e300, True, 1.0, 1e300
            out[i] = Judgement(
                readings[i],
                detector,
                score,
                threshold,
                flags[row],
                conf[row],
                margins[row],
                s,
                row,
            )

    # -- whole micro-batch -------------------------------------------------------------

    def process(
        self, messages: Sequence[RawMessage], now: float
    ) -> tuple[list[list[Outbound]], BatchStats]:
        """Outputs for each message, in order, and the batch's statistics."""
        stats = BatchStats(messages=len(messages))
        self.fleet.new_batch()
        decoded = [self._decode(m, now) for m in messages]
        late: list[bool] | None = None
        if self.readings.late_after_s > 0:
            late = []
            decoded = self._arrivals(messages, decoded, late, stats)
        readings: list[Reading] = []
        for d in decoded:
            readings.extend(d.readings)
        # (no late reading: the usual path, without the per-reading flags)
        judged = self.judge(readings, stats, now, late if stats.late else None) if readings else []
        stats.readings = len(judged)
        stats.anomalies = sum(1 for j in judged if j.is_anomaly)
        if stats.anomalies:
            stats.filling = sum(1 for j in judged if j.is_anomaly and j.filling)
        alert_states = self.alert_states
        presence = self.presence if self.presence.enabled else None
        scored_at = iso(now)
        for j in judged:
            if presence is not None and not j.repeat:
                j.presence = presence.seen(j.reading.device_id, now)
                if j.presence is not None:
                    stats.reporting += 1
            # a repeat's first verdict already counted; a late one is old news; an
            # untrusted warm-up verdict, a partial window's or a silenced device's counts
            # for nothing
            if j.repeat or j.late or not j.alerts or j.filling or j.silenced_until is not None:
                continue
            sev = severity(j.margin, self.alerts)
            dev = j.reading.device_id
            j.alert = alert_states.observe(dev, j.is_anomaly, sev, j.margin, j.reading.timestamp)
            if j.alert is not None:
                stats.alert_transitions += 1
                j.alert_message = self.payloads.alert_message(j, j.alert, scored_at)
                if j.alert.transition != "resolved":
                    stats.alert_severities.append(sev)
                    alert_states.record_message(dev, j.alert_message)  # to acknowledge it
        outputs: list[list[Outbound]] = []
        pos = 0
        for msg, d in zip(messages, decoded, strict=True):
            mine = judged[pos : pos + len(d.readings)]
            pos += len(d.readings)
            outs: list[Outbound] = []
            if d.rejections:
                stats.rejected += len(d.rejections)
                stats.rejections.extend(r.reason for r in d.rejections)
                outs.append(self.payloads.dead_letter(msg, d, d.rejections, now))
            if d.is_batch:
                if mine:
                    outs.extend(self.payloads.batch(d, mine, scored_at))
            elif mine:
                outs.extend(self.payloads.single(mine[0], scored_at))
            outputs.append(outs)
        return outputs, stats

    def _arrivals(
        self, messages: Sequence[RawMessage], decoded: list[Decoded], late: list[bool],
        stats: BatchStats,
    ) -> list[Decoded]:
        """Which readings are late (``daemon.lateness``), appended to ``late`` in order;
        with ``late_policy = "drop"`` those become their message's rejections instead."""
        after, drop = self.readings.late_after_s, self.readings.late_policy == "drop"
        devices = self.devices
        out: list[Decoded] = []
        for m, d in zip(messages, decoded, strict=True):
            rs = d.readings
            if not rs:
                out.append(d)
                continue
            arrival = devices.arrival(rs[0].device_id, rs, m.received_at, after)
            if arrival.clock_reset:
                stats.clock_resets.append(rs[0].device_id)
            flags = arrival.late
            if flags is None:
                late.extend([False] * len(rs))
                out.append(d)
                continue
            stats.late += sum(flags)
            if not drop:
                late.extend(flags)
                out.append(d)
                continue
            newest = arrival.newest
            assert newest is not None  # late against something
            kept: list[Reading] = []
            dropped: list[Rejection] = []
            for r, lt in zip(rs, flags, strict=True):
                if not lt:
                    kept.append(r)
                    late.append(False)
                    continue
                detail = (f"timestamp {iso(r.timestamp)} is {newest - r.timestamp:.0f} s "
                          f"older than this device's newest, {iso(newest)} "
                          f"(readings.late_after_s is {after:g}; late_policy is \"drop\")")
                dropped.append(entry_fails("late", detail, r.index))
            out.append(replace(d, readings=tuple(kept), rejections=(*d.rejections, *dropped)))
        return out

    def _decode(self, m: RawMessage, now: float) -> Decoded:
        limiter, fleet = self.limiter, self.fleet
        if limiter is None and fleet.max_devices is None:
            return self.decoder.decode(m.topic, m.payload, m.received_at)
        device = self.decoder.device_id(m.topic)
        if device is not None and not fleet.has_room(device):
            detail = (f"anomalyd already keeps state for {fleet.max_devices} devices "
                      "(limits.max_devices); forget a device that is gone "
                      "(anomalyd forget) or raise the limit")
            return Decoded(device, (), (Rejection("too_many_devices", detail),), False, None)
        if device is not None and limiter is not None and not limiter.allow(device, now):
            detail = f"device is over its limit of {limiter.rate:g} readings/s"
            return Decoded(device, (), (Rejection("rate_limited", detail),), False, None)
        d = self.decoder.decode(m.topic, m.payload, m.received_at)
        if device is not None and d.readings:
            fleet.admit(device)
            if limiter is not None and len(d.readings) > 1:
                limiter.charge(device, len(d.readings) - 1, now)
        return d

    def internal_error(
        self, messages: Sequence[RawMessage], now: float
    ) -> tuple[list[list[Outbound]], BatchStats]:
        """Dead-letter every message of a batch that failed for an internal reason."""
        stats = BatchStats(messages=len(messages), rejected=len(messages))
        outputs = []
        for msg in messages:
            d = Decoded(self.decoder.device_id(msg.topic), (), (), False, None)
            rej = Rejection("internal_error", "scoring failed inside anomalyd; see its log")
            outputs.append([self.payloads.dead_letter(msg, d, (rej,), now)])
            stats.rejections.append(rej.reason)
        return outputs, stats
