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
measure. Every point of every file is pooled before the figures are computed (not
averaged per file). Besides the point verdicts of each detector, the ``alert`` rows count a
point as flagged while the ensemble's alert for that device is active (between "raised"
and "resolved"): that is what an operator would be paged for. ``daemon.eval_report`` holds
the figures and writes the tables.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
from numpy.typing import NDArray

from daemon.baseline import THRESHOLD_MARGIN
from daemon.config import AlertConfig, TopicsConfig
from daemon.errors import TrainingError
from daemon.eval_report import Evaluation, Events, Figures, Pages, roc_auc
from daemon.models import ENSEMBLE, ModelBundle, load_bundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.training.datasets import LABEL_COLUMNS, TrainingData, bad_rows, load_csv
from daemon.training.train import train, train_csv

Progress = Callable[[str], None]
CHUNK = 256
ALERT_ROW = "ensemble, alert active"
BASELINE_ROW = "device baseline alone"
ALONE = ", no baseline"  # the detector's own verdicts, no per-device baseline (warm-up 0)


@dataclass(frozen=True)
class Streamed:
    """One device's run through the pipeline, per row."""

    flags: NDArray[np.bool_]  # the verdict's is_anomaly
    active: NDArray[np.bool_]  # the device's alert is raised after this reading
    baseline: NDArray[np.bool_]  # the device baseline's own flag
    scores: NDArray[np.float64]  # the detector's anomaly score
    leads: dict[int, str]  # row -> the input its explanation names first (anomalies only)
    # the largest drift of the device's baseline (input name, spreads), looked at every
    # ``CHUNK`` readings and at the end; None without a fitted baseline
    drift: tuple[str, float] | None = None


