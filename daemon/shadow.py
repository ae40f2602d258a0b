"""Shadow scoring: a candidate model set judges the same readings as the serving one, and
only the comparison is kept.

Before swapping in a retrained model set (``anomalyd reload``), an operator can point
``model.shadow_dir`` at it: each reading is then also scored by the candidate's default
detector, on the same model inputs (the device's window), and its verdict is combined with
the device's baseline exactly as the serving one is (after warm-up a reading is an anomaly
only if the baseline agrees). Nothing of the candidate is published: its verdicts are
counted against the serving ones (both anomalous, only the serving one, only the candidate,
neither; verdicts on a partial window, which feed no alert, are not compared), and the
last few disagreements are kept, for ``GET /models`` and the metrics.
The baseline keeps learning from the serving model's verdicts only.

The candidate must read the same features through the same window (the per-device windows
are shared); ``incompatibility`` says why not, and ``daemon.pipeline.Pipeline`` refuses it
with ``ShadowMismatchError``. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from daemon.errors import ModelLoadError

if TYPE_CHECKING:
    from daemon.models import ModelBundle

#: How many of the latest disagreements ``ShadowTally`` keeps for an operator to look at.
KEPT_DISAGREEMENTS = 20


class ShadowMismatchError(ModelLoadError, ValueError):
    """The candidate cannot shadow the serving model set (the message says why)."""


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
    #: readings by (serving verdict, candidate verdict), is_anomaly each
    counts: dict[tuple[bool, bool], int] = field(default_factory=dict)
    #: the latest disagreements: device, key, serving and candidate verdict and score. A
    #: tuple replaced whole, so ``describe`` may run on another thread (``GET /models``)
    #: while the scorer adds one.
    disagreements: tuple[dict[str, Any], ...] = ()

    def add(self, counts: dict[tuple[bool, bool], int]) -> None:
        """Add one batch's counts (``BatchStats.shadow``)."""
        for verdicts, n in counts.items():
            self.counts[verdicts] = self.counts.get(verdicts, 0) + n

    def disagree(self, what: dict[str, Any]) -> None:
        self.disagreements = (*self.disagreements[1 - KEPT_DISAGREEMENTS :], what)

    def describe(self) -> dict[str, Any]:
        n = dict(self.counts)  # a copy: the scorer may add to it meanwhile
        compared = sum(n.values())
        agree = n.get((True, True), 0) + n.get((False, False), 0)
        return {
            "version": self.version,
            "detector": self.detector,
            "compared": compared,
            "agreement": agree / compared if compared else None,
            "anomalous_for_both": n.get((True, True), 0),
            "anomalous_for_serving_only": n.get((True, False), 0),
            "anomalous_for_candidate_only": n.get((False, True), 0),
            "latest_disagreements": list(self.disagreements),
        }
