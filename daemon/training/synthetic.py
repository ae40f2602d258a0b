"""Synthetic centrifugal pump readings: correlated sensors, operating states, faults.

Everything follows from the duty cycle. At duty ``u`` the pump's expected readings are
flow ≈ 200·u, current ≈ 42.5 + 60·u, temperature ≈ 34 + 15·u, pressure ≈ 2.75 + 5·u and
vibration ≈ 1.3 + 2·u, with noise of a few per cent, a slow ambient-temperature drift and
rougher running under high load. Faults break those relations in physically plausible ways.
"""

from __future__ import annotations

import zlib
from typing import Final

import numpy as np
from numpy.typing import NDArray

FEATURES: Final = ("temperature", "vibration", "pressure", "flow_rate", "current", "duty_cycle")
#: Operating states with their duty-cycle range and share of time.
STATES: Final = {
    "low_load": ((0.30, 0.50), 0.25),
    "normal": ((0.50, 0.80), 0.55),
    "high_load": ((0.80, 0.95), 0.20),
}
FAULTS: Final = (
    "bearing_wear",
    "cavitation",
    "overheating",
    "electrical_fault",
    "blockage",
    "sensor_stuck",
    "sensor_drift",
)

_T, _V, _P, _F, _C, _D = range(6)


def expected_readings(duty: NDArray[np.float64]) -> NDArray[np.float64]:
    """Noise-free readings at the given duty cycles, shape (n, 6) in FEATURES order."""
    return np.column_stack(
        [34 + 15 * duty, 1.3 + 2 * duty, 2.75 + 5 * duty, 200 * duty, 42.5 + 60 * duty, duty]
    )


def _noisy_readings(
    duty: NDArray[np.float64], ambient: NDArray[np.float64], rng: np.random.Generator
) -> NDArray[np.float64]:
    x = expected_readings(duty)
    n = duty.shape[0]
    rough = 1.0 + 0.5 * (duty > 0.8)  # high load runs rougher
    x[:, _T] += ambient + rng.normal(0, 0.5, n)
    x[:, _V] *= 1 + rng.normal(0, 0.03, n) * rough
    x[:, _P] *= 1 + rng.normal(0, 0.015, n)
    x[:, _F] *= 1 + rng.normal(0, 0.02, n)
    x[:, _C] *= 1 + rng.normal(0, 0.012, n)
    return x


def _apply_faults(
    x: NDArray[np.float64],
    faults: NDArray[np.str_],
    severity: NDArray[np.float64],
    rng: np.random.Generator,
) -> None:
    """Distort faulty rows in place; ``severity`` in (0, 1] scales how far."""
    s = severity

    def rows(name: str) -> NDArray[np.bool_]:
        return np.asarray(faults == name)

    m = rows("bearing_wear")
    x[m, _V] += 1.5 + 5 * s[m]
    x[m, _T] += 2 + 4 * s[m]
    m = rows("cavitation")
    x[m, _P] -= 0.8 + 1.5 * s[m]
    x[m, _F] *= 0.85 - 0.25 * s[m]
    x[m, _V] += 1.0 + 2 * s[m]
    m = rows("overheating")
    x[m, _T] += 10 + 25 * s[m]
    m = rows("electrical_fault")
    x[m, _C] += 15 + 30 * s[m]
    m = rows("blockage")
    x[m, _P] += 1.2 + 2 * s[m]
    x[m, _F] *= 0.8 - 0.3 * s[m]
    # A stuck sensor reports a value from another operating point; a drifting one creeps
    # away from the truth. Either breaks the correlation with the duty cycle.
    for name, apply in (("sensor_stuck", _stuck), ("sensor_drift", _drift)):
        idx = np.flatnonzero(rows(name))
        if idx.size:
            col = rng.integers(0, 5, idx.size)
            x[idx, col] = apply(x[idx, col], col, s[idx])


def _stuck(
    values: NDArray[np.float64], col: NDArray[np.int64], s: NDArray[np.float64]
) -> NDArray[np.float64]:
    del s  # a stuck value does not get worse
    low, high = expected_readings(np.array([0.25]))[0], expected_readings(np.array([1.0]))[0]
    # the half of the range farthest from the current value
    mid = (low + high)[col] / 2
    return np.asarray(np.where(values > mid, low[col], high[col]), dtype=np.float64)


def _drift(
    values: NDArray[np.float64], col: NDArray[np.int64], s: NDArray[np.float64]
) -> NDArray[np.float64]:
    del col  # every sensor drifts the same way
    return values * (1.15 + 0.3 * s)


def generate_dataset(
    n: int, seed: int, fault_fraction: float = 0.0
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.str_]]:
    """Independent readings: (x in FEATURES order, is-fault labels, operating states)."""
    rng = np.random.default_rng(seed)
    names = list(STATES)
    shares = np.array([STATES[k][1] for k in names])
    states = np.asarray(names)[rng.choice(len(names), n, p=shares / shares.sum())]
    duty = np.empty(n)
    for name in names:
        m = states == name
        lo, hi = STATES[name][0]
        duty[m] = rng.uniform(lo, hi, m.sum())
    ambient = 1.0 * np.sin(np.linspace(0, 4 * np.pi, n))
    x = _noisy_readings(duty, ambient, rng)
    y = rng.random(n) < fault_fraction
    faults = np.where(y, np.asarray(FAULTS)[rng.integers(0, len(FAULTS), n)], "")
    _apply_faults(x, faults, rng.uniform(0.2, 1.0, n), rng)
    return x, y, states


class PumpStream:
    """One simulated pump: a state machine publishing one reading per ``next()``.

    States persist for minutes; the duty cycle glides towards a target inside the state's
    range; a fault, once started, lasts 5–60 readings and worsens over its course.
    """

    def __init__(self, device_id: str, seed: int = 0, fault_rate: float = 0.01) -> None:
        self.device_id = device_id
        self.fault_rate = fault_rate
        self._rng = np.random.default_rng([seed, zlib.crc32(device_id.encode())])
        self._state = "normal"
        self._target = self._new_target()
        self._duty = self._target
        self._t = 0
        self._phase = self._rng.uniform(0, 2 * np.pi)
        self._fault: str | None = None
        self._fault_len = 0
        self._fault_age = 0

    def _new_target(self) -> float:
        lo, hi = STATES[self._state][0]
        return float(self._rng.uniform(lo, hi))

    def next(self) -> tuple[dict[str, float], str, str | None]:
        rng = self._rng
        self._t += 1
        if rng.random() < 0.005:
            self._state = str(rng.choice(list(STATES)))
            self._target = self._new_target()
        elif rng.random() < 0.02:
            self._target = self._new_target()
        self._duty += 0.1 * (self._target - self._duty) + rng.normal(0, 0.003)
        lo, hi = STATES[self._state][0]
        self._duty = float(np.clip(self._duty, lo - 0.05, hi + 0.05))
        ambient = np.array([np.sin(self._phase + self._t * 2 * np.pi / 5000)])
        x = _noisy_readings(np.array([self._duty]), ambient, rng)
        if self._fault is None and rng.random() < self.fault_rate:
            self._fault = str(rng.choice(FAULTS))
            self._fault_len = int(rng.integers(5, 61))
            self._fault_age = 0
        fault = self._fault
        if fault is not None:
            self._fault_age += 1
            severity = np.array([0.2 + 0.8 * self._fault_age / self._fault_len])
            _apply_faults(x, np.array([fault]), severity, rng)
            if self._fault_age >= self._fault_len:
                self._fault = None
        reading = {name: round(float(v), 3) for name, v in zip(FEATURES, x[0], strict=True)}
        return reading, self._state, fault
