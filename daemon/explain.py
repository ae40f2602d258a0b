"""Human-readable explanations of a reading: which features deviate, how far, which way.

Pure functions over numpy arrays. Contributions are ranked by |z| against the reference
(training mean/std or a per-device baseline); only features at least ``MIN_SIGMA`` away
are named, at most ``MAX_FEATURES`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

MIN_SIGMA = 2.0
MAX_FEATURES = 3
NORMAL_TEXT = "within normal parameters"


@dataclass(frozen=True)
class Contribution:
    feature: str
    value: float
    expected: float
    spread: float
    deviation_sigma: float
    direction: Literal["high", "low"]

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies and was a visible share of batch time.
        return {"feature": self.feature, "value": self.value, "expected": self.expected,
                "spread": self.spread, "deviation_sigma": self.deviation_sigma,
                "direction": self.direction}

    def describe(self) -> str:
        decimals = _decimals(self.expected)
        # the value to its own three digits, but no finer than the normal it is set
        # against: a window's spread of identical readings is 0 give or take 1e-14
        shown = min(_decimals(self.value), max(decimals, _decimals(self.spread)))
        side = "above" if self.direction == "high" else "below"
        return (
            f"{self.feature} {self.value:.{shown}f} is {abs(self.deviation_sigma):.1f}σ "
            f"{side} normal ({self.expected:.{decimals}f} ± {self.spread:.{decimals}f})"
        )


@dataclass(frozen=True)
class Explanation:
    contributions: tuple[Contribution, ...]
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "contributions": [c.to_dict() for c in self.contributions]}


def explain_reading(
    features: Sequence[str],
    values: NDArray[np.float64],
    zscores: NDArray[np.float64],
    center: NDArray[np.float64],
    scale: NDArray[np.float64],
    *,
    is_anomaly: bool = True,
) -> Explanation:
    """Explain one reading (1-D arrays of length d)."""
    return explain_batch(
        features, values[None, :], zscores[None, :], center, scale, np.array([is_anomaly])
    )[0]


def explain_batch(
    features: Sequence[str],
    values: NDArray[np.float64],
    zscores: NDArray[np.float64],
    center: NDArray[np.float64],
    scale: NDArray[np.float64],
    is_anomaly: NDArray[np.bool_],
) -> list[Explanation]:
    """Explain each row; ``center``/``scale`` are (d,) or per-row (n, d)."""
    n, d = values.shape
    center = np.broadcast_to(center, (n, d))
    scale = np.broadcast_to(scale, (n, d))
    k = min(MAX_FEATURES, d)
    # ranking is vectorised over the batch; only the text is built row by row
    order = np.argsort(-np.abs(zscores), axis=1, kind="stable")[:, :k]
    top_z = np.take_along_axis(zscores, order, axis=1)
    out = []
    for i in range(n):
        named = np.abs(top_z[i]) >= MIN_SIGMA
        if not named.any() and is_anomaly[i]:
            named[0] = True
        parts = tuple(
            Contribution(
                feature=features[j],
                value=float(values[i, j]),
                expected=float(center[i, j]),
                spread=float(scale[i, j]),
                deviation_sigma=round(float(zscores[i, j]), 1),
                direction="high" if zscores[i, j] >= 0 else "low",
            )
            for j in order[i][named]
        )
        out.append(Explanation(parts, _text(parts, bool(is_anomaly[i]))))
    return out


def _text(parts: tuple[Contribution, ...], is_anomaly: bool) -> str:
    if not parts:
        return NORMAL_TEXT
    if is_anomaly and abs(parts[0].deviation_sigma) < MIN_SIGMA:
        return "unusual combination of readings; closest to its limit: " + parts[0].describe()
    return "; ".join(p.describe() for p in parts)


def _decimals(x: float) -> int:
    """Enough decimals for about three significant digits, never negative."""
    if x == 0 or not math.isfinite(x):
        return 2
    return max(0, 2 - math.floor(math.log10(abs(x))))

