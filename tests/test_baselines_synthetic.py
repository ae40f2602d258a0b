"""Per-device baselines through the whole pipeline on synthetic pumps that move between
operating regimes: few false alarms after warm-up, and faults still found."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from daemon.config import AlertConfig, TopicsConfig
from daemon.devices import DeviceTracker
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.training.synthetic import PumpStream
from daemon.windows import windowed_matrix

WARMUP = 300
READINGS = 1500


def stream(
    bundle: ModelBundle, x: np.ndarray, warmup: int, device: str = "pump"
) -> np.ndarray:
    """Verdicts (is_anomaly) for one device's readings sent in batches of 100."""
    return stream_with_alerts(bundle, x, warmup, device)[0]


def stream_with_alerts(
    bundle: ModelBundle, x: np.ndarray, warmup: int, device: str = "pump"
) -> tuple[np.ndarray, list[int]]:
    """Verdicts (is_anomaly), and the readings at which the device's alert was raised."""
    decoder = Decoder(bundle.features, bundle.detector_names, subscription="s/+")
    pipeline = Pipeline(bundle, decoder, TopicsConfig(), AlertConfig(), warmup=warmup)
    flags: list[bool] = []
    raised: list[int] = []
    for start in range(0, len(x), 100):
        msgs = [
            RawMessage(f"s/{device}", orjson.dumps(dict(zip(bundle.features, r, strict=True))), 0.0)
            for r in x[start : start + 100].tolist()
        ]
        outputs, _ = pipeline.process(msgs, 0.0)
        for o in (o for outs in outputs for o in outs):
            if o.kind == "verdict":
                flags.append(orjson.loads(o.payload)["is_anomaly"])
            elif o.kind == "alert" and orjson.loads(o.payload)["state"] == "raised":
                raised.append(len(flags) - 1)  # the verdict before it caused it
    return np.array(flags), raised


def pump(
    seed: int, fault_rate: float, bundle: ModelBundle, faults_from: int = WARMUP
) -> tuple[np.ndarray, np.ndarray]:
    """One pump's readings and fault labels; faults start at reading ``faults_from`` (by
    default only after the warm-up)."""
    s = PumpStream(f"pump-{seed}", seed=seed, fault_rate=0.0)
    rows, faults = [], []
    for i in range(READINGS):
        if i == faults_from:
            s.fault_rate = fault_rate
        r, _, f = s.next()
        rows.append([r[k] for k in bundle.features])
        faults.append(f is not None)
    return np.array(rows), np.array(faults)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fault_free_pumps_changing_regime_raise_few_false_alarms_after_warm_up(
    model_bundle: ModelBundle, seed: int
) -> None:
    # Measured: 0.0-0.4 % (a frozen warm-up baseline flagged 19-97 % of these readings).
    x, _ = pump(seed, 0.0, model_bundle)
    flags = stream(model_bundle, x, WARMUP)
    assert flags[WARMUP:].mean() <= 0.02


def test_injected_pump_faults_are_still_found_with_baselines_on(
    model_bundle: ModelBundle,
) -> None:
    # A reading is flagged only if its own baseline agrees with the global model, so recall
    # can only fall; measured in the docs (docs/evaluation.md, synthetic pumps).
    found, normal_flags = [], []
    for seed in range(3):
        x, faults = pump(seed, 0.01, model_bundle)
        flags = stream(model_bundle, x, WARMUP)[WARMUP:]
        faults = faults[WARMUP:]
        found.append(flags[faults])
        normal_flags.append(flags[~faults])
    assert np.concatenate(found).mean() >= 0.3
    assert np.concatenate(normal_flags).mean() <= 0.02


def test_a_device_unlike_the_fleet_that_drifts_is_judged_against_its_own_normal(
    model_bundle: ModelBundle,
) -> None:
    """A pump whose temperature sensor reads 8 degrees high and drifts by 6 more over the
    run: the global model flags it throughout; its baseline accepts it, yet a flow drop of
    a third (a closing valve) is found. (After the fault this device stays flagged: the
    global model cannot vouch for its regime changes while it was frozen; see the docs.)"""
    x, _ = pump(5, 0.0, model_bundle)
    t = model_bundle.features.index("temperature")
    f = model_bundle.features.index("flow_rate")
    x[:, t] += 8.0 + np.linspace(0.0, 6.0, len(x))
    fault = slice(1100, 1300)
    x[fault, f] *= 0.67
    without, paged_without = stream_with_alerts(model_bundle, x, 0)
    with_baseline, paged = stream_with_alerts(model_bundle, x, WARMUP)
    before = slice(WARMUP, fault.start)
    assert without[before].mean() >= 0.5  # what baselines are for
    assert with_baseline[before].mean() <= 0.05
    assert with_baseline[fault].mean() >= 0.8
    # Its warm-up verdicts are the global model's (flagged: it is unlike the fleet), but
    # they page no one: the global model flagged more than half of the warm-up so far. The
    # only alert is the fault's.
    assert with_baseline[:WARMUP].mean() >= 0.5
    assert paged_without and paged_without[0] < 10
    assert len(paged) == 1 and fault.start <= paged[0] < fault.start + 20, paged


def verdicts_with_warm_up_verdicts_hidden(
    bundle: ModelBundle, x: np.ndarray, hidden: bool
) -> np.ndarray:
    """The pipeline's verdicts, computed with the tracker directly; with ``hidden`` the
    baseline is told every warm-up reading was normal, so it learns every one (the
    behaviour before warm-up readings were left out)."""
    detector = bundle.default_detector
    global_flags = bundle.score(windowed_matrix(x, bundle.window), detector).is_anomaly
    t = DeviceTracker(len(bundle.features), bundle.window, WARMUP, bundle.mean, bundle.std)
    out = []
    for i, (r, g) in enumerate(zip(x.tolist(), global_flags.tolist(), strict=True)):
        a = t.assess("pump", t.observe("pump", r), g and not (hidden and i < WARMUP))
        out.append(g and a.is_anomaly if a.active else g)
    return np.array(out)


def test_faults_during_warm_up_are_not_learnt_as_normal(model_bundle: ModelBundle) -> None:
    """Pumps faulty from their first reading (about a quarter of the warm-up): the warm-up
    leaves out what the global model flags, so later faults are still found; a warm-up
    that learns every reading misses clearly more of them."""
    found, found_learning_all, normal_flags = [], [], []
    for seed in range(3):
        x, faults = pump(seed, 0.01, model_bundle, faults_from=0)
        assert faults[:WARMUP].mean() >= 0.1  # the scenario: faults during the warm-up
        flags, paged = stream_with_alerts(model_bundle, x, WARMUP)
        # the global model is informative for these pumps: warm-up faults still page
        assert any(i < WARMUP for i in paged), (seed, paged)
        # the direct computation is the pipeline's, so the comparison below is fair
        assert np.array_equal(verdicts_with_warm_up_verdicts_hidden(model_bundle, x, False), flags)
        learning_all = verdicts_with_warm_up_verdicts_hidden(model_bundle, x, True)
        faults = faults[WARMUP:]
        found.append(flags[WARMUP:][faults])
        found_learning_all.append(learning_all[WARMUP:][faults])
        normal_flags.append(flags[WARMUP:][~faults])
    # Measured: 100 % found, against 23 % (3-64 % per pump) when the warm-up learns every
    # reading; normal readings flagged 0.2 %.
    recall = np.concatenate(found).mean()
    assert recall >= 0.9
    assert recall >= np.concatenate(found_learning_all).mean() + 0.3
    assert np.concatenate(normal_flags).mean() <= 0.02
