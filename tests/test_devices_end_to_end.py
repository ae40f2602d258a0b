"""Per-device state through a real Mosquitto: a SKAB-like schema (names with spaces and
capitals), windowed features, warm-up that survives a restart, retained alert states, and
``anomalyd score`` giving the daemon's verdicts for the same stream."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog

from daemon import service
from daemon.config import BaselineConfig, Settings
from daemon.models import load_bundle
from daemon.offline import score_file
from daemon.service import Service
from daemon.training.train import train
from tests.broker import Broker
from tests.conftest import make_settings
from tests.test_end_to_end import http_get, metric

pytestmark = pytest.mark.integration

FEATURES = ("Volume Flow RateRMS", "Current", "Temperature")
LEVEL = np.array([32.0, 1.0, 70.0])
SIGMA = np.array([0.4, 0.05, 0.3])
WARMUP = 20


def rows(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    x = LEVEL + np.random.default_rng(seed).normal(size=(n, 3)) * SIGMA
    x[:, 0] += shift * SIGMA[0]
    return x


def payload(x: np.ndarray, seq: int) -> dict[str, Any]:
    return {**dict(zip(FEATURES, x.tolist(), strict=True)), "seq": seq}


@pytest.fixture(scope="module")
def skab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("skab-model") / "m"
    train(rows(1500, seed=1), FEATURES, out, source="test", window=5)
    return out


@pytest.fixture
def start_skab(skab_model: Path, start_daemon: Any) -> Callable[[Settings], Service]:
    """In-process daemons serving the SKAB-like model; shut down at teardown."""
    bundle = load_bundle(skab_model)
    return lambda settings: start_daemon(settings=settings, model=bundle)


@pytest.fixture
def settings(broker: Broker, skab_model: Path) -> Settings:
    s = make_settings(broker, skab_model)
    return s.model_copy(update={"baseline": BaselineConfig(warmup_readings=WARMUP)})


def test_warm_up_survives_a_restart_and_alerts_are_retained_states(
    broker: Broker,
    settings: Settings,
    start_skab: Callable[[Settings], Service],
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "skab-pump-1"
    col = collector_for(broker, [f"anomaly/{dev}/#"])
    pub = publisher_for(broker)
    first = start_skab(settings)
    for i, x in enumerate(rows(WARMUP, seed=2)):
        pub.send(f"sensors/{dev}/readings", payload(x, i))
    warm = col.json_on(f"anomaly/{dev}/verdict", count=WARMUP)
    assert all(v["warming_up"] for v in warm)
    assert first.shutdown() is True
    assert (settings.state.dir / "devices.json").is_file()

    start_skab(settings)  # a new process would read the same file
    pub.send(f"sensors/{dev}/readings", payload(rows(1, seed=3)[0], WARMUP))
    (after,) = col.json_on(f"anomaly/{dev}/verdict", count=WARMUP + 1)[WARMUP:]
    assert after["seq"] == WARMUP and after["warming_up"] is False  # not repeated

    for i, x in enumerate(rows(5, seed=4, shift=-8.0)):  # the flow drops
        pub.send(f"sensors/{dev}/readings", payload(x, 100 + i))
    (raised,) = col.json_on(f"anomaly/{dev}/alert", count=1)
    assert raised["state"] == "raised" and raised["active"] is True
    assert raised["seq"] == 102  # the third anomalous verdict of the last five
    # the flow sensor leads the explanation: its window mean (low) and its window spread
    # (the drop inside the window) are the two largest deviations, in either order
    flow = {c["feature"]: c["direction"] for c in raised["contributions"][:2]}
    assert flow == {"Volume Flow RateRMS [mean 5]": "low", "Volume Flow RateRMS [std 5]": "high"}

    late = collector_for(broker, [f"anomaly/{dev}/alert"])  # subscribes after the fact
    (retained,) = late.json_on(f"anomaly/{dev}/alert", count=1)
    assert retained["state"] == "raised" and late.messages[0][2] is True

    for i, x in enumerate(rows(20, seed=5)):
        pub.send(f"sensors/{dev}/readings", payload(x, 200 + i))
    states = [a["state"] for a in col.json_on(f"anomaly/{dev}/alert", count=2)]
    assert states[-1] == "resolved"
    assert "raised" not in states[1:]  # no repeats while it held


def test_a_restart_with_another_warm_up_length_keeps_the_fitted_baseline_and_repeats(
    broker: Broker,
    settings: Settings,
    start_skab: Callable[[Settings], Service],
    collector_for: Any,
    publisher_for: Any,
) -> None:
    """The plant engineer shortens warmup_readings: the device warmed up under the old
    length keeps its baseline (verdicts right after the restart are not ``warming_up``)
    and its seq window (a redelivery is a repeat), and the log says what was kept."""
    dev = "skab-pump-2"
    verdicts = f"anomaly/{dev}/verdict"
    col = collector_for(broker, [verdicts])
    pub = publisher_for(broker)
    first = start_skab(settings)
    for i, x in enumerate(rows(WARMUP + 1, seed=2)):
        pub.send(f"sensors/{dev}/readings", payload(x, i))
    assert col.json_on(verdicts, count=WARMUP + 1)[-1]["warming_up"] is False
    assert first.shutdown() is True

    shorter = BaselineConfig(warmup_readings=WARMUP // 2)
    with structlog.testing.capture_logs() as logs:
        start_skab(settings.model_copy(update={"baseline": shorter}))
    (changed,) = [e for e in logs if e["event"] == "state_warmup_changed"]
    assert changed["log_level"] == "info"
    assert (changed["saved_warmup_readings"], changed["warmup_readings"]) == (WARMUP, WARMUP // 2)
    assert (changed["baselines_kept"], changed["warmups_restarted"]) == (1, 0)
    assert not [e for e in logs if e["event"] == "state_partly_discarded"]
    (restored,) = [e for e in logs if e["event"] == "state_restored"]
    assert restored["devices"] == 1
    pub.send(f"sensors/{dev}/readings", payload(rows(1, seed=2)[0], 0))  # redelivered
    pub.send(f"sensors/{dev}/readings", payload(rows(1, seed=3)[0], WARMUP + 1))
    after = col.json_on(verdicts, count=WARMUP + 3)[WARMUP + 1 :]
    assert [(v["seq"], v.get("repeat", False), v["warming_up"]) for v in after] == [
        (0, True, False), (WARMUP + 1, False, False)]


def test_offline_score_gives_the_daemons_verdicts_for_the_same_stream(
    broker: Broker,
    settings: Settings,
    start_skab: Callable[[Settings], Service],
    collector_for: Any,
    publisher_for: Any,
    skab_model: Path,
    tmp_path: Path,
) -> None:
    dev = "skab-cmp"
    x = np.vstack([rows(40, seed=6), rows(8, seed=7, shift=-5.0), rows(12, seed=8)])
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    start_skab(settings)
    pub = publisher_for(broker)
    for i, r in enumerate(x):
        pub.send(f"sensors/{dev}/readings", payload(r, i))
    live = {v["seq"]: v for v in col.json_on(f"anomaly/{dev}/verdict", count=len(x))}

    csv = tmp_path / "stream.csv"
    lines = ["seq;" + ";".join(FEATURES)]
    lines += [f"{i};" + ";".join(repr(v) for v in r) for i, r in enumerate(x.tolist())]
    csv.write_text("\n".join(lines) + "\n")
    out = io.BytesIO()
    score_file(csv, out, settings, load_bundle(skab_model), device=dev, detector=None)
    offline = {v["seq"]: v for v in map(orjson.loads, out.getvalue().splitlines())}

    assert sorted(offline) == sorted(live) == list(range(len(x)))
    keys = ("is_anomaly", "warming_up", "explanation")
    assert [[offline[s][k] for k in keys] for s in offline] == [
        [live[s][k] for k in keys] for s in offline
    ]
    # Scores agree to rounding: matrix products over batches of other sizes may differ in
    # the last bit (BLAS), which is why the verdicts, not the bits, are the contract.
    for s in offline:
        assert offline[s]["anomaly_score"] == pytest.approx(live[s]["anomaly_score"], rel=1e-9)
    flags = [live[s]["is_anomaly"] for s in range(len(x))]
    assert any(flags[40:48]) and not any(flags[WARMUP:38])  # the stream is not trivial


def test_a_normal_that_moves_slowly_is_absorbed_and_shown_as_drift(
    broker: Broker,
    settings: Settings,
    start_skab: Callable[[Settings], Service],
    collector_for: Any,
    publisher_for: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The temperature rises by 12 of its σ over 1,200 readings: slow enough for the
    adapting centre to follow, and what it followed is reported: in the device's view, in
    the log once, and in the metric."""
    monkeypatch.setattr(service, "DRIFT_CHECK_S", 0.2)  # 60 s live
    # a warm-up long enough to learn how its 6 inputs go together (the drift is judged
    # against what the others predict, as readings are)
    warmup = 100
    baseline = BaselineConfig(warmup_readings=warmup, drift_warn_spreads=5.0)
    dev, n = "warming-pump", 1200
    x = rows(warmup + n, seed=9)
    x[warmup:, 2] += np.linspace(0.0, 12.0, n) * SIGMA[2]
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    pub = publisher_for(broker)
    with structlog.testing.capture_logs() as logs:
        svc = start_skab(settings.model_copy(update={"baseline": baseline}))
        port = svc.http.port
        for i, r in enumerate(x):
            pub.send(f"sensors/{dev}/readings", payload(r, i))
        col.json_on(f"anomaly/{dev}/verdict", count=len(x))
        status, shown = http_get(port, f"/devices/{dev}")
        assert status == 200
        drift = shown["drift"]
        assert drift["input"] == "Temperature [mean 5]" and drift["spreads"] > 5.0
        deadline = time.monotonic() + 10
        while not (said := [e for e in list(logs) if e.get("event") == "baseline_drifted"]):
            assert time.monotonic() < deadline, "no baseline_drifted warning"
            time.sleep(0.05)
        time.sleep(0.5)  # more checks pass: it is said once
    (warning,) = [e for e in list(logs) if e.get("event") == "baseline_drifted"]
    assert warning["device_id"] == dev and warning["input"] == "Temperature [mean 5]"
    assert warning["spreads"] >= 5.0 and f"anomalyd rewarm {dev}" in warning["hint"]
    assert said == [warning]
    assert metric(http_get(port, "/metrics")[1], "anomalyd_drifted_devices") == 1.0
