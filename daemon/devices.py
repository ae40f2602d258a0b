"""Per-device state: the window of recent readings and the device's own baseline model.

Pure: readings in, model inputs and the device's verdict out; no clock, no I/O
(``to_json``/``restore`` give plain data, the caller writes it). The same code runs in the
daemon, in ``anomalyd score``, in ``anomalyd evaluate`` and, through :func:`windowed_matrix`,
in training, so a model is fitted on exactly the inputs it is later served.

*Windowed features.* With ``window = w > 1`` each raw feature ``f`` becomes two model
inputs: ``f [mean w]`` and ``f [std w]``, the mean and standard deviation of the device's
last ``w`` readings (fewer at its start). ``window = 1`` keeps the raw readings as they are.

*Baseline model* (``warmup > 0``). The global model always judges a reading on the
training fleet's standardisation. Each device also learns its own normal from its first
``warmup`` readings, in two parts:

* the first three quarters fit a centre, a scale and the correlations of the model inputs
  (the scale floored at a fraction of the channel's level and of the global model's
  scale, so a channel that sat still cannot turn noise into 100σ; the correlations shrunk
  by ``SHRINKAGE`` towards none, so a few hundred readings give a stable inverse);
* the last quarter is held back: its largest deviation (below), scored the way live
  readings are, times ``THRESHOLD_MARGIN`` and never below ``MIN_THRESHOLD``, becomes the
  device's threshold.

A reading's deviation is, for each input, how far it is from what the device's *other*
inputs predict for it, in units of that conditional spread (Gaussian regression on the
warm-up's correlations): a pump moving to another duty moves flow, current and pressure
together and stays near zero, while a current that rises alone, or a flow that drops at an
unchanged current, stands out. The device's score is the largest of these.

After warm-up a reading is an anomaly only if the global model **and** the device's baseline
flag it: the global model knows every operating regime of the fleet, the baseline knows
this device's own level, noise and relations. The centre keeps adapting, as an exponential
moving average over ``ADAPT_READINGS`` readings, so slow drift (a warming motor) becomes
normal while a step stays anomalous: an input's centre moves only while that input's
deviation is within the threshold, or while the global model judged the reading normal (a
move to an operating regime the fleet knows). An input that deviates during a fault is
therefore frozen at its pre-fault normal for as long as the fault lasts; the others keep
tracking.

*Faults during warm-up* would otherwise be learnt as normal: they widen the spread and raise
the threshold, and later faults are missed. The global model's verdict on each warm-up
reading is a judge independent of the device (it was trained on the fleet), so the fit
leaves out the readings it flagged, unless it flagged more than ``MAX_FLAGGED_SHARE`` of
the fitting part: then it is evidently not informative for this device (a device unlike
the fleet, flagged throughout), and the fit uses every reading, as before. It also uses
every reading if no more readings than inputs would remain (a singular covariance). The
decision is made once, when the fitting part ends, and holds for the held-back part too:
if the flagged readings were left out of the fit, a flagged held-back reading neither
raises the threshold nor moves the centre (if all are flagged, the threshold is
``MIN_THRESHOLD``). The fitting part keeps two running accumulators, for the readings the
global model judged normal and for those it flagged, merged when every reading is used:
no rows are stored, and a warm-up reading costs one accumulator update, as before. The
device's own deviations are not used to trim the warm-up further: they come from the fit
being made, so trimming by them narrows the spread of every clean device (more false
alarms) while many faulty readings mask themselves. A device unlike the fleet therefore
still learns its warm-up faults.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.preprocess import MIN_STD

Matrix = NDArray[np.float64]
STATE_FORMAT = 3
#: A channel is taken to vary by at least this fraction of its level, so a sensor that sat
#: still (or was quantised to one value) through warm-up does not turn noise into 100σ.
RELATIVE_SCALE_FLOOR = 1e-3
#: ... and by at least this fraction of the global model's spread for that input.
GLOBAL_SCALE_FLOOR = 0.05
#: Share of the warm-up held back to set the threshold.
HELD_BACK = 0.25
#: The threshold is this multiple of the largest deviation seen in the held-back part...
THRESHOLD_MARGIN = 1.5
#: ... and never below this many standard deviations.
MIN_THRESHOLD = 3.0
#: Weight of the identity in the shrunk correlation matrix.
SHRINKAGE = 0.01
#: If the global model flags more than this share of a device's fitting part, its verdicts
#: are taken to say nothing about the device, and the warm-up learns from every reading.
MAX_FLAGGED_SHARE = 0.5
#: Time constant, in readings, of the adapting centre.
ADAPT_READINGS = 100.0
_ALPHA = 1.0 / ADAPT_READINGS


def derived_names(features: Sequence[str], window: int) -> tuple[str, ...]:
    """The model's input names for raw ``features`` and a window of ``window`` readings."""
    if window <= 1:
        return tuple(features)
    return (*(f"{f} [mean {window}]" for f in features), *(f"{f} [std {window}]" for f in features))


