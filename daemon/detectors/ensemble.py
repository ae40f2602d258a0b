"""Fusion of calibrated member detectors into one score.

Each member's score is put on a common scale with its own calibration: the median normal
score maps to 0 and the member's threshold to 1. The ensemble score is the mean of those,
and is itself calibrated on held-back normal data like any member.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from daemon.calibration import Calibration
from daemon.detectors.base import Detector, Matrix, Vector


class Ensemble:
    name = "ensemble"

    def __init__(self, members: Mapping[str, tuple[Detector, Calibration]]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = dict(members)
        # precomputed so combine() is two vector operations per member
        self._offsets = {k: cal.center for k, (_, cal) in self.members.items()}
        self._scales = {
            k: max(cal.threshold - cal.center, cal.spread) for k, (_, cal) in self.members.items()
        }

    def member_scores(self, x: Matrix) -> dict[str, Vector]:
        return {name: det.score(x) for name, (det, _) in self.members.items()}

    def combine(self, member_scores: Mapping[str, Vector]) -> Vector:
        total = np.zeros_like(next(iter(member_scores.values())), dtype=np.float64)
        for name in self.members:
            total += (member_scores[name] - self._offsets[name]) / self._scales[name]
        return total / len(self.members)

    def score(self, x: Matrix) -> tuple[Vector, dict[str, Vector]]:
        """Ensemble scores and each member's raw scores."""
        members = self.member_scores(x)
        return self.combine(members), members
