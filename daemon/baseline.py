"""A device's own baseline model: its fit and the constants that shape it (pure math).

*Baseline model* (``warmup > 0``). The global model always judges a reading on the
training fleet's standardisation. Each device also learns its own normal from its first
``warmup`` readings, in two parts:

* the first three quarters fit a centre, a scale and the correlations of the model inputs
  (the scale floored at a fraction of the channel's level and of the global model's
  scale, so a channel that sat still cannot turn noise into 100σ; the correlations shrunk
  by ``SHRINKAGE`` towards none, so a few hundred readings give a stable inverse);
* the last quarter is held back: its largest deviation (below), scored the way live
  readings are, times the margin (``[baseline] threshold_margin``, by default
  ``THRESHOLD_MARGIN``) and never below ``MIN_THRESHOLD``, becomes the device's threshold.

A reading's deviation is, for each input, how far it is from what the device's *other*
inputs predict for it, in units of that conditional spread (Gaussian regression on the
warm-up's correlations): a pump moving to another duty moves flow, current and pressure
together and stays near zero, while a current that rises alone, or a flow that drops at an
unchanged current, stands out. The device's score is the largest of these.

After warm-up a reading is an anomaly only if the global model **and** the device's baseline
flag it: the global model knows every operating regime of the fleet, the baseline knows
this device's own level, noise and relations. The centre keeps adapting, as an exponential
moving average over ``ADAPT_READINGS`` readings, so slow drift (a warming motor) becomes
normal while a step stays anomalous: an input's centre moves only while that input's
deviation is within the threshold, or while the global model judged the reading normal (a
move to an operating regime the fleet knows). An input that deviates during a fault is
therefore frozen at its pre-fault normal for as long as the fault lasts; the others keep
tracking.

*Faults during warm-up* would otherwise be learnt as normal: they widen the spread and raise
the threshold, and later faults are missed. The global model's verdict on each warm-up
reading is a judge independent of the device (it was trained on the fleet), so the fit
leaves out the readings it flagged, unless it flagged more than ``MAX_FLAGGED_SHARE`` of
the fitting part: then it is evidently not informative for this device (a device unlike
the fleet, flagged throughout), and the fit uses every reading, as before. It also uses
every reading if no more readings than inputs would remain (a singular covariance). The
decision is made once, when the fitting part ends, and holds for the held-back part too:
if the flagged readings were left out of the fit, a flagged held-back reading neither
raises the threshold nor moves the centre (if all are flagged, the threshold is
``MIN_THRESHOLD``). The fitting part keeps two running accumulators, for the readings the
global model judged normal and for those it flagged, merged when every reading is used:
no rows are stored, and a warm-up reading costs one accumulator update, as before. The
device's own deviations are not used to trim the warm-up further: they come from the fit
being made, so trimming by them narrows the spread of every clean device (more false
alarms) while many faulty readings mask themselves. A device unlike the fleet therefore
still learns its warm-up faults.

``daemon.devices`` keeps one baseline per device and applies the rules above to each
reading; this module holds the pieces that need no device: the scale floors, the running
moments of the warm-up and the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daemon.preprocess import MIN_STD
from daemon.windows import Matrix

#: A channel is taken to vary by at least this fraction of its level, so a sensor that sat
#: still (or was quantised to one value) through warm-up does not turn noise into 100σ.
RELATIVE_SCALE_FLOOR = 1e-3
#: ... and by at least this fraction of the global model's spread for that input.
GLOBAL_SCALE_FLOOR = 0.05
#: Share of the warm-up held back to set the threshold.
HELD_BACK = 0.25
#: The threshold is this multiple of the largest deviation seen in the held-back part (the
#: default of ``[baseline] threshold_margin``)...
THRESHOLD_MARGIN = 1.5
#: ... and never below this many standard deviations.
MIN_THRESHOLD = 3.0
#: Weight of the identity in the shrunk correlation matrix.
SHRINKAGE = 0.01
#: If the global model flags more than this share of a device's fitting part, its verdicts
#: are taken to say nothing about the device, and the warm-up learns from every reading.
MAX_FLAGGED_SHARE = 0.5
#: Time constant, in readings, of the adapting centre.
ADAPT_READINGS = 100.0


def global_informative(n_flagged: int, count: int) -> bool:
    """Whether the global model says something about a device whose warm-up it flagged
    ``n_flagged`` of ``count`` readings in: at most ``MAX_FLAGGED_SHARE`` of them."""
    return n_flagged <= MAX_FLAGGED_SHARE * count


def baseline_scale(center: Matrix, std: Matrix, n_raw: int, global_scale: Matrix) -> Matrix:
    """Standard deviations floored at a small fraction of each raw channel's level and of
    the global model's scale."""
    level = np.abs(center[:n_raw])
    floor = np.tile(level, center.shape[0] // n_raw) * RELATIVE_SCALE_FLOOR
    floor = np.maximum(floor, GLOBAL_SCALE_FLOOR * global_scale)
    return np.maximum(std, np.maximum(floor, MIN_STD))


@dataclass(slots=True)
class Moments:
    """Running count, mean and co-moment matrix of rows (Welford); two merge exactly."""

    n: int
    mean: Matrix
    m2: Matrix

    @classmethod
    def of(cls, row: Matrix) -> Moments:
        return cls(1, row.copy(), np.zeros((row.size, row.size)))

    def add(self, row: Matrix) -> None:
        self.n += 1
        delta = row - self.mean
        self.mean += delta / self.n
        self.m2 += np.outer(delta, row - self.mean)

    def merged(self, other: Moments) -> Moments:
        """The moments of both sets of rows together (Chan, Golub and LeVeque)."""
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(
            n,
            self.mean + delta * (other.n / n),
            self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n),
        )


@dataclass(frozen=True, slots=True)
class Fit:
    """A device's fitted baseline: where it is centred, its spreads and its conditional
    deviation matrix, and whether the fit left out the readings the global model flagged."""

    trusts_global: bool
    center: Matrix
    scale: Matrix
    cond: Matrix  # z -> conditional deviations (D, D)


def fit(
    normal: Moments | None,
    flagged: Moments | None,
    count: int,
    n_features: int,
    global_scale: Matrix,
) -> Fit:
    """Fit the baseline from the fitting part's two accumulators (``count`` readings)."""
    n_flagged = 0 if flagged is None else flagged.n
    trusts_global = (
        normal is not None
        and global_informative(n_flagged, count)
        and normal.n > normal.mean.size  # else the covariance would be singular
    )
    if trusts_global or flagged is None:
        moments = normal
    else:
        moments = flagged if normal is None else normal.merged(flagged)
    assert moments is not None  # the fitting part has at least one reading
    mean, cov = moments.mean, moments.m2 / moments.n
    std = np.sqrt(np.maximum(np.diag(cov), 0.0))
    scale = baseline_scale(mean, std, n_features, global_scale)
    corr = cov / np.outer(scale, scale)
    np.fill_diagonal(corr, 1.0)
    precision = np.linalg.inv((1.0 - SHRINKAGE) * corr + SHRINKAGE * np.eye(mean.size))
    # (P z)_j / sqrt(P_jj): input j's distance from its prediction by the others
    cond = precision / np.sqrt(np.diag(precision))[:, None]
    return Fit(trusts_global, mean, scale, cond)
