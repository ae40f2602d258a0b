"""Shadow scoring: a candidate model set judges the same readings, only compared; nothing
published changes. Candidates are trained by the real training code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from daemon.config import AlertConfig, HttpConfig, ModelConfig, Settings, TopicsConfig
from daemon.errors import ModelLoadError
from daemon.metrics import Metrics
from daemon.models import ModelBundle, load_bundle
from daemon.pipeline import BatchStats, Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.reload import build_scoring
from daemon.training.synthetic import PumpStream
from daemon.training.train import train, train_default
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import FIXTURE_ROWS
from tests.test_cli import anomalyd
from tests.test_device_control import request

TOKEN = "tok-shadow"


@pytest.fixture(scope="module")
def candidate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A retrained set with a far looser threshold (the median of held-back normal scores
    instead of their 0.99 quantile): it flags many normal readings the serving one does
    not (measured: 17 % of a synthetic pump's)."""
    out = tmp_path_factory.mktemp("candidate") / "models"
    train_default(out, rows=FIXTURE_ROWS, seed=1, quantile=0.5,
                  detectors=("isolation_forest",))
    return out


def readings(n: int) -> list[dict[str, Any]]:
    """A synthetic pump moving between operating states (no faults), every 10th reading
    replaced by ANOMALOUS."""
    pump = PumpStream("p", seed=3, fault_rate=0.0)
    return [ANOMALOUS if i % 10 == 9 else pump.next()[0] for i in range(n)]


def run(bundle: ModelBundle, shadow: ModelBundle | None, rows: list[dict[str, Any]],
        warmup: int = 0) -> tuple[Pipeline, list[bytes], BatchStats]:
    decoder = Decoder(bundle.features, bundle.detector_names)
    pipeline = Pipeline(bundle, decoder, TopicsConfig(), AlertConfig(), warmup=warmup,
                        shadow=shadow)
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps({**r, "seq": i}), 0.0)
            for i, r in enumerate(rows)]
    outputs, stats = pipeline.process(msgs, 1000.0)
    return pipeline, [o.payload for outs in outputs for o in outs], stats


@pytest.mark.parametrize("warmup", [0, 20])
def test_a_shadow_changes_nothing_published_and_counts_its_disagreements(
    model_bundle: ModelBundle, candidate_dir: Path, warmup: int
) -> None:
    rows = readings(200)
    candidate = load_bundle(candidate_dir)
    _, alone, _ = run(model_bundle, None, rows, warmup)
    pipeline, shadowed, stats = run(model_bundle, candidate, rows, warmup)
    assert shadowed == alone  # every verdict and alert, byte for byte
    tally = pipeline.shadow_tally
    assert tally is not None
    seen = tally.describe()
    assert seen["version"] == candidate.version and seen["compared"] == 200
    serving = [orjson.loads(p) for p in alone if b'"is_anomaly"' in p]
    n_serving = sum(v["is_anomaly"] for v in serving)
    assert seen["anomalous_for_both"] + seen["anomalous_for_serving_only"] == n_serving
    # The looser candidate flags every ANOMALOUS reading and some normal ones besides.
    assert seen["anomalous_for_both"] >= 18 and seen["anomalous_for_candidate_only"] > 0
    assert seen["agreement"] == pytest.approx(
        (seen["anomalous_for_both"] + tally.counts.get((False, False), 0)) / 200)
    latest = seen["latest_disagreements"]
    assert 0 < len(latest) <= 20
    assert all(d["serving"]["is_anomaly"] != d["candidate"]["is_anomaly"] for d in latest)
    assert latest[-1]["device_id"] == "p-1" and latest[-1]["key"].startswith("p-1:")
    metrics = Metrics(CollectorRegistry())
    metrics.record_batch(stats)
    got = metrics.registry.get_sample_value(
        "anomalyd_shadow_verdicts_total", {"serving": "normal", "candidate": "anomaly"})
    assert got == seen["anomalous_for_candidate_only"]


def test_the_serving_set_as_its_own_shadow_agrees_everywhere(model_bundle: ModelBundle) -> None:
    pipeline, _, _ = run(model_bundle, model_bundle, readings(100))
    assert pipeline.shadow_tally is not None
    seen = pipeline.shadow_tally.describe()
    assert seen["agreement"] == 1.0 and seen["latest_disagreements"] == []
    assert seen["anomalous_for_both"] >= 10  # the ANOMALOUS readings


