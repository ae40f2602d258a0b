"""The interface every detector implements; thresholds live in ``daemon.calibration``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, Self

import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[np.float64]
Vector = NDArray[np.float64]


class Detector(Protocol):
    """Learns what normal looks like and scores readings; higher score = more anomalous.

    Inputs are already standardised (float64, shape (n, d)). ``score`` is vectorised over
    the batch, and a row's score does not depend on the other rows of the batch.
    """

    name: ClassVar[str]
    #: Files ``save`` writes and ``load`` reads, so the loader can check they were verified.
    artifact_names: ClassVar[tuple[str, ...]]

    def fit(self, x: Matrix) -> None: ...

    def score(self, x: Matrix) -> Vector: ...

    def save(self, directory: Path) -> list[Path]: ...

    @classmethod
    def load(cls, directory: Path) -> Self: ...
