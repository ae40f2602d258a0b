"""Loading a trained model directory into a :class:`ModelBundle`, after verifying it.

Every artifact listed in ``manifest.json`` is hashed before anything is loaded, and a
missing or altered file, or one that another user could have written, stops the load with
:class:`ModelLoadError`. No artifact is a pickle: arrays are ``.npz`` files read with
``allow_pickle=False``, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.calibration import Calibration
from daemon.detectors import MEMBER_TYPES, Detector, Ensemble
from daemon.errors import ModelAccessError, ModelLoadError
from daemon.explain import Explanation, explain_reading
from daemon.preprocess import StandardScaler
from daemon.windows import derived_names

#: 2: LOF stored as arrays (lof.npz) instead of a pickle; 3: the Isolation Forest grown on
#: rotated inputs (a ``rotation`` array in isolation_forest.npz). A daemon that knows only
#: 2 refuses a set of 3 rather than scoring its forest on unrotated inputs.
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
MANIFEST = "manifest.json"
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class BatchScores:
    detector: str
    scores: np.ndarray  # (n,) float64
    is_anomaly: np.ndarray  # (n,) bool
    confidence: np.ndarray  # (n,) float64 in [0, 1]; see daemon.calibration
    margin: np.ndarray  # (n,) (score - threshold) / spread
    members: dict[str, np.ndarray] | None  # ensemble only: each member's raw score
    zscores: np.ndarray  # (n, d) (x - center) / scale of the raw input


class ModelBundle:
    """A verified, loaded model set: preprocessor, member detectors, ensemble, thresholds."""

    def __init__(
        self,
        manifest: dict[str, Any],
        preprocessor: StandardScaler,
        members: dict[str, Detector],
        calibrations: dict[str, Calibration],
    ) -> None:
        self.manifest = manifest
        self.features: tuple[str, ...] = tuple(manifest["features"])
        #: Readings per feature window (``daemon.windows``); 1 = the model sees raw readings.
        self.window: int = int(manifest.get("window", 1))
        #: The model's inputs: ``features`` themselves, or their windowed statistics.
        self.model_features: tuple[str, ...] = derived_names(self.features, self.window)
        self.version: str = str(manifest["model_version"])
        self.default_detector: str = str(manifest.get("default_detector", ENSEMBLE))
        self.detector_names: tuple[str, ...] = (*members, ENSEMBLE)
        self.mean = preprocessor.mean
        self.std = preprocessor.std
        self._preprocessor = preprocessor
        self._members = members
        self._calibrations = calibrations
        self._ensemble = Ensemble({k: (d, calibrations[k]) for k, d in members.items()})
        #: What retraining would improve in this set (logged at start and at a reload).
        self.outdated: tuple[str, ...] = (
            ("its Isolation Forest was grown on the inputs themselves (format 2): "
             "retrain it (anomalyd train) for one that sees broken relations between "
             "sensors",)
            if manifest.get("format_version") == 2 and "isolation_forest" in members
            else ())

    def score(
        self,
        x: np.ndarray,
        detector: str,
        *,
        center: np.ndarray | None = None,
        scale: np.ndarray | None = None,
    ) -> BatchScores:
        """Score model inputs (n, D) in ``model_features`` order (the raw readings when
        ``window`` is 1); center/scale (n, D) per row."""
        calibration = self._calibrations[detector]  # KeyError for an unknown detector
        width = len(self.model_features)
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"expected shape (n, {width}), got {x.shape}")
        z = self._preprocessor.transform(x, center=center, scale=scale)
        members: dict[str, np.ndarray] | None = None
        if detector == ENSEMBLE:
            scores, members = self._ensemble.score(z)
        else:
            scores = self._members[detector].score(z)
        return BatchScores(
            detector=detector,
            scores=scores,
            is_anomaly=calibration.is_anomaly(scores),
            confidence=calibration.confidence(scores),
            margin=calibration.margin(scores),
            members=members,
            zscores=z,
        )

    def explain(
        self,
        values: np.ndarray,
        zscores: np.ndarray,
        *,
        center: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        is_anomaly: bool = True,
    ) -> Explanation:
        """Explain one row; pass the row's center/scale if it was scored against a baseline."""
        return explain_reading(
            self.model_features,
            values,
            zscores,
            self.mean if center is None else center,
            self.std if scale is None else scale,
            is_anomaly=is_anomaly,
        )

    def describe(self, default_detector: str) -> dict[str, Any]:
        """What ``/models`` shows: version, features, each detector's threshold and scores."""
        man = self.manifest
        return {
            "version": self.version,
            "features": list(self.features),
            "default_detector": default_detector,
            "trained_at": man.get("created_at"),
            "training": man.get("training"),
            "models": [
                {"name": name, "version": self.version,
                 "threshold": d.get("threshold"), "validation": d.get("validation")}
                for name, d in man.get("detectors", {}).items()
            ],
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: no manifest; is this a model directory?") from exc
    except PermissionError as exc:
        raise _unreadable(path, exc) from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMATS:
        raise ModelLoadError(
            f"{path}: unsupported manifest format (want one of {list(READABLE_FORMATS)})"
        )
    for key in ("model_version", "features", "artifacts", "preprocessor", "detectors"):
        if key not in manifest:
            raise ModelLoadError(f"{path}: manifest lacks {key!r}")
    return manifest


def _unreadable(path: Path, exc: PermissionError) -> ModelAccessError:
    return ModelAccessError(f"{path}: {exc.strerror}: let the user running anomalyd read the "
                            "model directory")


def check_not_writable_by_others(path: Path) -> None:
    """Refuse a file or directory that users other than us (or root) could have altered.

    A checksum in a manifest that others can rewrite proves nothing, so the directory, the
    manifest and every artifact must be owned by this user or root, and writable by no one
    else (group write is accepted only for this process's own group).
    """
    try:
        st = path.stat()
    except PermissionError as exc:
        raise _unreadable(path, exc) from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: {exc.strerror}") from exc
    if st.st_uid not in (0, os.geteuid()):
        raise ModelAccessError(f"{path}: owned by uid {st.st_uid}, not by this user or root; "
                               f"run chown {os.geteuid()} on it")
    if st.st_mode & stat.S_IWOTH:
        raise ModelAccessError(f"{path}: writable by every user; run chmod o-w on it")
    if st.st_mode & stat.S_IWGRP and st.st_gid != os.getegid():
        raise ModelAccessError(f"{path}: writable by group {st.st_gid}; run chmod g-w on it")


def verify_artifacts(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Check permissions and every listed artifact's SHA-256; refuse unlisted pickles."""
    listed: dict[str, str] = manifest["artifacts"]
    check_not_writable_by_others(model_dir)
    check_not_writable_by_others(model_dir / MANIFEST)
    for name, expected in listed.items():
        if Path(name).name != name or name in {"", ".", ".."}:
            raise ModelLoadError(f"artifact {name!r}: must be a plain file name")
        path = model_dir / name
        if not path.is_file():
            raise ModelLoadError(f"artifact {name}: missing from {model_dir}")
        check_not_writable_by_others(path)
        actual = sha256_file(path)
        if actual != expected:
            raise ModelLoadError(
                f"artifact {name}: SHA-256 {actual} does not match manifest {expected}"
            )


def _check_scores_a_row(name: str, detector: Detector, width: int) -> None:
    """Refuse at load, not at the first reading, a detector whose arrays do not fit the
    manifest's inputs (arrays of the right names and the wrong shapes)."""
    try:
        scores = detector.score(np.zeros((1, width)))
    except (ValueError, IndexError) as exc:
        raise ModelLoadError(f"{name}: cannot score a row of {width} inputs: {exc}") from exc
    if scores.shape != (1,) or not np.all(np.isfinite(scores)):
        raise ModelLoadError(f"{name}: a row of {width} inputs scores {scores!r}")


def load_bundle(model_dir: Path) -> ModelBundle:
    manifest = read_manifest(model_dir)
    verify_artifacts(model_dir, manifest)
    listed = manifest["artifacts"]
    if manifest["preprocessor"] not in listed:
        raise ModelLoadError(f"preprocessor {manifest['preprocessor']}: not a listed artifact")
    preprocessor = StandardScaler.load(model_dir / manifest["preprocessor"])
    width = len(derived_names(manifest["features"], int(manifest.get("window", 1))))
    if preprocessor.mean.shape != (width,):
        raise ModelLoadError("preprocessor width does not match the manifest's features")
    members: dict[str, Detector] = {}
    for kind in MEMBER_TYPES:
        if kind.name not in manifest["detectors"]:
            continue
        unlisted = [a for a in kind.artifact_names if a not in listed]
        if unlisted:
            raise ModelLoadError(f"{kind.name}: artifacts {unlisted} not in the manifest")
        members[kind.name] = kind.load(model_dir)
        _check_scores_a_row(kind.name, members[kind.name], width)
    if not members:
        raise ModelLoadError("manifest lists no known detector")
    if ENSEMBLE not in manifest["detectors"]:
        raise ModelLoadError("manifest has no ensemble calibration")
    unknown = set(manifest["detectors"]) - {*members, ENSEMBLE}
    if unknown:
        raise ModelLoadError(f"manifest lists unknown detectors {sorted(unknown)}")
    calibrations = {
        name: Calibration.from_dict(manifest["detectors"][name]) for name in (*members, ENSEMBLE)
    }
    return ModelBundle(manifest, preprocessor, members, calibrations)
