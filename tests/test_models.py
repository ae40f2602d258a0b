"""Loading a model directory: verification, scoring verdicts, calibration, explanations."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.calibration import Calibration
from daemon.detectors.base import load_arrays, save_arrays
from daemon.errors import ModelLoadError, TrainingError
from daemon.explain import NORMAL_TEXT, explain_batch
from daemon.models import FORMAT_VERSION, ModelBundle, load_bundle, sha256_file
from daemon.preprocess import StandardScaler
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING


def _row(bundle: ModelBundle, reading: dict[str, float]) -> np.ndarray:
    return np.array([[reading[f] for f in bundle.features]])


@pytest.fixture
def model_copy(trained_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_model_dir, tmp_path / "model"))


def test_bundle_exposes_manifest_facts(model_bundle: ModelBundle) -> None:
    assert model_bundle.detector_names == ("isolation_forest", "lof", "autoencoder", "ensemble")
    assert model_bundle.default_detector == "ensemble"
    assert model_bundle.version == model_bundle.manifest["model_version"]
    assert model_bundle.features[1] == "vibration"
    assert model_bundle.mean.shape == model_bundle.std.shape == (6,)


@pytest.mark.parametrize("detector", ["isolation_forest", "lof", "autoencoder", "ensemble"])
def test_reference_readings_judged_right(model_bundle: ModelBundle, detector: str) -> None:
    normal = model_bundle.score(_row(model_bundle, NORMAL_READING), detector)
    bad = model_bundle.score(_row(model_bundle, ANOMALOUS_READING), detector)
    assert not normal.is_anomaly[0]
    assert normal.margin[0] < 0
    assert bad.is_anomaly[0]
    assert bad.margin[0] > 0
    for s in (normal, bad):
        assert s.detector == detector
        assert 0 <= s.confidence[0] <= 1  # 1.0 only by rounding, far beyond the threshold
        assert (s.members is not None) == (detector == "ensemble")


def test_ensemble_returns_member_scores(model_bundle: ModelBundle) -> None:
    x = _row(model_bundle, ANOMALOUS_READING)
    s = model_bundle.score(x, "ensemble")
    assert s.members is not None
    for name, member_scores in s.members.items():
        np.testing.assert_allclose(member_scores, model_bundle.score(x, name).scores)


def test_explanation_names_vibration_first(model_bundle: ModelBundle) -> None:
    s = model_bundle.score(_row(model_bundle, ANOMALOUS_READING), "ensemble")
    exp = model_bundle.explain(_row(model_bundle, ANOMALOUS_READING)[0], s.zscores[0])
    top = exp.contributions[0]
    assert top.feature == "vibration"
    assert top.direction == "high"
    assert top.deviation_sigma > 10
    assert 1 <= len(exp.contributions) <= 3
    assert exp.text.startswith("vibration 12.4 is ")
    assert "σ above normal" in exp.text
    assert exp.to_dict()["contributions"][0]["feature"] == "vibration"


def test_normal_reading_explained_as_normal(model_bundle: ModelBundle) -> None:
    s = model_bundle.score(_row(model_bundle, NORMAL_READING), "ensemble")
    exp = model_bundle.explain(
        _row(model_bundle, NORMAL_READING)[0], s.zscores[0], is_anomaly=False
    )
    assert exp.text == NORMAL_TEXT
    assert exp.contributions == ()


def test_anomaly_without_large_deviation_is_an_unusual_combination() -> None:
    z = np.array([[1.5, -0.5, 0.2]])
    [exp] = explain_batch(("a", "b", "c"), z, z, np.zeros(3), np.ones(3), np.array([True]))
    assert exp.text.startswith("unusual combination")
    assert [c.feature for c in exp.contributions] == ["a"]


def test_explanations_rank_by_absolute_deviation_and_cap_at_three() -> None:
    values = np.array([[10.0, -30.0, 5.0, 25.0, 0.0]])
    center, scale = np.zeros(5), np.full(5, 5.0)
    [exp] = explain_batch(list("abcde"), values, values / scale, center, scale, np.array([True]))
    assert [(c.feature, c.direction) for c in exp.contributions] == [
        ("b", "low"),
        ("d", "high"),
        ("a", "high"),
    ]
    assert "b -30.0 is 6.0σ below normal (0.00 ± 5.00)" in exp.text


def test_per_row_center_scale_override(model_bundle: ModelBundle) -> None:
    x = np.vstack([_row(model_bundle, NORMAL_READING)] * 2)
    center = np.vstack([model_bundle.mean, x[1]])
    scale = np.vstack([model_bundle.std, model_bundle.std * 2])
    s = model_bundle.score(x, "ensemble", center=center, scale=scale)
    plain = model_bundle.score(x[:1], "ensemble")
    np.testing.assert_allclose(s.zscores[0], plain.zscores[0])
    np.testing.assert_allclose(s.zscores[1], 0.0)
    # a device whose baseline puts this reading far away flags it
    far = model_bundle.score(x[:1], "ensemble", center=x[:1] - 10 * model_bundle.std)
    assert far.is_anomaly[0]
    assert not plain.is_anomaly[0]


def test_large_batch_matches_single_rows(model_bundle: ModelBundle) -> None:
    rng = np.random.default_rng(5)
    x = model_bundle.mean + rng.normal(size=(10_000, 6)) * model_bundle.std
    s = model_bundle.score(x, "ensemble")
    assert s.scores.shape == (10_000,)
    assert s.zscores.shape == (10_000, 6)
    one = model_bundle.score(x[1234:1235], "ensemble")
    np.testing.assert_allclose(one.scores, s.scores[1234:1235], rtol=1e-10)


def test_unknown_detector_is_refused(model_bundle: ModelBundle) -> None:
    with pytest.raises(KeyError):
        model_bundle.score(_row(model_bundle, NORMAL_READING), "prophet")


@pytest.mark.parametrize(
    "artifact", ["preprocessor.json", "isolation_forest.npz", "lof.npz", "autoencoder.npz"]
)
def test_altered_artifact_is_refused(model_copy: Path, artifact: str) -> None:
    path = model_copy / artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=artifact):
        load_bundle(model_copy)


@pytest.mark.parametrize("artifact", ["preprocessor.json", "lof.npz", "autoencoder.npz"])
def test_missing_artifact_is_refused(model_copy: Path, artifact: str) -> None:
    (model_copy / artifact).unlink()
    with pytest.raises(ModelLoadError, match=f"{artifact}: missing"):
        load_bundle(model_copy)


def test_no_pickle_is_ever_loaded(model_copy: Path) -> None:
    # unpickling this file would create a marker file; nothing may unpickle anything
    marker = model_copy / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (model_copy / "extra.joblib").write_bytes(payload)
    assert all(not name.endswith((".joblib", ".pkl", ".pickle"))
               for name in json.loads((model_copy / "manifest.json").read_text())["artifacts"])
    load_bundle(model_copy)
    assert not marker.exists()


def test_manifest_cannot_point_outside_the_directory(model_copy: Path) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["artifacts"]["../lof.npz"] = "0" * 64
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="plain file name"):
        load_bundle(model_copy)


def _rewrite_artifact(model_dir: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Replace an artifact and its checksum: a set altered by its owner, not corrupted."""
    save_arrays(model_dir / name, arrays)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["artifacts"][name] = sha256_file(model_dir / name)
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


