"""Per-feature standardisation, stored as JSON so loading a model never unpickles it.

Scoring accepts optional per-row ``center``/``scale`` arrays that replace the training
mean/std for those rows: that is how per-device baselines plug in without a second
code path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.errors import ModelLoadError, TrainingError

#: Constant features would divide by zero; this floor keeps their z-scores finite.
MIN_STD = 1e-6

Matrix = NDArray[np.float64]


@dataclass(frozen=True)
class StandardScaler:
    """Per-feature mean and (floored) standard deviation."""

    mean: Matrix
    std: Matrix

    @classmethod
    def fit(cls, x: Matrix) -> StandardScaler:
        if x.ndim != 2 or x.shape[0] < 2:
            raise TrainingError(f"need a 2-D matrix with at least 2 rows, got shape {x.shape}")
        mean = x.mean(axis=0)
        std = np.maximum(x.std(axis=0), MIN_STD)
        return cls(mean=mean, std=std)

    def transform(
        self, x: Matrix, *, center: Matrix | None = None, scale: Matrix | None = None
    ) -> Matrix:
        """Return z-scores; ``center``/``scale`` of shape (n, d) replace mean/std per row."""
        c = self.mean if center is None else center
        s = self.std if scale is None else np.maximum(scale, MIN_STD)
        return (np.asarray(x, dtype=np.float64) - c) / s

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> StandardScaler:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            mean = np.asarray(raw["mean"], dtype=np.float64)
            std = np.asarray(raw["std"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path.name}: unreadable preprocessor: {exc}") from exc
        if mean.ndim != 1 or mean.shape != std.shape or not np.all(std > 0):
            raise ModelLoadError(f"{path.name}: mean/std must be equal-length, std positive")
        return cls(mean=mean, std=std)
