"""Windowed features: the model's inputs made from a device's recent readings.

With ``window = w > 1`` each raw feature ``f`` becomes two model
inputs: ``f [mean w]`` and ``f [std w]``, the mean and standard deviation of the device's
last ``w`` readings (fewer at its start). ``window = 1`` keeps the raw readings as they are.

The same functions run in the daemon (``daemon.devices``), in ``anomalyd score`` and
``anomalyd evaluate`` and in training, so a model is fitted on exactly the inputs it is
later served.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Matrix = NDArray[np.float64]


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
    return np.vstack([window_stats(x[max(0, i - window + 1) : i + 1]) for i in range(x.shape[0])])


def window_stats(recent: Matrix) -> Matrix:
    return np.concatenate([recent.mean(axis=0), recent.std(axis=0)])