def test_a_candidate_reading_other_features_is_refused(
    model_bundle: ModelBundle, trained_model_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    x = np.random.default_rng(0).normal(size=(300, 2))
    train(x, ("Bearing Temp", "Flow"), other, source="test", detectors=("isolation_forest",))
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    with pytest.raises(ValueError, match=r"reads features \['Bearing Temp', 'Flow'\]"):
        Pipeline(model_bundle, decoder, TopicsConfig(), AlertConfig(),
                 shadow=load_bundle(other))
    settings = Settings(model=ModelConfig(shadow_dir=other))
    with pytest.raises(ModelLoadError, match="cannot shadow the serving one: it reads.*"
                       r"Point model\.shadow_dir \(MODEL_SHADOW_DIR\) at a candidate"):
        build_scoring(settings, model_bundle, "sensors/+/readings", None)
    res = anomalyd("check-config", env={"MODEL_SHADOW_DIR": str(other),
                                        "MODEL_DIR": str(trained_model_dir)})
    assert res.returncode == 0 and f'"shadow_dir": "{other}"' in res.stdout
    res = anomalyd("run", env={"MODEL_DIR": str(trained_model_dir), "MODEL_SHADOW_DIR":
                               str(other), "STATE_DIR": str(tmp_path / "state")})
    assert res.returncode == 2, res.stderr
    assert "cannot shadow the serving one: it reads features ['Bearing Temp', 'Flow']" in (
        res.stderr
    )
    assert "anomalyd train" not in res.stderr  # no hint that does not apply


@pytest.mark.integration
def test_the_daemon_shows_its_shadow_in_models_and_metrics_and_reload_keeps_it(
    broker: Broker,
    trained_model_dir: Path,
    candidate_dir: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    settings = make_settings(broker, trained_model_dir).model_copy(update={
        "model": ModelConfig(dir=trained_model_dir, shadow_dir=candidate_dir),
        "http": HttpConfig(port=0, token=SecretStr(TOKEN)),
    })
    dev = "shadow-pump-1"
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    svc = start_daemon(settings=settings)
    pub = publisher_for(broker)
    for i, r in enumerate(readings(20)):
        pub.send(f"sensors/{dev}/readings", {**r, "seq": i})
    verdicts = col.json_on(f"anomaly/{dev}/verdict", count=20)
    assert all("shadow" not in v for v in verdicts)  # nothing of it is published
    port = svc.http.port
    status, models, _ = request(port, "GET", "/models", TOKEN)
    assert status == 200 and models["shadow"]["compared"] == 20
    assert models["shadow"]["version"] == load_bundle(candidate_dir).version
    _, text, _ = request(port, "GET", "/metrics", TOKEN)
    assert "anomalyd_shadow_verdicts_total" in text
    assert "anomalyd_shadow_scoring_seconds_total" in text
    status, done, _ = request(port, "POST", "/models/reload", TOKEN)
    assert status == 200 and done["shadow_version"] == models["shadow"]["version"]
    status, models, _ = request(port, "GET", "/models", TOKEN)
    assert models["shadow"]["compared"] == 0  # a reload loads the candidate afresh


def test_verdicts_on_a_partial_window_are_not_compared(tmp_path: Path) -> None:
    """With windowed model sets a new device's first readings are judged on a partial
    window (they feed no alert): they are left out of the comparison."""
    from daemon.training.synthetic import FEATURES, generate_dataset

    x, _, _ = generate_dataset(2000, 4, fault_fraction=0.0)
    for name, quantile in (("serving", 0.99), ("candidate", 0.5)):
        train(x, FEATURES, tmp_path / name, source="test", window=5, quantile=quantile,
              detectors=["isolation_forest"])
    serving, candidate = load_bundle(tmp_path / "serving"), load_bundle(tmp_path / "candidate")
    pipeline, out, _ = run(serving, candidate, readings(30))
    filling = [v for v in map(orjson.loads, out) if v.get("window_filling")]
    assert len(filling) == 4  # the window of 5 is full from the fifth reading on
    assert pipeline.shadow_tally is not None
    assert pipeline.shadow_tally.describe()["compared"] == 30 - 4
