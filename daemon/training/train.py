"""Training: split, standardise, fit every detector, calibrate, validate, write atomically.

A fifth of the normal rows is held back and never fitted on. Thresholds come from the
detectors' scores on those rows (see ``daemon.calibration``); validation figures are computed
on those rows plus any labelled validation rows (for synthetic data, fresh readings with
injected faults; for a labelled CSV, its anomalous rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from numpy.typing import NDArray

from daemon.calibration import Calibration
from daemon.detectors import (
    MEMBER_TYPES,
    AutoencoderDetector,
    Detector,
    Ensemble,
    IsolationForestDetector,
    LofDetector,
)
from daemon.errors import TrainingError
from daemon.models import ENSEMBLE, FORMAT_VERSION, MANIFEST, sha256_file
from daemon.preprocess import StandardScaler
from daemon.training import MIN_ROWS
from daemon.training.datasets import bad_rows, csv_files, load_csv
from daemon.training.synthetic import FEATURES, generate_dataset
from daemon.windows import derived_names, windowed_matrix

HOLDOUT_FRACTION = 0.2
PREPROCESSOR = "preprocessor.json"

Progress = Callable[[str], None]

#: What a model directory may hold besides a model set: the model set's own files (of a
#: replacement that was interrupted), a file system's ``lost+found`` (a mounted volume), a
#: README, hidden files (``.gitkeep``, ``.tmp-*``).
_MODEL_FILES = frozenset((MANIFEST, PREPROCESSOR, "lost+found",
                          *(name for kind in MEMBER_TYPES for name in kind.artifact_names)))


def out_problem(out: Path, state_dir: Path, *, force: bool) -> str | None:
    """Why ``train`` must not write a model set into ``out``, or None: it already holds
    one (without ``force``), it is (or is inside) the daemon's state directory, or it
    holds other files (a model set written among them could not be told from them, nor
    they removed with it). Checked before training starts."""
    where, state = out.resolve(), state_dir.resolve()
    if where == state or where.is_relative_to(state):
        within = "is" if where == state else "is inside"
        return (f"{out} {within} the daemon's state directory (state.dir {state_dir}): "
                "train into a directory of its own, e.g. --out models")
    if (out / MANIFEST).exists():
        return (None if force else
                f"{out} already holds a trained model set; pass --force to replace it")
    try:
        others = sorted(p.name for p in out.iterdir() if not _may_share(p.name))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return f"{out} is a file, not a directory: name a new or empty directory"
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"{out} is not empty and holds no model set ({shown}): name a new or empty "
            "directory, or one holding a model set (replaced with --force)")


def _may_share(name: str) -> bool:
    return name in _MODEL_FILES or name.startswith((".", "README"))


def train(
    x: NDArray[np.float64],
    features: Sequence[str],
    out_dir: Path,
    *,
    source: str,
    seed: int = 0,
    quantile: float = 0.99,
    validation: tuple[NDArray[np.float64], NDArray[np.bool_]] | None = None,
    progress: Progress | None = None,
    window: int = 1,
    windowed: bool = False,
    detectors: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit the default member detectors (or those named in ``detectors``) on normal rows
    ``x``, write a model directory, return its manifest. The ensemble fuses those fitted.

    With ``window > 1`` the model's inputs are windowed statistics (``daemon.windows``):
    ``x`` (and the validation rows) are consecutive readings of one device, windowed here,
    unless ``windowed`` says they already are model inputs.
    """
    say = progress or (lambda _message: None)
    inputs = derived_names(features, window)
    if not windowed:
        x = windowed_matrix(_checked(x, features), window)
        if validation is not None:
            validation = (windowed_matrix(validation[0], window), validation[1])
    x = _checked(x, inputs)
    rng = np.random.default_rng(seed)
    order = rng.permutation(x.shape[0])
    n_hold = max(int(HOLDOUT_FRACTION * x.shape[0]), 10)
    held, fitted = x[order[:n_hold]], x[order[n_hold:]]
    say(f"split {x.shape[0]} rows: {fitted.shape[0]} to fit, {n_hold} held back to calibrate")

    scaler = StandardScaler.fit(fitted)
    z_fit, z_held = scaler.transform(fitted), scaler.transform(held)
    chosen = member_names(detectors)
    fitting: list[Detector] = [
        kind(seed=seed)
        for kind in (IsolationForestDetector, LofDetector, AutoencoderDetector)
        if kind.name in chosen
    ]
    members: dict[str, tuple[Detector, Calibration]] = {}
    for det in fitting:
        started = time.perf_counter()
        say(f"fitting {det.name}")
        det.fit(z_fit, progress=say)
        members[det.name] = (det, Calibration.from_scores(det.score(z_held), quantile))
        say(f"fitted {det.name} in {time.perf_counter() - started:.1f} s")
    ensemble = Ensemble(members)
    calibrations = {name: cal for name, (_, cal) in members.items()}
    calibrations[ENSEMBLE] = Calibration.from_scores(ensemble.score(z_held)[0], quantile)

    say("validating")
    x_val, y_val = held, np.zeros(n_hold, dtype=bool)
    if validation is not None:
        x_val = np.vstack([held, _checked(validation[0], inputs, min_rows=1)])
        y_val = np.concatenate([y_val, np.asarray(validation[1], dtype=bool)])
    combined, member_scores = ensemble.score(scaler.transform(x_val))
    all_scores = {**member_scores, ENSEMBLE: combined}
    report = {
        name: {**cal.to_dict(), "validation": _figures(cal.is_anomaly(all_scores[name]), y_val)}
        for name, cal in calibrations.items()
    }
    n_bad = int(y_val.sum())
    say(f"validated on {len(y_val)} readings ({len(y_val) - n_bad} normal, {n_bad} anomalous)"
        if n_bad else f"validated on {len(y_val)} held-back normal readings")

    manifest = {
        "format_version": FORMAT_VERSION,
        "features": list(features),
        "window": window,
        "default_detector": ENSEMBLE,
        "training": {
            "source": source,
            "rows": int(x.shape[0]),
            "fingerprint": fingerprint(x, inputs),
            "seed": seed,
            "quantile": quantile,
        },
        "library_versions": _library_versions(),
        "preprocessor": PREPROCESSOR,
        "detectors": report,
    }
    _write_atomically(out_dir, scaler, fitting, manifest)
    say(f"wrote model {manifest['model_version']} to {out_dir}")
    return manifest


