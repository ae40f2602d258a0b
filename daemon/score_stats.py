"""Score distribution and input drift, accumulated per micro-batch, exposed to Prometheus.

Two views an operator needs before the verdicts go wrong:

* ``anomalyd_score_margin`` (histogram, by detector): each reading's distance from its
  detector's threshold, in units of the spread of normal scores (the ``margin`` of
  ``daemon.calibration``; 0 is the threshold, positive is anomalous). Its quantiles over
  time (``histogram_quantile`` of its rate in PromQL) show a model drifting towards its
  threshold long before the anomaly rate rises.
* ``anomalyd_input_shift_sigma`` (gauge, by model input): how far the recent readings of
  the whole fleet sit from the training data's mean, in training standard deviations: an
  exponential moving average over about ``SHIFT_READINGS`` readings of the inputs'
  z-scores (each clipped to ±``Z_CLIP``, so one absurd reading cannot hold it for hours).
  An input drifting away from 0 means the model is seeing data unlike what it was trained
  on: time to retrain (``anomalyd train``, then ``anomalyd reload``).

Per batch, not per reading: a few numpy operations on the batch's arrays. The scorer
thread adds, the HTTP thread's scrape reads; a lock keeps the two apart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

MARGIN_BUCKETS = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SHIFT_READINGS = 1000.0
Z_CLIP = 50.0
_EDGES = np.array(MARGIN_BUCKETS)


class ScoreStats(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}  # per bucket (the last is +Inf), not cumulative
        self._inputs: tuple[str, ...] = ()
        self._shift: np.ndarray | None = None

    def observe_margins(self, detector: str, margins: np.ndarray) -> None:
        """Add one batch's margins for ``detector``; non-finite ones count as +Inf."""
        finite = np.isfinite(margins)
        # bucket i holds values <= MARGIN_BUCKETS[i] (Prometheus' "le"); the last, the rest
        counts = np.bincount(
            np.searchsorted(_EDGES, margins[finite], side="left"), minlength=_EDGES.size + 1
        )
        counts[-1] += int(margins.size - finite.sum())
        with self._lock:
            if detector in self._counts:
                self._counts[detector] += counts
            else:
                self._counts[detector] = counts

    def observe_inputs(self, names: Sequence[str], zscores: np.ndarray) -> None:
        """Move each input's shift towards this batch's mean z-score (rows, inputs)."""
        n = zscores.shape[0]
        if n == 0:
            return
        mean = np.clip(zscores, -Z_CLIP, Z_CLIP).mean(axis=0)
        weight = 1.0 - (1.0 - 1.0 / SHIFT_READINGS) ** n
        with self._lock:
            if self._shift is None or tuple(names) != self._inputs:  # first batch, new model
                self._inputs, self._shift = tuple(names), mean
            else:
                self._shift = self._shift + weight * (mean - self._shift)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = {k: v.copy() for k, v in self._counts.items()}
            inputs, shift = self._inputs, None if self._shift is None else self._shift.copy()
        margin = HistogramMetricFamily(
            "anomalyd_score_margin",
            "Readings' distance from their detector's threshold, in spreads of normal scores "
            "(0 = the threshold, above = anomalous)",
            labels=["detector"],
        )
        for detector, c in sorted(counts.items()):
            cumulative = np.cumsum(c).tolist()
            finite = zip(MARGIN_BUCKETS, cumulative[:-1], strict=True)
            buckets = [(repr(le), float(n)) for le, n in finite]  # "-4.0": as client_python
            buckets.append(("+Inf", float(cumulative[-1])))
            # no _sum (nor _count: the +Inf bucket is the count): OpenMetrics has none for
            # a histogram with negative buckets
            margin.add_metric([detector], buckets, None)
        yield margin
        drift = GaugeMetricFamily(
            "anomalyd_input_shift_sigma",
            f"Moving mean (about {SHIFT_READINGS:g} readings, all devices) of each model "
            "input's z-score against the training data",
            labels=["input"],
        )
        if shift is not None:
            for name, value in zip(inputs, shift.tolist(), strict=True):
                drift.add_metric([name], value)
        yield drift
