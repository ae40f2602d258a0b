"""Per-device state: the window of recent readings and the device's own baseline.

Pure: readings in, model inputs and the device's verdict out; no clock, no I/O
(``to_json``/``restore`` give plain data and numpy arrays, ``daemon.state`` writes them).
``daemon.windows`` makes the windowed inputs; ``daemon.baseline`` describes the baseline
model and fits it; this module applies it to each reading in arrival order: warm-up
(fitting part, held-back part and threshold), the verdict, and the adapting centre. It
also remembers which ``seq`` values each device's readings carried (``repeat``), so that
a reading the broker redelivers is judged again without being counted twice in the
window or the baseline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.baseline import (
    ADAPT_READINGS,
    HELD_BACK,
    MIN_THRESHOLD,
    THRESHOLD_MARGIN,
    Moments,
    fit,
    global_informative,
)
from daemon.lateness import ON_TIME, Arrival, EventClock
from daemon.readings import Reading
from daemon.repeats import SeqWindow
from daemon.snapshots import Deferred
from daemon.windows import Matrix, window_stats

STATE_FORMAT = 3
_ALPHA = 1.0 / ADAPT_READINGS


@dataclass(slots=True)
class DeviceState:
    recent: deque[tuple[float, ...]]
    count: int = 0  # readings the baseline has seen (warm-up progress)
    # While fitting: the readings the global model judged normal, and those it flagged.
    normal: Moments | None = None
    flagged: Moments | None = None
    # Whether the fit left out the flagged readings (then the held-back part does too).
    trusts_global: bool = False
    center: Matrix | None = None  # adapting centre, once fitted (changes in place)
    # Once fitted, never changed (read-only arrays): a state snapshot holds them uncopied.
    scale: Matrix | None = None
    cond: Matrix | None = None  # z -> conditional deviations (D, D), once fitted
    held_back_max: float = 0.0  # largest max |z| in the held-back part of the warm-up
    threshold: float | None = None  # set when warm-up completes
    seqs: SeqWindow = field(default_factory=SeqWindow)  # to know a redelivered reading
    clock: EventClock = field(default_factory=EventClock)  # to know a late reading
    # The centre as fitted (read-only): how far the adapting centre has moved from it is
    # the device's drift (``DeviceTracker.drift``).
    origin: Matrix | None = None
    # Whether the drift beyond the operator's limit has been reported (``drifted``).
    drift_reported: bool = False


@dataclass(frozen=True, slots=True)
class Drift:
    """How far a device's normal has moved since its warm-up, in the baseline's own terms:
    the adapted centre judged against the fitted one as a reading would be (each input's
    distance from what the device's other inputs predict for it, in conditional spreads,
    the units of its threshold), for the input that moved most (signed: negative, it fell
    below what the others predict). A move to another operating regime, where the inputs
    move together as they did in the warm-up, is hardly drift; a sensor or a part that
    changes on its own is."""

    device_id: str
    input: int
    spreads: float


@dataclass(slots=True)
class Assessment:
    """The device baseline's view of one reading (treat as immutable: not frozen because
    a frozen dataclass costs ~5x more to build, and every reading makes one)."""

    warming_up: bool
    active: bool  # the baseline is complete and had a say
    is_anomaly: bool = False
    score: float = 0.0  # the largest conditional deviation
    threshold: float = 0.0
    # For explanations, set only when is_anomaly: (row - center) / scale against the
    # device's own (adapted) normal.
    # Plain deviations, not the conditional ones: those spread a moved input's blame over
    # the inputs correlated with it, and with a short warm-up over spurious correlations.
    z: Matrix | None = None
    center: Matrix | None = None
    scale: Matrix | None = None
    #: Whether the global model's verdict may count towards the device's alert. False
    #: only during warm-up, while the global model looks uninformative for the device (it
    #: flagged more than ``MAX_FLAGGED_SHARE`` of the warm-up so far; in the held-back
    #: part: the fit did not trust it): a device unlike the fleet would otherwise be paged
    #: for from its first readings until its warm-up ends.
    alerts: bool = True


_OFF = Assessment(warming_up=False, active=False)
_WARMING = Assessment(warming_up=True, active=False)
_WARMING_UNTRUSTED = Assessment(warming_up=True, active=False, alerts=False)


class DeviceTracker:
    """Windows and baselines of every device seen.

    ``observe`` turns a reading into model inputs (call in arrival order); ``assess`` then
    judges those inputs against the device's baseline and updates it (also in arrival
    order, after the global model has scored the reading).
    """

    def __init__(
        self,
        n_features: int,
        window: int,
        warmup: int,
        global_center: Matrix,
        global_scale: Matrix,
        threshold_margin: float = THRESHOLD_MARGIN,
    ) -> None:
        self.n_features = n_features
        self.window = max(1, window)
        self.warmup = warmup
        # the baseline's threshold: this many times the largest held-back deviation
        self.threshold_margin = threshold_margin
        self.n_fit = _n_fit(warmup)
        self.global_center = np.asarray(global_center, dtype=np.float64)
        self.global_scale = np.asarray(global_scale, dtype=np.float64)
        self.devices: dict[str, DeviceState] = {}
        # Re-warmed devices' seq windows, until their next reading: a reading the broker
        # redelivers after a re-warm-up is still known as a repeat (saved with the state).
        self._kept_seqs: dict[str, SeqWindow] = {}
        #: readings devices numbered (``seq``) that never arrived, found since the start
        self.missing = 0
        #: set by ``restore`` from state saved for another warm-up length: what was kept
        self.warmup_change: WarmupChange | None = None

    def repeat(self, device_id: str, seq: int | None) -> bool:
        """Whether this device's reading ``seq`` was judged already (a redelivery), and if
        not, remember that it now is (``daemon.repeats``). Readings without a ``seq`` are
        never repeats. Readings the device numbered that never arrived are added to
        ``missing`` as they are found."""
        if seq is None:
            return False
        seqs = self._state(device_id).seqs
        before = seqs.missing
        repeated = seqs.seen(seq)
        self.missing += seqs.missing - before
        return repeated

    def arrival(
        self, device_id: str, readings: Sequence[Reading], received_at: float,
        late_after_s: float,
    ) -> Arrival:
        """Which of one message's readings (one device's) are late for their device, and
        whether its clock moved back (``daemon.lateness``); a reading whose ``seq`` was
        judged before is a repeat, never late."""
        st = self._state(device_id)
        clock = st.clock
        if len(readings) == 1:
            t = readings[0].timestamp
            if clock.on_time(t, t, late_after_s, received_at):  # the usual case, no list
                return ON_TIME
            stamps: Sequence[float] = (t,)
        else:
            stamps = [r.timestamp for r in readings]
        seqs = st.seqs

        def repeat(i: int) -> bool:
            seq = readings[i].seq
            return seq is not None and seqs.known(seq)

        return clock.take(stamps, received_at, late_after_s, repeat)

    def newest(self, device_id: str) -> float:
        """The newest timestamp of the device's on-time readings (after ``arrival``)."""
        newest = self.devices[device_id].clock.newest
        assert newest is not None  # a late reading has one to be late against
        return newest

    def observe(
        self, device_id: str, values: Sequence[float], *, learn: bool = True,
        late: bool = False,
    ) -> Matrix:
        """The model inputs for this reading: the raw values or the window's statistics.

        ``learn=False`` (a repeat) leaves the window as it is: the inputs are those of the
        window as it stands, which already holds the reading if it was recent. ``late``
        (a late reading) leaves it as it is too, and the inputs are those of the window
        with the reading in place of its oldest one: the newest context there is.
        """
        st = self._state(device_id)
        rows: Sequence[tuple[float, ...]]
        if late:
            rows = [*st.recent, tuple(values)][-self.window :]
        else:
            if learn or not st.recent:
                st.recent.append(tuple(values))
            rows = st.recent
        if self.window == 1:
            return np.array(values, dtype=np.float64)
        return window_stats(np.array(rows, dtype=np.float64))

    def filling(self, device_id: str) -> bool:
        """Whether the device's window holds fewer than ``window`` readings (after
        ``observe``): its inputs are a partial window's, unlike those the model was trained
        on (one reading's ``[std w]`` is 0)."""
        return len(self.devices[device_id].recent) < self.window

    def _threshold(self, held_back_max: float) -> float:
        """A fitted baseline's threshold: the margin times the largest deviation of the
        held-back readings, and never below ``MIN_THRESHOLD``."""
        return max(MIN_THRESHOLD, self.threshold_margin * held_back_max)

    def _state(self, device_id: str) -> DeviceState:
        """The device's state, created at its first reading."""
        st = self.devices.get(device_id)
        if st is None:
            seqs = self._kept_seqs.pop(device_id, None) or SeqWindow()
            st = self.devices[device_id] = DeviceState(deque(maxlen=self.window), seqs=seqs)
        return st

    def assess(
        self, device_id: str, row: Matrix, global_anomaly: bool, *, learn: bool = True
    ) -> Assessment:
        """Judge ``row`` against the device's baseline, then let the baseline learn from it
        (unless ``learn`` is False: a repeat, or a reading during a silence, is judged
        but teaches nothing and does not count towards the warm-up)."""
        if self.warmup <= 0:
            return _OFF
        st = self.devices[device_id]
        c, s, w = st.center, st.scale, st.cond
        if c is None or s is None or w is None:  # fitting part of the warm-up
            if not learn:
                return _WARMING
            st.count += 1
            acc = st.flagged if global_anomaly else st.normal
            if acc is not None:
                acc.add(row)
            elif global_anomaly:
                st.flagged = Moments.of(row)
            else:
                st.normal = Moments.of(row)
            if st.count >= self.n_fit:
                self._fit(st)
                if st.count >= self.warmup:  # nothing held back (a tiny warm-up)
                    st.threshold = MIN_THRESHOLD
            return _WARMING if _alerts_may_count(st) else _WARMING_UNTRUSTED
        diff = row - c
        z = diff / s
        dev = w @ z
        score = float(np.abs(dev).max())
        if st.threshold is None:  # held-back part of the warm-up: sets the threshold
            if not learn:
                return _WARMING
            st.count += 1
            if not (global_anomaly and st.trusts_global):
                st.held_back_max = max(st.held_back_max, score)
                c += _ALPHA * diff
            if st.count >= self.warmup:
                st.threshold = self._threshold(st.held_back_max)
            return _WARMING if _alerts_may_count(st) else _WARMING_UNTRUSTED
        thr = st.threshold
        if score <= thr:  # the usual case: no input is beyond the threshold, none frozen
            if learn:
                c += _ALPHA * diff
            return Assessment(False, True, False, score, thr)
        # anomalous: keep what the explanation needs (the centre before it adapts)
        out = Assessment(False, True, True, score, thr, z, c.copy(), s)
        if learn:  # an input beyond the threshold stays frozen while the detector agrees
            c += (np.where(np.abs(dev) <= thr, _ALPHA, 0.0) if global_anomaly else _ALPHA) * diff
        return out

    def _fit(self, st: DeviceState) -> None:
        f = fit(st.normal, st.flagged, st.count, self.n_features, self.global_scale)
        st.trusts_global, st.center, st.scale, st.cond = f.trusts_global, f.center, f.scale, f.cond
        st.origin = f.center.copy()
        _freeze(st.scale, st.cond, st.origin)
        st.normal = st.flagged = None

    def progress(self, device_id: str) -> int:
        st = self.devices.get(device_id)
        return 0 if st is None else st.count

    # -- drift: what the adapting centre has absorbed ----------------------------------

    def drift(self, device_id: str) -> Drift | None:
        """How far the device's adapted centre has moved from its fitted one (``Drift``;
        None before the fit). The centre follows slow change so that it does not page anyone; this
        is how an operator sees what it has absorbed (a sensor losing calibration, a
        bearing's vibration creeping up, a plant running warmer), and decides whether it
        is the device's new normal or a fault the baseline now takes for normal."""
        st = self.devices.get(device_id)
        return None if st is None else _drift(device_id, st)

    def drifted(self, limit: float) -> tuple[list[Drift], int]:
        """The devices whose drift has just exceeded ``limit`` spreads (each reported once
        until it is back within the limit), and how many are beyond it now."""
        new: list[Drift] = []
        beyond = 0
        for device_id, st in list(self.devices.items()):
            d = _drift(device_id, st)
            if d is None or abs(d.spreads) <= limit:
                st.drift_reported = False
                continue
            beyond += 1
            if not st.drift_reported:
                st.drift_reported = True
                new.append(d)
        return new, beyond

    # -- operator view and control (``daemon.control``) ---------------------------------

    def summary(self, device_id: str) -> dict[str, Any] | None:
        """What an operator needs to see of a device, without its arrays; None if unknown."""
        st = self.devices.get(device_id)
        return None if st is None else self._summary(device_id, st)

    def unseen_summary(self) -> dict[str, Any]:
        """``summary``'s fields for a device with no window or baseline yet (silenced
        before its first reading, or re-warmed since): those of a device about to take its
        first reading, so a client can read every entry alike."""
        return self._summary("", DeviceState(deque(maxlen=self.window)))

    def _summary(self, device_id: str, st: DeviceState) -> dict[str, Any]:
        fitted = st.center is not None
        return {
            "warming_up": self.warmup > 0 and st.threshold is None,
            "warmup_seen": st.count,
            "warmup_readings": self.warmup,
            # while fitting: warm-up readings the global model flagged so far; once fitted,
            # whether the fit left them out or (global model uninformative) learnt them all
            "warmup_flagged": None if fitted or self.warmup <= 0 else (
                0 if st.flagged is None else st.flagged.n
            ),
            "warmup_fit": None if not fitted else (
                "left_out_flagged" if st.trusts_global else "all_readings"
            ),
            # during warm-up: whether the global model's verdicts may raise its alert now
            "warmup_alerts": _alerts_may_count(st) if (
                self.warmup > 0 and st.threshold is None
            ) else None,
            "baseline_threshold": st.threshold,
            "window_filled": len(st.recent),
            "window": self.window,
            "last_seq": st.seqs.last,  # the highest seq judged (None: readings carry none)
            # seq values skipped and never filled in: readings lost on the way (its lifetime)
            "missing_readings": st.seqs.missing,
            "newest_timestamp": st.clock.newest,  # of its on-time readings (epoch s)
            "late_readings": st.clock.late_count,  # since the daemon started
            # the adapted centre's largest move since the fit, in conditional spreads
            "drift": None if (d := _drift(device_id, st)) is None else {
                "input": d.input, "spreads": round(d.spreads, 2)},
        }

    def forget(self, device_id: str, *, keep_seqs: bool = False) -> DeviceState | None:
        """Drop the device's window and baseline: its next reading starts a new warm-up
        (``keep_seqs``, a re-warm-up: which ``seq`` values it sent is still known then).
        Returns what was dropped (None if the device was unknown)."""
        st = self.devices.pop(device_id, None)
        self._kept_seqs.pop(device_id, None)
        if keep_seqs and st is not None and st.seqs.last is not None:
            self._kept_seqs[device_id] = st.seqs
        return st

    # -- persistence (plain data; the caller writes it atomically) --------------------

    def to_json(self) -> dict[str, Any]:
        """The devices' state for ``daemon.state`` to encode while scoring goes on
        (``StateWriter``): each device's entry is made when the encoding reaches it
        (``daemon.snapshots``), so taking this costs next to nothing on the scoring
        thread."""
        return {
            "format": STATE_FORMAT,
            "window": self.window,
            "warmup": self.warmup,
            "n_features": self.n_features,
            "devices": Deferred(self.devices, _saved),
            "kept_seqs": {dev: seqs.to_json() for dev, seqs in self._kept_seqs.items()},
        }

    def restore(self, data: dict[str, Any]) -> int:
        """Load saved devices; returns how many. Raises ValueError if the state is for a
        different window or feature count (the caller then starts fresh). State saved for
        another warm-up length keeps what is still valid (``warmup_change`` says what)."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown device state format {data.get('format')!r}")
        if data.get("window") != self.window or data.get("n_features") != self.n_features:
            raise ValueError("device state was saved for a different feature window or schema")
        saved_warmup = data.get("warmup")
        if type(saved_warmup) is not int or saved_warmup < 0:
            raise ValueError(f"device state has no valid warm-up length ({saved_warmup!r})")
        width = len(self.global_center)

        def arr(v: Any, shape: tuple[int, ...] = (width,)) -> Matrix | None:
            if v is None:
                return None
            a = np.array(v, dtype=np.float64)  # a copy, even of an array
            if a.shape != shape or not np.isfinite(a).all():
                raise ValueError("device state array has the wrong shape or is not finite")
            return a

        def moments(v: Any) -> Moments | None:
            if v is None:
                return None
            mean, m2 = arr(v["mean"]), arr(v["m2"], (width, width))
            if mean is None or m2 is None or int(v["n"]) < 1:
                raise ValueError("device state has incomplete warm-up moments")
            return Moments(int(v["n"]), mean, m2)

        devices: dict[str, DeviceState] = {}
        for dev, raw in data["devices"].items():
            recent: deque[tuple[float, ...]] = deque(maxlen=self.window)
            for r in raw["recent"][-self.window :]:
                if len(r) != self.n_features:
                    raise ValueError("device state reading has the wrong width")
                recent.append(tuple(float(v) for v in r))
            held_back_max = float(raw["held_back_max"])
            # a fitted threshold follows the configured margin (it may have changed since)
            threshold = None if raw["threshold"] is None else self._threshold(held_back_max)
            center = arr(raw["center"])
            # state saved before the fitted centre was kept has none: drift counts from here
            origin = None if center is None else _freeze(arr(raw.get("origin", raw["center"])))
            devices[str(dev)] = DeviceState(
                recent,
                int(raw["count"]),
                moments(raw["normal"]),
                moments(raw["flagged"]),
                bool(raw["trusts_global"]),
                center,
                _freeze(arr(raw["scale"])),
                _freeze(arr(raw["cond"], (width, width))),
                held_back_max,
                threshold,
                SeqWindow.from_json(raw),
                EventClock.from_json(raw),
                origin=origin,
            )
        self.warmup_change = None
        if saved_warmup != self.warmup:
            self.warmup_change = self._reconcile_warmup(devices, saved_warmup)
        saved_seqs = data.get("kept_seqs", {})  # state saved before they were kept has none
        if not isinstance(saved_seqs, dict):
            raise ValueError("saved seq windows of re-warmed devices are not a mapping")
        kept = {str(dev): SeqWindow.from_json(raw) for dev, raw in saved_seqs.items()}
        self.devices, self._kept_seqs = devices, kept
        return len(devices)

    def _reconcile_warmup(
        self, devices: dict[str, DeviceState], saved_warmup: int
    ) -> WarmupChange:
        """Keep what of state saved for a warm-up of ``saved_warmup`` readings is valid
        under this one (``restore``; a changed ``[baseline] warmup_readings``).

        The warm-up length decides only where the fitting part ends (``n_fit``) and where
        the held-back part ends; a fitted baseline (centre, spreads, correlations and the
        held-back part's largest deviation, from which ``restore`` takes the threshold) is
        used without either, so it is kept. A device still warming up continues where its
        state is exactly what the new length would have made of the same readings: in the
        fitting part, short of the new fitting part's end (the accumulators hold its
        readings, whatever the length); in the held-back part, when the fitting part has
        the same length under both and the new warm-up has not ended. Any other restarts
        its warm-up: its fit (or the split it was accumulating towards) is for another
        fitting part, and a warm-up shorter than what it has seen would leave the held-back
        part, hence the threshold, without readings. Windows, seq windows and event clocks
        are kept in every case (they do not depend on the warm-up). With baselines off
        (a warm-up of 0) fitted baselines are kept, unused and not adapting, and every
        unfinished warm-up is dropped."""
        n_fit_saved = _n_fit(saved_warmup)
        fitted, continued, restarted = 0, 0, []
        for dev, st in devices.items():
            if st.threshold is not None:
                fitted += 1
            elif self.warmup > 0 and (
                (st.center is None and st.count < self.n_fit)
                or (st.center is not None and n_fit_saved == self.n_fit
                    and st.count < self.warmup)
            ):
                continued += 1
            else:
                devices[dev] = DeviceState(st.recent, seqs=st.seqs, clock=st.clock)
                restarted.append(dev)
        return WarmupChange(saved_warmup, self.warmup, fitted, continued, restarted)


@dataclass(frozen=True, slots=True)
class WarmupChange:
    """What ``DeviceTracker.restore`` kept of state saved for another warm-up length:
    how many fitted baselines were kept and warm-ups continued, which warm-ups restarted."""

    saved: int  # the warm-up length the state was saved for
    now: int
    fitted: int
    continued: int
    restarted: list[str]


def _n_fit(warmup: int) -> int:
    """How many readings the fitting part of a warm-up of ``warmup`` readings takes (the
    rest is held back to set the threshold)."""
    return max(2, warmup - round(warmup * HELD_BACK))


def _saved(st: DeviceState) -> dict[str, Any]:
    """One device's state as it is now: the arrays that change in place (the centre, the
    warm-up moments) are copied, the fitted scale, correlations and centre (read-only
    once fitted) are referenced, and nothing is converted to lists here."""
    def copied(a: Matrix | None) -> Matrix | None:
        return None if a is None else a.copy()

    def moments(m: Moments | None) -> dict[str, Any] | None:
        return None if m is None else {"n": m.n, "mean": m.mean.copy(), "m2": m.m2.copy()}

    return {
        "recent": list(st.recent),
        "count": st.count,
        "normal": moments(st.normal),
        "flagged": moments(st.flagged),
        "trusts_global": st.trusts_global,
        "center": copied(st.center),
        "origin": st.origin,
        "scale": st.scale,
        "cond": st.cond,
        "held_back_max": st.held_back_max,
        "threshold": st.threshold,
        **st.seqs.to_json(),
        **st.clock.to_json(),
    }


def _drift(device_id: str, st: DeviceState) -> Drift | None:
    c, o, s, w = st.center, st.origin, st.scale, st.cond
    if c is None or o is None or s is None or w is None:
        return None
    moved = w @ ((c - o) / s)
    i = int(np.abs(moved).argmax())
    return Drift(device_id, i, float(moved[i]))


def _freeze(*arrays: Matrix | None) -> Matrix | None:
    """Make fitted arrays read-only (see ``DeviceState``); returns the first."""
    for a in arrays:
        if a is not None:
            a.flags.writeable = False
    return arrays[0]


def _alerts_may_count(st: DeviceState) -> bool:
    """During warm-up: whether the global model's verdicts say something about this
    device, so may raise its alert. While fitting, it may have flagged at most
    ``MAX_FLAGGED_SHARE`` of the readings so far; once fitted, the fit must have trusted it
    (the same share, and enough readings it judged normal)."""
    if st.center is not None:
        return st.trusts_global
    return global_informative(0 if st.flagged is None else st.flagged.n, st.count)
