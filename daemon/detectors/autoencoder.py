"""Dense autoencoder: trained with Keras, served as numpy matrix products.

Keras ``predict`` costs ~43 ms for one reading and importing TensorFlow ~5 s; the same
weights as numpy take microseconds. Only ``fit`` touches TensorFlow, through a lazy import
of ``daemon.training.keras_autoencoder``, so serving never imports it.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import ClassVar, Self

import numpy as np

from daemon.detectors.base import Matrix, Progress, Vector, load_arrays, save_arrays
from daemon.errors import ModelLoadError

Layer = tuple[Matrix, Matrix]
_KERAS_MODULE = "daemon.training.keras_autoencoder"


class AutoencoderDetector:
    name: ClassVar[str] = "autoencoder"
    artifact_names: ClassVar[tuple[str, ...]] = ("autoencoder.npz",)

    def __init__(self, seed: int = 0, max_epochs: int = 60, progress_every_s: float = 5.0) -> None:
        self.seed = seed
        self.max_epochs = max_epochs
        #: the least time between two progress lines while fitting
        self.progress_every_s = progress_every_s
        self._layers: list[Layer] | None = None

    @classmethod
    def from_layers(cls, layers: list[Layer]) -> Self:
        """Build from (kernel, bias) pairs; every layer but the last is followed by ReLU."""
        det = cls()
        det._layers = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in layers]
        return det

    def fit(self, x: Matrix, progress: Progress | None = None) -> None:
        if progress is not None and _KERAS_MODULE not in sys.modules:
            progress("autoencoder: loading TensorFlow")  # seconds, more on a cold disk
        from daemon.training.keras_autoencoder import export_layers, fit_autoencoder

        model = fit_autoencoder(x, seed=self.seed, max_epochs=self.max_epochs,
                                progress=progress, every_s=self.progress_every_s)
        self._layers = [
            (w.astype(np.float64), b.astype(np.float64)) for w, b in export_layers(model)
        ]

    def reconstruct(self, x: Matrix) -> Matrix:
        if self._layers is None:
            raise RuntimeError("AutoencoderDetector used before fit() or load()")
        h = np.asarray(x, dtype=np.float64)
        last = len(self._layers) - 1
        for i, (w, b) in enumerate(self._layers):
            h = h @ w + b
            if i != last:
                np.maximum(h, 0.0, out=h)
        return h

    def feature_errors(self, x: Matrix) -> Matrix:
        """Per-feature squared reconstruction error, shape (n, d)."""
        err = np.asarray(x, dtype=np.float64) - self.reconstruct(x)
        return np.asarray(err * err, dtype=np.float64)

    def score(self, x: Matrix) -> Vector:
        return np.asarray(self.feature_errors(x).mean(axis=1), dtype=np.float64)

    def save(self, directory: Path) -> list[Path]:
        if self._layers is None:
            raise RuntimeError("AutoencoderDetector saved before fit()")
        arrays: dict[str, Matrix] = {}
        for i, (w, b) in enumerate(self._layers):
            arrays[f"kernel_{i}"] = w
            arrays[f"bias_{i}"] = b
        return [save_arrays(directory / self.artifact_names[0], arrays)]

    @classmethod
    def load(cls, directory: Path) -> Self:
        path = directory / cls.artifact_names[0]
        npz = load_arrays(path)
        count = len(npz) // 2
        try:
            layers = [(npz[f"kernel_{i}"], npz[f"bias_{i}"]) for i in range(count)]
        except KeyError as exc:
            raise ModelLoadError(f"{path.name}: missing autoencoder layer {exc}") from exc
        for (w, b), (w_next, _) in itertools.pairwise(layers):
            if w.shape[1] != b.shape[0] or w.shape[1] != w_next.shape[0]:
                raise ModelLoadError(f"{path.name}: layer shapes do not chain")
        if not layers:
            raise ModelLoadError(f"{path.name}: no layers")
        return cls.from_layers(layers)