def windowed_matrix(x: Matrix, window: int) -> Matrix:
    """Model inputs for consecutive readings of one device (training, evaluation)."""
    x = np.asarray(x, dtype=np.float64)
    if window <= 1:
        return x.copy()
    return np.vstack([_stats(x[max(0, i - window + 1) : i + 1]) for i in range(x.shape[0])])


def _stats(recent: Matrix) -> Matrix:
    return np.concatenate([recent.mean(axis=0), recent.std(axis=0)])


def baseline_scale(center: Matrix, std: Matrix, n_raw: int, global_scale: Matrix) -> Matrix:
    """Standard deviations floored at a small fraction of each raw channel's level and of
    the global model's scale."""
    level = np.abs(center[:n_raw])
    floor = np.tile(level, center.shape[0] // n_raw) * RELATIVE_SCALE_FLOOR
    floor = np.maximum(floor, GLOBAL_SCALE_FLOOR * global_scale)
    return np.maximum(std, np.maximum(floor, MIN_STD))


@dataclass(slots=True)
class Moments:
    """Running count, mean and co-moment matrix of rows (Welford); two merge exactly."""

    n: int
    mean: Matrix
    m2: Matrix

    @classmethod
    def of(cls, row: Matrix) -> Moments:
        return cls(1, row.copy(), np.zeros((row.size, row.size)))

    def add(self, row: Matrix) -> None:
        self.n += 1
        delta = row - self.mean
        self.mean += delta / self.n
        self.m2 += np.outer(delta, row - self.mean)

    def merged(self, other: Moments) -> Moments:
        """The moments of both sets of rows together (Chan, Golub and LeVeque)."""
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(
            n,
            self.mean + delta * (other.n / n),
            self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n),
        )


@dataclass(slots=True)
class DeviceState:
    recent: deque[tuple[float, ...]]
    count: int = 0  # readings the baseline has seen (warm-up progress)
    # While fitting: the readings the global model judged normal, and those it flagged.
    normal: Moments | None = None
    flagged: Moments | None = None
    # Whether the fit left out the flagged readings (then the held-back part does too).
    trusts_global: bool = False
    center: Matrix | None = None  # adapting centre, once fitted
    scale: Matrix | None = None
    cond: Matrix | None = None  # z -> conditional deviations (D, D), once fitted
    held_back_max: float = 0.0  # largest max |z| in the held-back part of the warm-up
    threshold: float | None = None  # set when warm-up completes


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


