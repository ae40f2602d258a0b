"""The interface every detector implements; thresholds live in ``daemon.calibration``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar, Protocol, Self

import numpy as np
from numpy.typing import NDArray

from daemon.errors import ModelLoadError

Matrix = NDArray[np.float64]
Vector = NDArray[np.float64]
#: Where a long fit says how far it has got (one line at a time).
Progress = Callable[[str], None]


class Detector(Protocol):
    """Learns what normal looks like and scores readings; higher score = more anomalous.

    Inputs are already standardised (float64, shape (n, d)). ``score`` is vectorised over
    the batch, and a row's score does not depend on the other rows of the batch.
    """

    name: ClassVar[str]
    #: Files ``save`` writes and ``load`` reads, so the loader can check they were verified.
    artifact_names: ClassVar[tuple[str, ...]]

    def fit(self, x: Matrix, progress: Progress | None = None) -> None: ...

    def score(self, x: Matrix) -> Vector: ...

    def save(self, directory: Path) -> list[Path]: ...

    @classmethod
    def load(cls, directory: Path) -> Self: ...


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write named arrays as an ``.npz`` (never pickled); returns ``path``."""
    with path.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)
    return path


def load_arrays(path: Path, required: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Read an ``.npz`` without pickles; ModelLoadError names the file and what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: cannot read arrays: {exc}") from exc
    missing = sorted(set(required) - arrays.keys())
    if missing:
        raise ModelLoadError(f"{path.name}: missing arrays {missing}")
    return arrays
