"""``anomalyd evaluate``: the SKAB protocol on a folder of labelled CSV files.

Each file is one device's run (``;`` or ``,`` separated, a time column, an ``anomaly``
label column; see ``daemon.training.datasets``). Two variants:

* **per-device** (SKAB's own protocol): for each file, a model set is trained on its first
  ``warmup`` rows, then the whole file is streamed through the daemon's pipeline (decoder,
  per-device window and baseline, detectors, alert state machine), warming up on those
  same rows;
* **global**: one model set trained on a separate anomaly-free file, then each file is
  streamed the same way; its first ``warmup`` rows set that device's own baseline.

Only the rows after the warm-up are counted. Each detector is reported twice: as the
daemon judges (the detector and the device's baseline must both flag a reading) and, as
``<detector>, no baseline``, on its own verdicts, which is what SKAB's published results
measure. Every point of every file is pooled before the
figures are computed (not averaged per file). Besides the point verdicts of each detector,
the ``alert`` rows count a point as flagged while the ensemble's alert for that device is
active (between "raised" and "resolved"): that is what an operator would be paged for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from numpy.typing import NDArray

from daemon.config import AlertConfig, TopicsConfig
from daemon.models import ENSEMBLE, ModelBundle, load_bundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.training.datasets import TrainingData, load_csv
from daemon.training.train import train, train_csv

Progress = Callable[[str], None]
CHUNK = 256
ALERT_ROW = "ensemble, alert active"
BASELINE_ROW = "device baseline alone"
ALONE = ", no baseline"  # the detector's own verdicts, no per-device baseline (warm-up 0)


@dataclass(frozen=True)
class Figures:
    precision: float
    recall: float
    f1: float
    far: float  # % of normal points flagged
    mar: float  # % of anomalous points missed
    n_normal: int
    n_anomalous: int

    @classmethod
    def of(cls, flagged: NDArray[np.bool_], y: NDArray[np.bool_]) -> Figures:
        tp = int(np.sum(flagged & y))
        fp = int(np.sum(flagged & ~y))
        fn = int(np.sum(~flagged & y))
        n_anom, n_norm = int(y.sum()), int((~y).sum())
        return cls(
            precision=tp / (tp + fp) if tp + fp else 0.0,
            recall=tp / n_anom if n_anom else 0.0,
            f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            far=100.0 * fp / n_norm if n_norm else 0.0,
            mar=100.0 * fn / n_anom if n_anom else 0.0,
            n_normal=n_norm,
            n_anomalous=n_anom,
        )


def stream(
    bundle: ModelBundle,
    x: NDArray[np.float64],
    detector: str,
    *,
    warmup: int,
    alerts: AlertConfig,
    device: str = "eval",
) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]]:
    """Send one device's readings through a fresh pipeline, as payloads, in order.

    Returns (is_anomaly, alert active after this reading, the device baseline's own flag)
    for every row.
    """
    decoder = Decoder(bundle.features, bundle.detector_names, subscription="eval/+")
    pipeline = Pipeline(bundle, decoder, TopicsConfig(), alerts, detector, warmup=warmup)
    n = x.shape[0]
    flags = np.zeros(n, dtype=bool)
    baseline = np.zeros(n, dtype=bool)
    changes: dict[int, bool] = {}
    names = bundle.features
    for start in range(0, n, CHUNK):
        msgs = [
            RawMessage(
                f"eval/{device}",
                orjson.dumps({**dict(zip(names, row.tolist(), strict=True)), "seq": start + i}),
                0.0,
            )
            for i, row in enumerate(x[start : start + CHUNK])
        ]
        outputs, _ = pipeline.process(msgs, 0.0)
        for outs in outputs:
            for out in outs:
                body = orjson.loads(out.payload)
                if out.kind == "verdict":
                    flags[body["seq"]] = body["is_anomaly"]
                    baseline[body["seq"]] = body.get("baseline", {}).get("is_anomaly", False)
                elif out.kind == "alert":
                    changes[body["seq"]] = body["active"]
                else:
                    raise RuntimeError(f"evaluation reading rejected: {body['detail']}")
    active = np.zeros(n, dtype=bool)
    state = False
    for i in range(n):
        state = changes.get(i, state)
        active[i] = state
    return flags, active, baseline


def evaluate(
    files: Sequence[Path],
    *,
    anomaly_free: Path | None,
    warmup: int = 400,
    window: int = 10,
    quantile: float = 0.99,
    alerts: AlertConfig | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    detectors: Sequence[str] | None = None,
) -> dict[str, dict[str, Figures]]:
    """{variant: {row name: figures}} over all scored points of all files."""
    say = progress or (lambda _m: None)
    alerts = alerts or AlertConfig()
    results: dict[str, dict[str, Figures]] = {}
    data = [load_csv(f) for f in files]
    for d, f in zip(data, files, strict=True):
        if d.labels is None:
            raise ValueError(f"{f}: no label column")
        if d.X.shape[0] <= warmup:
            raise ValueError(f"{f}: {d.X.shape[0]} rows, not more than the warm-up {warmup}")
    with tempfile.TemporaryDirectory(prefix="anomalyd-eval-") as tmp:
        pooled: dict[str, tuple[list[NDArray[np.bool_]], list[NDArray[np.bool_]]]] = {}
        for i, (d, f) in enumerate(zip(data, files, strict=True)):
            say(f"per-device [{i + 1}/{len(files)}] {f.name}: training on {warmup} rows")
            out = Path(tmp) / f"per-device-{i}"
            train(
                d.X[:warmup],
                d.features,
                out,
                source=f"evaluate {f.name}",
                seed=seed,
                quantile=quantile,
                window=window,
                detectors=detectors,
            )
            _score_file(load_bundle(out), d, warmup, alerts, pooled)
        results["per-device"] = _figures(pooled)
        if anomaly_free is not None:
            say(f"global: training once on {anomaly_free.name}")
            out = Path(tmp) / "global"
            train_csv(
                anomaly_free,
                out,
                list(data[0].features),
                seed=seed,
                quantile=quantile,
                window=window,
                detectors=detectors,
            )
            bundle = load_bundle(out)
            pooled = {}
            for i, (d, f) in enumerate(zip(data, files, strict=True)):
                say(f"global [{i + 1}/{len(files)}] {f.name}: streaming")
                _score_file(bundle, d, warmup, alerts, pooled)
            results["global"] = _figures(pooled)
    return results


def _score_file(
    bundle: ModelBundle,
    d: TrainingData,
    warmup: int,
    alerts: AlertConfig,
    pooled: dict[str, tuple[list[NDArray[np.bool_]], list[NDArray[np.bool_]]]],
) -> None:
    assert d.labels is not None
    y = d.labels[warmup:]
    for detector in bundle.detector_names:
        flags, active, baseline = stream(bundle, d.X, detector, warmup=warmup, alerts=alerts)
        pooled.setdefault(detector, ([], []))[0].append(flags[warmup:])
        pooled[detector][1].append(y)
        # SKAB's own protocol has no per-device baseline: the detector's verdicts alone
        alone, _, _ = stream(bundle, d.X, detector, warmup=0, alerts=alerts)
        pooled.setdefault(detector + ALONE, ([], []))[0].append(alone[warmup:])
        pooled[detector + ALONE][1].append(y)
        if detector == ENSEMBLE:
            pooled.setdefault(ALERT_ROW, ([], []))[0].append(active[warmup:])
            pooled[ALERT_ROW][1].append(y)
            pooled.setdefault(BASELINE_ROW, ([], []))[0].append(baseline[warmup:])
            pooled[BASELINE_ROW][1].append(y)


def _figures(
    pooled: dict[str, tuple[list[NDArray[np.bool_]], list[NDArray[np.bool_]]]],
) -> dict[str, Figures]:
    return {
        name: Figures.of(np.concatenate(flags), np.concatenate(ys))
        for name, (flags, ys) in pooled.items()
    }


def markdown(results: dict[str, dict[str, Figures]]) -> str:
    lines = [
        "| variant | detector | precision | recall | F1 | FAR % | MAR % |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rows in results.items():
        for name, f in rows.items():
            lines.append(
                f"| {variant} | {name} | {f.precision:.2f} | {f.recall:.2f} | {f.f1:.2f} "
                f"| {f.far:.2f} | {f.mar:.2f} |"
            )
    any_rows = next(iter(results.values()))
    f = next(iter(any_rows.values()))
    lines.append("")
    lines.append(f"Scored points: {f.n_normal} normal, {f.n_anomalous} anomalous.")
    return "\n".join(lines) + "\n"


def labelled_files(folder: Path) -> list[Path]:
    """The folder's CSV files in natural order (2.csv before 10.csv)."""
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".csv"]
    return sorted(files, key=lambda p: (len(p.stem), p.stem))