_OFF = Assessment(warming_up=False, active=False)
_WARMING = Assessment(warming_up=True, active=False)


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
    ) -> None:
        self.n_features = n_features
        self.window = max(1, window)
        self.warmup = warmup
        self.n_fit = max(2, warmup - round(warmup * HELD_BACK))
        self.global_center = np.asarray(global_center, dtype=np.float64)
        self.global_scale = np.asarray(global_scale, dtype=np.float64)
        self.devices: dict[str, DeviceState] = {}

    def observe(self, device_id: str, values: Sequence[float]) -> Matrix:
        """The model inputs for this reading: the raw values or the window's statistics."""
        st = self.devices.get(device_id)
        if st is None:
            st = self.devices[device_id] = DeviceState(deque(maxlen=self.window))
        st.recent.append(tuple(values))
        if self.window == 1:
            return np.array(values, dtype=np.float64)
        return _stats(np.array(st.recent, dtype=np.float64))

    def assess(self, device_id: str, row: Matrix, global_anomaly: bool) -> Assessment:
        """Judge ``row`` against the device's baseline, then let the baseline learn from it."""
        if self.warmup <= 0:
            return _OFF
        st = self.devices[device_id]
        c, s, w = st.center, st.scale, st.cond
        if c is None or s is None or w is None:  # fitting part of the warm-up
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
            return _WARMING
        diff = row - c
        z = diff / s
        dev = w @ z
        score = float(np.abs(dev).max())
        if st.threshold is None:  # held-back part of the warm-up: sets the threshold
            st.count += 1
            if not (global_anomaly and st.trusts_global):
                st.held_back_max = max(st.held_back_max, score)
                c += _ALPHA * diff
            if st.count >= self.warmup:
                st.threshold = max(MIN_THRESHOLD, THRESHOLD_MARGIN * st.held_back_max)
            return _WARMING
        thr = st.threshold
        if score <= thr:  # the usual case: no input is beyond the threshold, none frozen
            c += _ALPHA * diff
            return Assessment(False, True, False, score, thr)
        # anomalous: keep what the explanation needs (the centre before it adapts)
        out = Assessment(False, True, True, score, thr, z, c.copy(), s)
        if global_anomaly:
            c += np.where(np.abs(dev) <= thr, _ALPHA, 0.0) * diff
        else:
            c += _ALPHA * diff
        return out

    def _fit(self, st: DeviceState) -> None:
        normal, flagged = st.normal, st.flagged
        n_flagged = 0 if flagged is None else flagged.n
        st.trusts_global = (
            normal is not None
            and n_flagged <= MAX_FLAGGED_SHARE * st.count
            and normal.n > normal.mean.size  # else the covariance would be singular
        )
        if st.trusts_global or flagged is None:
            moments = normal
        else:
            moments = flagged if normal is None else normal.merged(flagged)
        assert moments is not None  # the fitting part has at least one reading
        mean, cov = moments.mean, moments.m2 / moments.n
        std = np.sqrt(np.maximum(np.diag(cov), 0.0))
        scale = baseline_scale(mean, std, self.n_features, self.global_scale)
        corr = cov / np.outer(scale, scale)
        np.fill_diagonal(corr, 1.0)
        precision = np.linalg.inv((1.0 - SHRINKAGE) * corr + SHRINKAGE * np.eye(mean.size))
        # (P z)_j / sqrt(P_jj): input j's distance from its prediction by the others
        st.cond = precision / np.sqrt(np.diag(precision))[:, None]
        st.center, st.scale = mean, scale
        st.normal = st.flagged = None

    def progress(self, device_id: str) -> int:
        st = self.devices.get(device_id)
        return 0 if st is None else st.count

    # -- operator view and control (``daemon.control``) ---------------------------------

    def summary(self, device_id: str) -> dict[str, Any] | None:
        """What an operator needs to see of a device, without its arrays; None if unknown."""
        st = self.devices.get(device_id)
        if st is None:
            return None
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
            "baseline_threshold": st.threshold,
            "window_filled": len(st.recent),
            "window": self.window,
        }

    def forget(self, device_id: str) -> DeviceState | None:
        """Drop the device's window and baseline: its next reading starts a new warm-up.
        Returns what was dropped (None if the device was unknown)."""
        return self.devices.pop(device_id, None)

    # -- persistence (plain data; the caller writes it atomically) --------------------

    def to_json(self) -> dict[str, Any]:
        def arr(a: Matrix | None) -> list[Any] | None:
            return None if a is None else a.tolist()

        def moments(m: Moments | None) -> dict[str, Any] | None:
            return None if m is None else {"n": m.n, "mean": m.mean.tolist(), "m2": m.m2.tolist()}

        return {
            "format": STATE_FORMAT,
            "window": self.window,
            "warmup": self.warmup,
            "n_features": self.n_features,
            "devices": {
                dev: {
                    "recent": [list(r) for r in st.recent],
                    "count": st.count,
                    "normal": moments(st.normal),
                    "flagged": moments(st.flagged),
                    "trusts_global": st.trusts_global,
                    "center": arr(st.center),
                    "scale": arr(st.scale),
                    "cond": arr(st.cond),
                    "held_back_max": st.held_back_max,
                    "threshold": st.threshold,
                }
                for dev, st in self.devices.items()
            },
        }

    def restore(self, data: dict[str, Any]) -> int:
        """Load saved devices; returns how many. Raises ValueError if the state is for a
        different window, feature count or warm-up length (the caller then starts fresh)."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown device state format {data.get('format')!r}")
        if data.get("window") != self.window or data.get("n_features") != self.n_features:
            raise ValueError("device state was saved for a different feature window or schema")
        if data.get("warmup") != self.warmup:
            raise ValueError("device state was saved for a different warm-up length")
        width = len(self.global_center)

        def arr(v: Any, shape: tuple[int, ...] = (width,)) -> Matrix | None:
            if v is None:
                return None
            a = np.asarray(v, dtype=np.float64)
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
            threshold = raw["threshold"]
            devices[str(dev)] = DeviceState(
                recent,
                int(raw["count"]),
                moments(raw["normal"]),
                moments(raw["flagged"]),
                bool(raw["trusts_global"]),
                arr(raw["center"]),
                arr(raw["scale"]),
                arr(raw["cond"], (width, width)),
                float(raw["held_back_max"]),
                None if threshold is None else float(threshold),
            )
        self.devices = devices
        return len(devices)
