"""Per-device state: the window of recent readings and the warm-up baseline.

Pure: readings in, model inputs out; no clock, no I/O (``to_json``/``from_json`` give plain
data, the caller writes it). The same code runs in the daemon, in ``anomalyd score``, in
``anomalyd evaluate`` and, through :func:`windowed_matrix`, in training, so a model is fitted
on exactly the inputs it is later served.

*Windowed features.* With ``window = w > 1`` each raw feature ``f`` becomes two model
inputs: ``f [mean w]`` and ``f [std w]``, the mean and standard deviation of the device's
last ``w`` readings (fewer at its start). Faults that show as a shift or a change in
variability are seen even when no single reading is out of range. ``window = 1`` keeps the
raw readings as they are.

*Warm-up baseline.* The first ``warmup`` readings of each device establish its own centre
and scale (mean and standard deviation of its model inputs). Until then a reading is scored
against the global model's standardisation and marked ``warming_up``; from then on against
the device's own baseline, which is frozen (a fault must not become the new normal).
Every reading of the warm-up counts, anomalous or not: the daemon cannot tell which are.
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
STATE_FORMAT = 1
#: A channel is taken to vary by at least this fraction of its level, so a sensor that sat
#: still (or was quantised to one value) through warm-up does not turn noise into 100σ.
RELATIVE_SCALE_FLOOR = 1e-3


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


def baseline_scale(center: Matrix, std: Matrix, n_raw: int) -> Matrix:
    """Standard deviations floored at a small fraction of each raw channel's level."""
    level = np.abs(center[:n_raw])
    floor = np.maximum(np.tile(level, center.shape[0] // n_raw) * RELATIVE_SCALE_FLOOR, MIN_STD)
    return np.maximum(std, floor)


@dataclass(slots=True)
class DeviceState:
    recent: deque[tuple[float, ...]]
    count: int = 0  # readings seen so far (warm-up progress)
    mean: Matrix | None = None  # running mean of model inputs during warm-up (Welford)
    m2: Matrix | None = None
    center: Matrix | None = None  # frozen baseline once warm-up is done
    scale: Matrix | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """One reading as the model sees it, and what to standardise it against."""

    row: Matrix  # model inputs (D,)
    center: Matrix  # (D,)
    scale: Matrix  # (D,)
    warming_up: bool
    baseline: bool  # center/scale are the device's own


class DeviceTracker:
    """Window and baseline of every device seen; ``observe`` readings in arrival order."""

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
        self.global_center = np.asarray(global_center, dtype=np.float64)
        self.global_scale = np.asarray(global_scale, dtype=np.float64)
        self.devices: dict[str, DeviceState] = {}

    def observe(self, device_id: str, values: Sequence[float]) -> Observation:
        st = self.devices.get(device_id)
        if st is None:
            st = self.devices[device_id] = DeviceState(deque(maxlen=self.window))
        st.recent.append(tuple(values))
        recent = np.array(st.recent, dtype=np.float64)
        row = recent[-1].copy() if self.window == 1 else _stats(recent)
        if st.center is not None and st.scale is not None:
            return Observation(row, st.center, st.scale, warming_up=False, baseline=True)
        if self.warmup <= 0:
            return Observation(row, self.global_center, self.global_scale, False, False)
        st.count += 1
        if st.mean is None or st.m2 is None:
            st.mean, st.m2 = row.copy(), np.zeros_like(row)
        else:
            delta = row - st.mean
            st.mean += delta / st.count
            st.m2 += delta * (row - st.mean)
        if st.count >= self.warmup:
            # The reading that completes warm-up is still judged by the global model.
            st.center = st.mean.copy()
            st.scale = baseline_scale(st.center, np.sqrt(st.m2 / st.count), self.n_features)
            st.mean = st.m2 = None
        return Observation(row, self.global_center, self.global_scale, True, False)

    def progress(self, device_id: str) -> int:
        st = self.devices.get(device_id)
        return 0 if st is None else st.count

    # -- persistence (plain data; the caller writes it atomically) --------------------

    def to_json(self) -> dict[str, Any]:
        def arr(a: Matrix | None) -> list[float] | None:
            return None if a is None else [float(v) for v in a]

        return {
            "format": STATE_FORMAT,
            "window": self.window,
            "warmup": self.warmup,
            "n_features": self.n_features,
            "devices": {
                dev: {
                    "recent": [list(r) for r in st.recent],
                    "count": st.count,
                    "mean": arr(st.mean),
                    "m2": arr(st.m2),
                    "center": arr(st.center),
                    "scale": arr(st.scale),
                }
                for dev, st in self.devices.items()
            },
        }

    def restore(self, data: dict[str, Any]) -> int:
        """Load saved devices; returns how many. Raises ValueError if the state is for a
        different window or feature count (the caller then starts fresh)."""
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown device state format {data.get('format')!r}")
        if data.get("window") != self.window or data.get("n_features") != self.n_features:
            raise ValueError("device state was saved for a different feature window or schema")
        width = len(self.global_center)

        def arr(v: Any) -> Matrix | None:
            if v is None:
                return None
            a = np.asarray(v, dtype=np.float64)
            if a.shape != (width,) or not np.isfinite(a).all():
                raise ValueError("device state array has the wrong shape or is not finite")
            return a

        devices: dict[str, DeviceState] = {}
        for dev, raw in data["devices"].items():
            recent: deque[tuple[float, ...]] = deque(maxlen=self.window)
            for r in raw["recent"][-self.window :]:
                if len(r) != self.n_features:
                    raise ValueError("device state reading has the wrong width")
                recent.append(tuple(float(v) for v in r))
            devices[str(dev)] = DeviceState(
                recent,
                int(raw["count"]),
                arr(raw["mean"]),
                arr(raw["m2"]),
                arr(raw["center"]),
                arr(raw["scale"]),
            )
        self.devices = devices
        return len(devices)