def test_forest_rotation_of_another_width_is_refused_at_load(model_copy: Path) -> None:
    arrays = load_arrays(model_copy / "isolation_forest.npz")
    width = arrays["rotation"].shape[0]
    wider = np.eye(width + 2)
    _rewrite_artifact(model_copy, "isolation_forest.npz", {**arrays, "rotation": wider})
    with pytest.raises(ModelLoadError, match=f"isolation_forest: cannot score a row of {width}"):
        load_bundle(model_copy)


@pytest.mark.parametrize("version", [2, 3])
def test_model_sets_of_format_2_and_3_load(model_copy: Path, version: int) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3
    manifest["format_version"] = version
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(model_copy)
    assert bundle.manifest["format_version"] == version
    # a format 2 set is served, with the advice to retrain its forest
    assert bool(bundle.outdated) == (version == 2)
    assert all("retrain" in advice for advice in bundle.outdated)


@pytest.mark.parametrize("version", [1, 4, "3", None])
def test_model_sets_of_other_formats_are_refused(model_copy: Path, version: object) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["format_version"] = version
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="unsupported manifest format"):
        load_bundle(model_copy)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no manifest"):
        load_bundle(tmp_path)


def test_serving_imports_neither_tensorflow_nor_scikit_learn(trained_model_dir: Path) -> None:
    """Both are for training: importing them would cost seconds of start-up and memory."""
    code = (
        "import sys, pathlib, numpy as np, daemon.models as m, daemon.service\n"
        f"b = m.load_bundle(pathlib.Path({str(trained_model_dir)!r}))\n"
        "b.score(np.array([b.mean]), 'ensemble')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "assert 'sklearn' not in sys.modules, 'scikit-learn was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_calibration_quantities() -> None:
    normal = np.arange(101, dtype=np.float64)  # 0..100
    cal = Calibration.from_scores(normal, quantile=0.9)
    assert cal.center == 50.0
    assert cal.spread == 50.0
    assert cal.threshold == 90.0
    scores = np.array([90.0, 140.0, 40.0])
    np.testing.assert_allclose(cal.margin(scores), [0.0, 1.0, -1.0])
    np.testing.assert_allclose(cal.confidence(scores), [0.0, 1 - np.exp(-1), 1 - np.exp(-1)])
    assert cal.is_anomaly(scores).tolist() == [False, True, False]
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_calibration_floors_a_zero_spread() -> None:
    cal = Calibration.from_scores(np.ones(50))
    assert cal.spread > 0
    assert np.isfinite(cal.margin(np.array([2.0]))).all()
    with pytest.raises(TrainingError):
        Calibration.from_scores(np.ones(50), quantile=1.0)


def test_scaler_json_round_trip_and_std_floor(tmp_path: Path) -> None:
    x = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    scaler = StandardScaler.fit(x)
    assert scaler.std[1] > 0
    loaded = StandardScaler.load(scaler.save(tmp_path / "p.json"))
    np.testing.assert_array_equal(loaded.transform(x), scaler.transform(x))
    assert np.isfinite(loaded.transform(x)).all()


def test_wrong_width_is_refused(model_bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        model_bundle.score(np.zeros((2, 5)), "ensemble")


@pytest.mark.parametrize("target", ["dir", "manifest.json", "lof.npz"])
def test_model_files_writable_by_others_are_refused(model_copy: Path, target: str) -> None:
    path = model_copy if target == "dir" else model_copy / target
    path.chmod(path.stat().st_mode | 0o002)
    with pytest.raises(ModelLoadError, match="writable by every user"):
        load_bundle(model_copy)


def test_contribution_to_dict_carries_every_field() -> None:
    from dataclasses import asdict

    from daemon.explain import Contribution

    c = Contribution("Volume Flow RateRMS", 21.5, 32.0, 0.4, -26.2, "low")
    assert c.to_dict() == asdict(c)


def test_a_value_is_written_no_finer_than_the_normal_it_is_set_against() -> None:
    from daemon.explain import Contribution

    # a window of identical readings: its spread is 0 give or take floating-point noise
    noise = Contribution("Voltage [std 10]", 2.84e-14, 0.52, 0.12, -4.2, "low")
    assert noise.describe() == "Voltage [std 10] 0.000 is 4.2σ below normal (0.520 ± 0.120)"
    small = Contribution("t", 0.00123, 0.00100, 0.0001, 2.3, "high")
    assert small.describe() == "t 0.00123 is 2.3σ above normal (0.00100 ± 0.00010)"
