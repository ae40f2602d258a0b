"""The score-margin histogram and the input-shift gauges, alone and through the pipeline."""

from __future__ import annotations

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import AlertConfig, TopicsConfig
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.score_stats import SHIFT_READINGS, Z_CLIP, ScoreStats
from tests.conftest_models import NORMAL_READING


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_margins_land_in_prometheus_buckets_and_non_finite_ones_in_inf() -> None:
    registry = CollectorRegistry()
    stats = ScoreStats()
    registry.register(stats)
    stats.observe_margins("lof", np.array([-5.0, -1.0, 0.0, 0.3]))
    stats.observe_margins("lof", np.array([3.0, np.inf, np.nan]))
    got = samples(registry)

    def bucket(le: str) -> float:
        return got[("anomalyd_score_margin_bucket", (("detector", "lof"), ("le", le)))]

    # "le": a value equal to a bound counts in that bound's bucket
    assert [bucket(le) for le in ("-4.0", "-1.0", "-0.5", "0.0", "0.5", "2.0", "4.0")] == [
        1, 2, 2, 3, 4, 4, 5,
    ]
    assert bucket("+Inf") == 7  # the count (no _count/_sum with negative buckets)


def test_input_shift_follows_the_recent_readings_and_clips_absurd_values() -> None:
    registry = CollectorRegistry()
    stats = ScoreStats()
    registry.register(stats)
    stats.observe_inputs(["a", "b"], np.zeros((1, 2)))
    # 5 time constants of readings 2σ high in "a": the moving mean is within 1 % of 2
    for _ in range(50):
        stats.observe_inputs(["a", "b"], np.tile([2.0, 0.0], (int(SHIFT_READINGS) // 10, 1)))
    got = samples(registry)
    a = got[("anomalyd_input_shift_sigma", (("input", "a"),))]
    assert 1.98 < a < 2.0
    assert got[("anomalyd_input_shift_sigma", (("input", "b"),))] == 0.0
    # a model with other inputs starts afresh; one absurd reading counts as Z_CLIP
    stats.observe_inputs(["c"], np.array([[1e12]]))
    got = samples(registry)
    assert got[("anomalyd_input_shift_sigma", (("input", "c"),))] == Z_CLIP
    assert ("anomalyd_input_shift_sigma", (("input", "a"),)) not in got


def test_a_drifting_input_shows_in_the_daemons_metrics(model_bundle: ModelBundle) -> None:
    """Readings with one feature 3 training σ high: its shift gauge says so, the others
    stay near 0, and every scored reading is in the margin histogram."""
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    pipeline = Pipeline(model_bundle, decoder, TopicsConfig(), AlertConfig())
    metrics = Metrics(CollectorRegistry())
    feature = model_bundle.features[0]
    i = model_bundle.model_features.index(feature)  # window 1: the raw feature is an input
    rng = np.random.default_rng(0)
    n = 0
    for _ in range(20):
        msgs = []
        for _ in range(250):
            r = {k: v + 0.05 * float(model_bundle.std[j]) * float(rng.normal())
                 for j, (k, v) in enumerate(NORMAL_READING.items())}
            r[feature] += 3.0 * float(model_bundle.std[i])
            msgs.append(RawMessage("sensors/drift-1/readings", orjson.dumps(r), 0.0))
        _, stats = pipeline.process(msgs, 0.0)
        metrics.record_batch(stats)
        n += stats.readings
    got = samples(metrics.registry)
    base = {k: float(model_bundle.mean[j]) for j, k in enumerate(model_bundle.model_features)}
    normal_z = {k: (v - base[k]) / float(model_bundle.std[j])
                for j, (k, v) in enumerate(NORMAL_READING.items())}
    shift = {k: got[("anomalyd_input_shift_sigma", (("input", k),))] for k in base}
    # the drifting input moved by ~3σ from where the normal reading sits; the others did not
    assert abs(shift[feature] - normal_z[feature] - 3.0) < 0.2, shift
    for k in base:
        if k != feature:
            assert abs(shift[k] - normal_z[k]) < 0.2, (k, shift)
    detector = pipeline.default_detector
    count = got[("anomalyd_score_margin_bucket", (("detector", detector), ("le", "+Inf")))]
    assert count == n == 5000
