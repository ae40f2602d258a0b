"""Local Outlier Factor (novelty mode) on a bounded subsample of the training data.

The neighbour search at scoring time grows with the number of stored rows, so fitting uses
at most ``max_rows`` of them. The fitted estimator is saved with joblib, which is a pickle:
``daemon.models`` verifies its SHA-256 against the manifest before this module loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

import joblib
import numpy as np
from sklearn.neighbors import LocalOutlierFactor

from daemon.detectors.base import Matrix, Vector
from daemon.errors import ModelLoadError


class LofDetector:
    name: ClassVar[str] = "lof"
    artifact_names: ClassVar[tuple[str, ...]] = ("lof.joblib",)

    def __init__(self, seed: int = 0, n_neighbors: int = 20, max_rows: int = 5000) -> None:
        self.seed = seed
        self.n_neighbors = n_neighbors
        self.max_rows = max_rows
        self._model: LocalOutlierFactor | None = None

    def fit(self, x: Matrix) -> None:
        if x.shape[0] > self.max_rows:
            rng = np.random.default_rng(self.seed)
            x = x[np.sort(rng.choice(x.shape[0], self.max_rows, replace=False))]
        neighbours = min(self.n_neighbors, x.shape[0] - 1)
        self._model = LocalOutlierFactor(n_neighbors=neighbours, novelty=True).fit(x)

    def score(self, x: Matrix) -> Vector:
        if self._model is None:
            raise RuntimeError("LofDetector used before fit() or load()")
        return np.asarray(-self._model.score_samples(x), dtype=np.float64)

    def save(self, directory: Path) -> list[Path]:
        path = directory / self.artifact_names[0]
        joblib.dump(self._model, path)
        return [path]

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Unpickle the estimator; callers must have verified the file's hash first."""
        path = directory / cls.artifact_names[0]
        try:
            model = joblib.load(path)
        except Exception as exc:  # unpickling can raise anything
            raise ModelLoadError(f"{path.name}: cannot load LOF model: {exc}") from exc
        if not isinstance(model, LocalOutlierFactor):
            raise ModelLoadError(f"{path.name}: expected LocalOutlierFactor, got {type(model)}")
        det = cls()
        det._model = model
        return det
