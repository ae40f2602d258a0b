"""A device's first readings fill its window: their inputs are a partial window's (one
reading's ``[std w]`` is 0), unlike anything the model was trained on. They are judged and
say so, but they feed no alert: a new device is not paged for on its first reading."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from daemon.config import AlertConfig, TopicsConfig
from daemon.models import ModelBundle, load_bundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.training.train import train

FEATURES = ("Flow", "Current")
LEVEL = np.array([32.0, 1.0])
SIGMA = np.array([0.4, 0.05])
WINDOW = 5
T = 1_800_000_000.0


def rows(n: int, seed: int) -> np.ndarray:
    return LEVEL + np.random.default_rng(seed).normal(size=(n, 2)) * SIGMA


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    out = tmp_path_factory.mktemp("windowed") / "m"
    train(rows(1500, seed=1), FEATURES, out, source="test", window=WINDOW)
    return load_bundle(out)


def pipeline(bundle: ModelBundle) -> Pipeline:
    # one anomalous verdict raises: any verdict fed to the alert shows
    alerts = AlertConfig(raise_after=1, window=1, resolve_after=2)
    return Pipeline(bundle, Decoder(bundle.features, bundle.detector_names), TopicsConfig(),
                    alerts, warmup=0)


def reading(x: np.ndarray, seq: int) -> dict[str, Any]:
    return {**dict(zip(FEATURES, x.tolist(), strict=True)), "seq": seq}


def send(p: Pipeline, device: str, body: dict[str, Any], at: float) -> list[dict[str, Any]]:
    msg = RawMessage(f"sensors/{device}/readings", orjson.dumps(body), T + at)
    outputs, _ = p.process([msg], T + at)
    return [orjson.loads(o.payload) | {"kind": o.kind} for outs in outputs for o in outs]


def test_readings_that_fill_the_window_are_judged_but_raise_no_alert(
    windowed: ModelBundle,
) -> None:
    p = pipeline(windowed)
    normal = rows(WINDOW + 5, seed=3)
    verdicts, alerts = [], []
    for i, x in enumerate(normal):
        out = send(p, "fresh-1", reading(x, i), at=i)
        verdicts += [o for o in out if o["kind"] == "verdict"]
        alerts += [o for o in out if o["kind"] == "alert"]
    filling = [v.get("window_filling", False) for v in verdicts]
    assert filling == [True] * (WINDOW - 1) + [False] * 6
    # the precondition: partial windows' inputs can look anomalous to the model ...
    assert any(v["is_anomaly"] for v in verdicts[: WINDOW - 1])
    # ... and paged no one
    assert not {a["key"] for a in alerts} & {v["key"] for v in verdicts[: WINDOW - 1]}
    # once the window is full, an anomaly raises the alert as usual
    fault = LEVEL - np.array([12.0, 0.0]) * SIGMA  # the flow drops by 12 spreads
    out = [o for i in range(3) for o in send(p, "fresh-1", reading(fault, 100 + i), at=20 + i)]
    assert any(o["kind"] == "alert" and o["state"] == "raised" for o in out)


def test_a_batch_message_that_fills_the_window_marks_its_first_predictions(
    windowed: ModelBundle,
) -> None:
    p = pipeline(windowed)
    batch = {"readings": [reading(x, i) for i, x in enumerate(rows(WINDOW + 2, seed=3))]}
    out = send(p, "fresh-2", batch, at=0)
    (verdict,) = [o for o in out if o["kind"] == "verdict"]
    marks = [pred.get("window_filling", False) for pred in verdict["predictions"]]
    assert marks == [True] * (WINDOW - 1) + [False] * 3
    assert not [o for o in out if o["kind"] == "alert"]