def stream(
    bundle: ModelBundle,
    x: NDArray[np.float64],
    detector: str,
    *,
    warmup: int,
    alerts: AlertConfig,
    device: str = "eval",
    threshold_margin: float = THRESHOLD_MARGIN,
) -> Streamed:
    """Send one device's readings through a fresh pipeline, as payloads, in order."""
    decoder = Decoder(bundle.features, bundle.detector_names, subscription="eval/+")
    pipeline = Pipeline(bundle, decoder, TopicsConfig(), alerts, detector, warmup=warmup,
                        threshold_margin=threshold_margin)
    n = x.shape[0]
    flags = np.zeros(n, dtype=bool)
    baseline = np.zeros(n, dtype=bool)
    scores = np.zeros(n, dtype=np.float64)
    leads: dict[int, str] = {}
    changes: dict[int, bool] = {}
    names = bundle.features
    drift: tuple[str, float] | None = None
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
                    scores[body["seq"]] = body["anomaly_score"]
                    if body["is_anomaly"] and body.get("contributions"):
                        leads[body["seq"]] = body["contributions"][0]["feature"]
                    baseline[body["seq"]] = body.get("baseline", {}).get("is_anomaly", False)
                elif out.kind == "alert":
                    changes[body["seq"]] = body["active"]
                elif out.kind == "dead_letter":  # presence (alerts.quiet_after_s) is no figure
                    raise RuntimeError(f"evaluation reading rejected: {body['detail']}")
        moved = pipeline.devices.drift(device)
        if moved is not None and (drift is None or abs(moved.spreads) > abs(drift[1])):
            drift = (bundle.model_features[moved.input], moved.spreads)
    active = np.zeros(n, dtype=bool)
    state = False
    for i in range(n):
        state = changes.get(i, state)
        active[i] = state
    return Streamed(flags, active, baseline, scores, leads, drift)


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
    root: Path | None = None,
    skip_bad_rows: bool = False,
    threshold_margin: float = THRESHOLD_MARGIN,
    models: Path | None = None,
    device_column: str | None = None,
    per_device: bool = True,
    models_warmup: int | None = None,
) -> Evaluation:
    """Figures over all scored points of all usable files, per variant and row.

    Every file is read and checked before any training: one that cannot be read, has no
    label column or no row after the warm-up is skipped (named in ``Evaluation.skipped``
    with the reason, and in the progress), the others are evaluated; a file whose features
    differ from the first usable file's is left out of the global variant only (one model
    set judges every file there). ``TrainingError`` if no file is usable. Files are named
    by their path under ``root`` (their file name without it). With ``skip_bad_rows`` a
    file's rows that are not all numbers are left out (``Evaluation.rows_left_out``) and
    the rest of the file is evaluated. A file with a device column (``device_column``, or
    one of the usual names) is one run per device.
    With ``models`` (a trained model set's directory) a third variant streams every run
    through that set, the one a daemon would serve (``models <version>, warm-up <n>``),
    its device baselines warming up over ``models_warmup`` readings (the daemon's
    ``baseline.warmup_readings``, as the command passes it; default: ``warmup``); a run
    without one of its features is left out of that variant only. ``per_device`` False leaves
    out the per-device variant (a model set trained on each run: slow for many runs).
    """
    if not (per_device or anomaly_free or models):
        raise TrainingError("nothing to evaluate: without the per-device variant, give "
                            "--anomaly-free or --models")
    say = progress or (lambda _m: None)
    alerts = alerts or AlertConfig()
    results = Evaluation({}, {})
    runs: list[tuple[str, TrainingData]] = []
    for f in files:
        name = f.relative_to(root).as_posix() if root is not None else f.name
        problem, d = _usable(f, skip_bad_rows, device_column)
        if d is None:
            results.skipped.append((name, problem))
            say(f"skipped {name}: {problem}")
            continue
        if d.skipped:
            results.rows_left_out.append((name, len(d.skipped)))
            say(f"{name}: left out {len(d.skipped)} bad rows: {bad_rows(d.skipped)}")
        parts = by_device(d)
        if len(parts) > 1:
            say(f"{name}: {len(parts)} devices, each evaluated as its own run")
        for device, part in parts:
            run_name = f"{name} [{device}]" if device is not None else name
            if part.X.shape[0] <= warmup:
                why = (f"{part.X.shape[0]} rows, not more than the warm-up ({warmup}): "
                       "nothing would be scored")
                results.skipped.append((run_name, why))
                say(f"skipped {run_name}: {why}")
                continue
            runs.append((run_name, part))
    if not runs:
        reasons = "; ".join(f"{n}: {why}" for n, why in results.skipped)
        raise TrainingError(f"no file could be evaluated ({reasons})")
    schema = runs[0][1].features
    for name, d in runs:
        if anomaly_free is not None and d.features != schema:
            why = (f"global variant only: features {list(d.features)} differ from "
                   f"{runs[0][0]}'s {list(schema)}")
            results.skipped.append((name, why))
            say(f"skipped {name} in the {why}")
    with tempfile.TemporaryDirectory(prefix="anomalyd-eval-") as tmp:
        pooled = Pooled()
        for i, (name, d) in enumerate(runs if per_device else ()):
            say(f"per-device [{i + 1}/{len(runs)}] {name}: training on {warmup} rows")
            out = Path(tmp) / f"per-device-{i}"
            train(
                d.X[:warmup],
                d.features,
                out,
                source=f"evaluate {name}",
                seed=seed,
                quantile=quantile,
                window=window,
                detectors=detectors,
            )
            _score_file(load_bundle(out), d, name, warmup, alerts, pooled, threshold_margin)
        if per_device:
            pooled.into(results, "per-device")
        if anomaly_free is not None:
            same = [(name, d) for name, d in runs if d.features == schema]
            say(f"global: training once on {anomaly_free.name}")
            out = Path(tmp) / "global"
            train_csv(
                anomaly_free,
                out,
                list(schema),
                seed=seed,
                quantile=quantile,
                window=window,
                detectors=detectors,
                skip_bad_rows=skip_bad_rows,
            )
            bundle = load_bundle(out)
            pooled = Pooled()
            for i, (name, d) in enumerate(same):
                say(f"global [{i + 1}/{len(same)}] {name}: streaming")
                _score_file(bundle, d, name, warmup, alerts, pooled, threshold_margin)
            pooled.into(results, "global")
    if models is not None:
        bundle = load_bundle(models)
        served = warmup if models_warmup is None else models_warmup
        variant = f"models {bundle.version}, warm-up {served}"
        say(f"{variant}: each run's device warms up its baseline over its first {served} "
            f"readings (0: no baseline); its figures count the rows after the first "
            f"{warmup}, as the other variants' do")
        pooled = Pooled()
        for i, (name, d) in enumerate(runs):
            missing = [f for f in bundle.features if f not in d.features]
            if missing:
                why = f"{variant} only: no column for its feature(s) {missing}"
                results.skipped.append((name, why))
                say(f"skipped {name} in the {why}")
                continue
            say(f"{variant} [{i + 1}/{len(runs)}] {name}: streaming")
            columns = [d.features.index(f) for f in bundle.features]
            _score_file(bundle, replace(d, X=d.X[:, columns], features=bundle.features),
                        name, warmup, alerts, pooled, threshold_margin, served)
        if pooled.files:
            pooled.into(results, variant)
        else:  # no row of figures that would read as a clean result
            say(f"{variant}: no run has the model set's features {list(bundle.features)}: "
                "not in the table")
    return results


