"""Shadow scoring: a candidate model set judges the same readings as the serving one, and
only the comparison is kept.

Before swapping in a retrained model set (``anomalyd reload``), an operator can point
``model.shadow_dir`` at it: each reading is then also scored by the candidate's default
detector, on the same model inputs (the device's window), and its verdict is combined with
the device's baseline exactly as the serving one is (after warm-up a reading is an anomaly
only if the baseline agrees). Nothing of the candidate is published: its verdicts are
counted against the serving ones (both anomalous, only the serving one, only the candidate,
neither), and the last few disagreements are kept, for ``GET /models`` and the metrics.
The baseline keeps learning from the serving model's verdicts only.

The candidate must read the same features through the same window (the per-device windows
are shared); ``incompatibility`` says why not. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.models import ModelBundle

#: How many of the latest disagreements ``ShadowTally`` keeps for an operator to look at.
KEPT_DISAGREEMENTS = 20


def incompatibility(serving: ModelBundle, candidate: ModelBundle) -> str | None:
    """Why ``candidate`` cannot shadow ``serving`` (None if it can)."""
    if candidate.features != serving.features:
        return (f"it reads features {list(candidate.features)}, the serving model set "
                f"{list(serving.features)}")
    if candidate.window != serving.window:
        return (f"its feature window is {candidate.window} readings, the serving model "
                f"set's {serving.window}")
    return None


@dataclass(slots=True)
class ShadowTally:
    """The candidate's verdicts against the serving ones since it was loaded."""

    version: str
    detector: str
    both: int = 0  # anomalous for both
    serving_only: int = 0
    candidate_only: int = 0
    neither: int = 0
    #: the latest disagreements: device, key, serving and candidate verdict and score. A
    #: tuple replaced whole, so ``describe`` may run on another thread (``GET /models``)
    #: while the scorer adds one.
    disagreements: tuple[dict[str, Any], ...] = ()

    def add(self, serving: bool, candidate: bool) -> None:
        if serving:
            if candidate:
                self.both += 1
            else:
                self.serving_only += 1
        elif candidate:
            self.candidate_only += 1
        else:
            self.neither += 1

    def disagree(self, what: dict[str, Any]) -> None:
        self.disagreements = (*self.disagreements[1 - KEPT_DISAGREEMENTS :], what)

    def describe(self) -> dict[str, Any]:
        compared = self.both + self.serving_only + self.candidate_only + self.neither
        agree = self.both + self.neither
        return {
            "version": self.version,
            "detector": self.detector,
            "compared": compared,
            "agreement": agree / compared if compared else None,
            "anomalous_for_both": self.both,
            "anomalous_for_serving_only": self.serving_only,
            "anomalous_for_candidate_only": self.candidate_only,
            "latest_disagreements": list(self.disagreements),
        }
