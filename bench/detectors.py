"""Scoring time per batch for each detector, through ``ModelBundle.score``.

For comparison, scikit-learn's own ``IsolationForest.score_samples`` (100 trees, 256
samples, fitted here on the same kind of data) and the flattened forest alone; LOF, fitted
here, when the model set does not hold it (the default ensemble leaves it out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (1, 10, 100, 1000, 10000)


def timed(fn: Callable[[], Any], budget: float) -> float:
    """Median wall time of fn() in ms, repeated for about ``budget`` seconds (3 to 200 times)."""
    fn()
    times = []
    end = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    from sklearn.ensemble import IsolationForest

    from daemon.models import load_bundle
    from daemon.training.synthetic import FEATURES, PumpStream

    bundle = load_bundle(args.models)
    stream = PumpStream("bench", seed=1, fault_rate=0.0)
    rows = np.array([[v[f] for f in FEATURES] for v, _, _ in
                     (stream.next() for _ in range(max(SIZES)))], dtype=np.float64)
    budget = 0.2 if args.quick else 0.6
    ms: dict[str, list[float]] = {}
    for name in bundle.detector_names:
        ms[f"ModelBundle.score({name})"] = [
            timed(lambda n=n, name=name: bundle.score(rows[:n], name), budget) for n in SIZES
        ]
    z = (rows - bundle.mean) / bundle.std
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=0).fit(z)
    ms["sklearn IsolationForest.score_samples"] = [
        timed(lambda n=n: forest.score_samples(z[:n]), budget) for n in SIZES
    ]
    flat = bundle._members["isolation_forest"]  # the detector alone, no scaling/calibration
    ms["flattened forest .score alone"] = [
        timed(lambda n=n: flat.score(z[:n]), budget) for n in SIZES
    ]
    if "lof" not in bundle.detector_names:
        # Not in the default ensemble any more: fitted here the way training fits it, so
        # every detector anomalyd offers is still measured.
        from daemon.detectors import LofDetector

        lof = LofDetector(seed=0)
        lof.fit(z)
        ms["LOF .score alone (fitted here; not in this model set)"] = [
            timed(lambda n=n: lof.score(z[:n]), budget) for n in SIZES
        ]
    args.out.write_text(json.dumps({"sizes": list(SIZES), "ms": ms}, indent=1))


if __name__ == "__main__":
    main()
