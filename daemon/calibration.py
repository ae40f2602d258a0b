"""Thresholds and confidence for a detector's raw scores, kept outside the detectors.

A :class:`Calibration` is computed from the scores of held-back normal data that the
detector never saw while fitting:

* ``center``: the median normal score;
* ``spread``: the inter-quartile range of normal scores (floored at a tiny positive value),
  the unit in which distances from the threshold are measured;
* ``threshold``: the ``quantile`` (default 0.99) of normal scores; a score strictly above it
  is an anomaly, so about 1 % of normal readings are flagged by construction.

``margin = (score - threshold) / spread`` is the signed distance from the threshold in
units of the normal spread: negative for normal verdicts, positive for anomalies; alert
severity is graded on it.

``confidence = 1 - exp(-|score - threshold| / spread)`` is how sure the verdict is, in
[0, 1), whichever way it went: 0 exactly at the threshold (a coin toss), about 0.63 one
spread away from it and approaching 1 far from it (it rounds to 1.0 beyond ~37 spreads).
It is not a probability of anomaly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.errors import ModelLoadError, TrainingError
from daemon.training import QUANTILE_RANGE

#: Keeps margins finite when every normal score is identical.
MIN_SPREAD = 1e-9

Vector = NDArray[np.float64]


@dataclass(frozen=True)
class Calibration:
    """Threshold and scale for one detector's scores."""

    center: float
    spread: float
    threshold: float
    quantile: float

    @classmethod
    def from_scores(cls, normal_scores: Vector, quantile: float = 0.99) -> Calibration:
        low, high = QUANTILE_RANGE
        if not low <= quantile < high:
            raise TrainingError(f"quantile must be in [{low:g}, {high:g}), got {quantile}")
        scores = np.asarray(normal_scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size < 10 or not np.all(np.isfinite(scores)):
            raise TrainingError("calibration needs at least 10 finite held-back scores")
        q25, median, q75, threshold = np.quantile(scores, [0.25, 0.5, 0.75, quantile])
        return cls(
            center=float(median),
            spread=max(float(q75 - q25), MIN_SPREAD),
            threshold=float(threshold),
            quantile=quantile,
        )

    def is_anomaly(self, scores: Vector) -> NDArray[np.bool_]:
        return scores > self.threshold

    def margin(self, scores: Vector) -> Vector:
        return (scores - self.threshold) / self.spread

    def confidence(self, scores: Vector) -> Vector:
        return -np.expm1(-np.abs(scores - self.threshold) / self.spread)

    def to_dict(self) -> dict[str, float]:
        return {
            "center": self.center,
            "spread": self.spread,
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        try:
            cal = cls(
                center=float(raw["center"]),
                spread=float(raw["spread"]),
                threshold=float(raw["threshold"]),
                quantile=float(raw["quantile"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"invalid calibration {raw!r}: {exc}") from exc
        if not (cal.spread > 0 and np.isfinite([cal.center, cal.threshold]).all()):
            raise ModelLoadError(f"invalid calibration {raw!r}")
        return cal