#: Every member detector anomalyd can fit, and the ensemble's members by default. LOF is
#: left out of the default: its neighbour search was half of the ensemble's scoring time,
#: and without it the ensemble scored the same or better in every evaluation made
#: (BENCHMARKS.md, docs/evaluation.md: "Default ensemble"). ``--detectors`` adds it back.
ALL_MEMBERS = ("isolation_forest", "lof", "autoencoder")
DEFAULT_MEMBERS = ("isolation_forest", "autoencoder")


def member_names(detectors: Sequence[str] | None) -> tuple[str, ...]:
    """The member detectors to fit (``DEFAULT_MEMBERS`` when None); ValueError for an
    unknown name or none."""
    known = tuple(k.name for k in (IsolationForestDetector, LofDetector, AutoencoderDetector))
    assert known == ALL_MEMBERS
    if detectors is None:
        return DEFAULT_MEMBERS
    unknown = sorted(set(detectors) - set(known))
    if unknown or not detectors:
        raise ValueError(f"detectors must be some of {', '.join(known)}; got {list(detectors)}")
    return tuple(d for d in known if d in detectors)


def train_default(
    out_dir: Path,
    rows: int = 20000,
    seed: int = 0,
    *,
    quantile: float = 0.99,
    progress: Progress | None = None,
    detectors: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train on synthetic pump data; validate on fresh readings, half with injected faults."""
    x, _, _ = generate_dataset(rows, seed, fault_fraction=0.0)
    x_val, y_val, _ = generate_dataset(max(rows // 4, 100), seed + 1, fault_fraction=0.5)
    return train(
        x,
        FEATURES,
        out_dir,
        source=f"synthetic pump (rows={rows}, seed={seed})",
        seed=seed,
        quantile=quantile,
        validation=(x_val, y_val),
        progress=progress,
        detectors=detectors,
    )


def train_csv(
    path: Path,
    out_dir: Path,
    features: Sequence[str] | None = None,
    *,
    seed: int = 0,
    quantile: float = 0.99,
    progress: Progress | None = None,
    window: int = 1,
    detectors: Sequence[str] | None = None,
    skip_bad_rows: bool = False,
    device_column: str | None = None,
) -> dict[str, Any]:
    """Train on a CSV's rows, or on every CSV of a folder (one device each, e.g. from
    ``anomalyd record``); labelled anomalous rows are kept out of fitting and validate.

    A file's rows are taken as consecutive readings of one device (of each device named
    in its device column, ``daemon.training.datasets``), windowed (each on its own)
    before the labelled rows are set aside, exactly as the daemon would have seen
    them (``device_column`` names that column where it has another name). Every file of
    a folder must have the first one's features (or ``features``).
    With ``skip_bad_rows`` rows that are not all finite numbers are left out (said in the
    progress and in the manifest's ``training.source``) instead of refusing the file.
    """
    files = csv_files(path) if path.is_dir() else [path]
    if not files:
        raise TrainingError(f"{path}: no CSV files in this folder or its subfolders")
    parts: list[tuple[NDArray[np.float64], NDArray[np.bool_] | None]] = []
    names: tuple[str, ...] = ()
    skipped = 0
    for i, file in enumerate(files):
        data = load_csv(file, features or (names or None), skip_bad_rows=skip_bad_rows,
                        device=device_column)
        names = data.features
        label = file.name if file == path else file.relative_to(path).as_posix()
        if data.skipped:
            skipped += len(data.skipped)
            if progress:
                progress(f"{label}: left out {len(data.skipped)} bad rows: "
                         f"{bad_rows(data.skipped)}")
        x_file = _checked(data.X, names, min_rows=1)
        if progress:
            for note in data.notes:
                progress(f"{label}: {note}")
        if data.devices is None:
            parts.append((windowed_matrix(x_file, window), data.labels))
        else:  # several devices' rows interleaved: each windowed on its own
            order = _by_device(data.devices)
            for rows in order.values():
                parts.append((windowed_matrix(x_file[rows], window),
                              None if data.labels is None else data.labels[rows]))
            if progress:
                progress(f"{label}: {len(order)} device(s) in its device column, each "
                         "windowed on its own")
        still = [n for n, spread in zip(names, np.ptp(x_file, axis=0), strict=True)
                 if spread == 0]
        if still and progress:
            progress(f"{label}: column(s) {still} never change: the model cannot learn how "
                     "they vary, and will not notice when they do")
        if progress and len(files) > 1:
            progress(f"{label}: {data.X.shape[0]} rows ({i + 1} of {len(files)} files)")
    inputs = np.concatenate([x for x, _ in parts])
    labels = None
    if any(y is not None for _, y in parts):
        labels = np.concatenate([np.zeros(len(x), dtype=bool) if y is None else y
                                 for x, y in parts])
    source = f"csv {path.name}" + (f" ({len(files)} files)" if path.is_dir() else "")
    if skipped:
        source += f" ({skipped} bad rows left out)"
    x, validation = inputs, None
    if labels is not None and labels.any():
        x = inputs[~labels]
        anomalous = inputs[labels]
        validation = (anomalous, np.ones(anomalous.shape[0], dtype=bool))
        if progress:
            progress(f"{path.name}: {x.shape[0]} normal rows, {anomalous.shape[0]} labelled")
    return train(
        x,
        names,
        out_dir,
        source=source,
        seed=seed,
        quantile=quantile,
        validation=validation,
        progress=progress,
        window=window,
        windowed=True,
        detectors=detectors,
    )


def _by_device(devices: Sequence[str]) -> dict[str, NDArray[np.intp]]:
    """Each device's row indexes, in file order (devices in order of first appearance)."""
    rows: dict[str, list[int]] = {}
    for i, device in enumerate(devices):
        rows.setdefault(device, []).append(i)
    return {d: np.asarray(r, dtype=np.intp) for d, r in rows.items()}


def fingerprint(x: NDArray[np.float64], features: Sequence[str]) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    digest.update("\x1f".join(features).encode())
    return digest.hexdigest()


def _checked(
    x: NDArray[np.float64], features: Sequence[str], min_rows: int = MIN_ROWS
) -> NDArray[np.float64]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(features):
        raise TrainingError(f"data shape {x.shape} does not match {len(features)} features")
    if len(set(features)) != len(features) or not all(features):
        raise TrainingError(f"feature names must be unique and non-empty: {list(features)}")
    if x.shape[0] < min_rows:
        raise TrainingError(f"need at least {min_rows} rows, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise TrainingError("training data contains NaN or infinite values")
    return x


def _figures(flagged: NDArray[np.bool_], y: NDArray[np.bool_]) -> dict[str, float | int | None]:
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    fn = int(np.sum(~flagged & y))
    n_anom, n_norm = int(y.sum()), int((~y).sum())
    # without labelled anomalies, precision and F1 could only be 0 (every flag a false
    # one) or undefined: they say nothing of the detector, so none is given
    precision = tp / (tp + fp) if tp + fp and n_anom else None
    recall = tp / n_anom if n_anom else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn and n_anom else None
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "far": fp / n_norm if n_norm else None,
        "mar": fn / n_anom if n_anom else None,
        "n_normal": n_norm,
        "n_anomalous": n_anom,
    }


def _library_versions() -> dict[str, str]:
    # training already imported TensorFlow for the autoencoder; this import is free by now
    from daemon.training.keras_autoencoder import TF_VERSION

    return {
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "tensorflow": TF_VERSION,
        "python": platform.python_version(),
    }


def _write_atomically(
    out_dir: Path,
    scaler: StandardScaler,
    detectors: Sequence[Detector],
    manifest: dict[str, Any],
) -> None:
    """Write into a temporary folder inside ``out_dir``, then move each file into place,
    the manifest last.

    ``out_dir`` itself is never replaced (it may be a mount point, e.g. a container
    volume) and files that are not the model's are left alone. A reader that loads while
    files are being moved finds a checksum that does not match and refuses the load;
    it never loads a mixture.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir))
    try:
        written = [scaler.save(tmp / PREPROCESSOR)]
        for det in detectors:
            written += det.save(tmp)
        manifest["artifacts"] = {p.name: sha256_file(p) for p in written}
        now = datetime.now(UTC)
        combined = hashlib.sha256(json.dumps(manifest["artifacts"], sort_keys=True).encode())
        manifest["created_at"] = now.isoformat(timespec="seconds").replace("+00:00", "Z")
        manifest["model_version"] = f"{now:%Y%m%dT%H%M%SZ}-{combined.hexdigest()[:8]}"
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        with (tmp / MANIFEST).open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        previous = out_dir / MANIFEST
        if previous.exists():
            previous.unlink()  # no manifest vouches for a half-replaced set
        for path in written:
            os.replace(path, out_dir / path.name)
        os.replace(tmp / MANIFEST, out_dir / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