def _usable(path: Path, skip_bad_rows: bool, device_column: str | None
            ) -> tuple[str, TrainingData | None]:
    """The file's data if it can be evaluated, else why not."""
    try:
        d = load_csv(path, skip_bad_rows=skip_bad_rows, device=device_column)
    except TrainingError as exc:  # "<path>: what" (the caller names the file)
        return str(exc).removeprefix(str(path)).lstrip(": ") or "unreadable", None
    if d.labels is None:
        return f"no label column (one of {', '.join(LABEL_COLUMNS)}): nothing to measure " \
            "against", None
    return "", d


def by_device(d: TrainingData) -> list[tuple[str | None, TrainingData]]:
    """A file's rows as one run per device, in the order each first appears, where it
    has a device column (each device is windowed, warmed up and scored on its own, as the
    daemon would judge it); else the whole file as one run."""
    if d.devices is None:
        return [(None, d)]
    names = np.asarray(d.devices)
    return [(device, replace(d, X=d.X[names == device], devices=None,
                             labels=None if d.labels is None else d.labels[names == device]))
            for device in dict.fromkeys(d.devices)]


class Pooled:
    """Each row's flags and labels over all files, and its per-file AUCs."""

    def __init__(self) -> None:
        self.files: list[str] = []  # in the order they were added
        self.rows: dict[str, tuple[list[NDArray[np.bool_]], list[NDArray[np.bool_]]]] = {}
        self.aucs: dict[str, list[float]] = {}
        self.leads: dict[str, list[int]] = {}  # input -> false alarms it leads, per file
        self.drifts: list[tuple[str, float] | None] = []  # the ensemble run's, per file

    def add(
        self,
        name: str,
        flags: NDArray[np.bool_],
        y: NDArray[np.bool_],
        scores: NDArray[np.float64] | None = None,
    ) -> None:
        flagged, labels = self.rows.setdefault(name, ([], []))
        flagged.append(flags)
        labels.append(y)
        auc = roc_auc(scores, y) if scores is not None else None
        if auc is not None:
            self.aucs.setdefault(name, []).append(auc)

    def add_false_alarm_leads(
        self, leads: dict[int, str], y: NDArray[np.bool_], first: int
    ) -> None:
        """Count the false alarms among rows ``first`` onwards by the input they name first."""
        counts: dict[str, int] = {}
        for row, name in leads.items():
            if row >= first and not y[row - first]:
                counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            self.leads.setdefault(name, []).append(n)

    def into(self, results: Evaluation, variant: str) -> None:
        results.figures[variant] = {
            name: Figures.of(np.concatenate(flags), np.concatenate(ys), self.aucs.get(name, ()))
            for name, (flags, ys) in self.rows.items()
        }
        ranked = sorted(self.leads.items(), key=lambda kv: -sum(kv[1]))
        results.false_alarm_leads[variant] = {k: (sum(v), len(v)) for k, v in ranked}
        results.events[variant] = {
            name: Events.of(*self.rows[name]) for name in (ENSEMBLE, ALERT_ROW)
            if name in self.rows
        }
        if ALERT_ROW in self.rows:
            results.pages[variant] = Pages.of(*self.rows[ALERT_ROW])
        flags, ys = self.rows.get(ENSEMBLE, ([], []))
        results.per_file[variant] = [
            (name, Figures.of(f, y)) for name, f, y in zip(self.files, flags, ys, strict=True)
        ]
        results.drift[variant] = dict(zip(self.files, self.drifts, strict=True))


def _score_file(
    bundle: ModelBundle,
    d: TrainingData,
    name: str,
    warmup: int,
    alerts: AlertConfig,
    pooled: Pooled,
    threshold_margin: float,
    baseline_warmup: int | None = None,
) -> None:
    """Stream one run through each detector; the rows after ``warmup`` are counted. The
    device baseline warms up over ``baseline_warmup`` rows (default: ``warmup``)."""
    assert d.labels is not None
    y = d.labels[warmup:]
    pooled.files.append(name)
    served = warmup if baseline_warmup is None else baseline_warmup
    for detector in bundle.detector_names:
        run = stream(bundle, d.X, detector, warmup=served, alerts=alerts,
                     threshold_margin=threshold_margin)
        pooled.add(detector, run.flags[warmup:], y)
        # SKAB's own protocol has no per-device baseline: the detector's verdicts alone.
        # The score does not depend on the baseline, so its AUC is given here only.
        alone = stream(bundle, d.X, detector, warmup=0, alerts=alerts)
        pooled.add(detector + ALONE, alone.flags[warmup:], y, alone.scores[warmup:])
        if detector == ENSEMBLE:
            pooled.add(ALERT_ROW, run.active[warmup:], y)
            pooled.add(BASELINE_ROW, run.baseline[warmup:], y)
            pooled.add_false_alarm_leads(run.leads, y, warmup)
            pooled.drifts.append(run.drift)


