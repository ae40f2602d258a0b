"""Training: CSV loading rules, the Keras/numpy autoencoder agreement, manifests on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.detectors import AutoencoderDetector
from daemon.errors import TrainingError
from daemon.models import FORMAT_VERSION, load_bundle, sha256_file
from daemon.training.datasets import load_csv
from daemon.training.synthetic import generate_dataset
from daemon.training.train import fingerprint, train
from tests.broker import REPO

SKAB_FILE = Path("/work/shared/datasets/skab/valve1/0.csv")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_numpy_forward_pass_matches_keras() -> None:
    from daemon.training.keras_autoencoder import export_layers, fit_autoencoder

    x, _, _ = generate_dataset(600, seed=2)
    z = (x - x.mean(0)) / x.std(0)
    model = fit_autoencoder(z, seed=1, max_epochs=3)
    det = AutoencoderDetector.from_layers(export_layers(model))  # type: ignore[arg-type]
    keras_out = np.asarray(model(z.astype(np.float32)))
    np.testing.assert_allclose(det.reconstruct(z), keras_out, atol=1e-5)
    np.testing.assert_allclose(det.score(z), ((z - keras_out) ** 2).mean(axis=1), atol=1e-5)


def test_semicolon_csv_excludes_time_and_label_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "skab.csv",
        "datetime;Volume Flow RateRMS;Temperature;anomaly;changepoint\n"
        "2020-03-09 10:14:33;32.0;70.1;0.0;0.0\n"
        "2020-03-09 10:14:34;31.5;70.3;1.0;1.0\n",
    )
    data = load_csv(path)
    assert data.features == ("Volume Flow RateRMS", "Temperature")
    np.testing.assert_array_equal(data.X, [[32.0, 70.1], [31.5, 70.3]])
    assert data.labels is not None
    assert data.labels.tolist() == [False, True]


def test_comma_csv_with_unnamed_date_column_and_selected_features(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "plant.csv",
        "when,a,b,c\n2024-01-01T00:00:00,1,2,3\n2024-01-01T00:00:01,4,5,6\n",
    )
    data = load_csv(path, features=["c", "a"])
    assert data.features == ("c", "a")
    np.testing.assert_array_equal(data.X, [[3, 1], [6, 4]])
    assert data.labels is None
    assert load_csv(path).features == ("a", "b", "c")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("t,v\n1,2\n", "header"),
        ("v,w\n1,2\n3,oops\n", r"1 of 2 rows cannot be used: line 3: column 'w': not a number"),
        ("v,w\n1,\n2,x\n", r"line 2: column 'w': not a number: ''; line 3: column 'w': not "
                            r"a number: 'x'; no row is usable"),
        ("v,w\n1,\n2,\n", r"column\(s\) \['w'\] are empty in every row: leave them out of the "
                           r"file, or train on the others: --features 'v'"),
        ("v,w\n1,nan\n", r"line 2: column 'w': not finite"),
        ("v,w\n1,2,3\n", r"line 2: 3 cells, header has 2"),
    ],
)
def test_bad_csv_names_line_and_column(tmp_path: Path, body: str, message: str) -> None:
    if message == "header":
        body = "1,2\n3,4\n"
    with pytest.raises(TrainingError, match=message):
        load_csv(_write(tmp_path / "bad.csv", body))


def test_a_text_column_is_named_with_the_features_to_choose_instead(tmp_path: Path) -> None:
    path = _write(tmp_path / "status.csv", "temp,status,flow\n1,ok,2\n2,ok,3\n3,fault,4\n")
    with pytest.raises(TrainingError, match=r"column\(s\) \['status'\] hold text, not "
                       r"readings \(e\.g\. 'ok'\)\. .* --features 'temp,flow'"):
        load_csv(path)
    assert load_csv(path, features=["temp", "flow"]).features == ("temp", "flow")


def test_every_bad_row_is_counted_the_first_named_or_with_skip_left_out(tmp_path: Path) -> None:
    """A plant export with sensor dropouts: the error counts every bad row and names the
    first five (not just the first, so one round of fixing is enough); with
    ``skip_bad_rows`` the others are kept, labels still aligned to their rows."""
    rows = ["v,w,anomaly"] + [f"{i},{i + 0.5},{i % 2}" for i in range(20)]
    for i in (3, 5, 7, 9, 11, 13, 15):  # lines 5, 7, ... of the file
        rows[i + 1] = f"{i},,{i % 2}"
    path = _write(tmp_path / "gaps.csv", "\n".join(rows) + "\n")
    with pytest.raises(TrainingError) as err:
        load_csv(path)
    message = str(err.value)
    assert "7 of 20 rows cannot be used" in message
    assert "line 5: column 'w': not a number: ''; line 7:" in message
    assert "line 13:" in message and "line 15:" not in message and "and 2 more" in message
    assert "--skip-bad-rows leaves them out" in message
    data = load_csv(path, skip_bad_rows=True)
    kept = [i for i in range(20) if i not in (3, 5, 7, 9, 11, 13, 15)]
    np.testing.assert_array_equal(data.X[:, 0], kept)
    assert data.labels is not None
    np.testing.assert_array_equal(data.labels, [i % 2 == 1 for i in kept])
    assert len(data.skipped) == 7 and data.skipped[0] == "line 5: column 'w': not a number: ''"


def test_unknown_feature_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", "a,b\n1,2\n")
    with pytest.raises(TrainingError, match="no column"):
        load_csv(path, features=["nope"])


@pytest.mark.skipif(not SKAB_FILE.exists(), reason="SKAB dataset not present")
def test_loads_a_real_skab_file() -> None:
    data = load_csv(SKAB_FILE)
    assert "Volume Flow RateRMS" in data.features
    assert "datetime" not in data.features
    assert "anomaly" not in data.features
    assert data.labels is not None
    assert data.labels.any()
    assert data.X.shape == (data.labels.shape[0], 8)


def test_single_feature_csv_trains_and_scores_end_to_end(tmp_path: Path) -> None:
    from daemon.training.train import train_csv

    rng = np.random.default_rng(0)
    temps = 20 + rng.normal(0, 0.5, 400)
    labels = np.zeros(400, dtype=int)
    temps[-20:] += 8
    labels[-20:] = 1
    lines = ["timestamp,Temperature C,label"] + [
        f"2024-01-01T00:{i // 60:02d}:{i % 60:02d},{t:.3f},{lab}"
        for i, (t, lab) in enumerate(zip(temps, labels, strict=True))
    ]
    path = _write(tmp_path / "one.csv", "\n".join(lines) + "\n")
    manifest = train_csv(path, tmp_path / "model", seed=1)
    assert manifest["features"] == ["Temperature C"]
    assert manifest["training"]["rows"] == 380
    assert manifest["detectors"]["ensemble"]["validation"]["n_anomalous"] == 20
    bundle = load_bundle(tmp_path / "model")
    s = bundle.score(np.array([[20.1], [30.0]]), "ensemble")
    assert s.is_anomaly.tolist() == [False, True]
    assert "Temperature C 30.0 is" in bundle.explain(np.array([30.0]), s.zscores[1]).text


def test_manifest_describes_training_and_artifacts(trained_model_dir: Path) -> None:
    manifest = json.loads((trained_model_dir / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["default_detector"] == "ensemble"
    assert manifest["created_at"].endswith("Z")
    assert manifest["model_version"].split("-")[0].endswith("Z")
    assert set(manifest["library_versions"]) == {"numpy", "scikit-learn", "tensorflow", "python"}
    assert manifest["training"]["rows"] == 6000
    assert len(manifest["training"]["fingerprint"]) == 64
    for name, digest in manifest["artifacts"].items():
        assert sha256_file(trained_model_dir / name) == digest
    for name in ("isolation_forest", "lof", "autoencoder", "ensemble"):
        entry = manifest["detectors"][name]
        assert entry["center"] < entry["threshold"]
        assert entry["quantile"] == 0.99
        figures = entry["validation"]
        assert figures["n_anomalous"] > 0
        assert figures["far"] < 0.05
        assert figures["recall"] > (0.1 if name == "isolation_forest" else 0.9)
    # nothing but the model set itself: no temporary or backup directories left behind
    assert [p.name for p in trained_model_dir.parent.iterdir()] == ["default"]


def test_retraining_leaves_nothing_beside_the_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 2))
    out = tmp_path / "m"
    first = train(x, ["a", "b"], out, source="test", seed=0)
    second = train(x + 1, ["a", "b"], out, source="test", seed=0)
    assert first["training"]["fingerprint"] != second["training"]["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_bundle(out).version == second["model_version"]


def test_fingerprint_depends_on_data_and_feature_names() -> None:
    x = np.arange(6.0).reshape(3, 2)
    assert fingerprint(x, ["a", "b"]) == fingerprint(x.copy(), ["a", "b"])
    assert fingerprint(x, ["a", "b"]) != fingerprint(x, ["a", "c"])
    assert fingerprint(x, ["a", "b"]) != fingerprint(x + 1e-9, ["a", "b"])


@pytest.mark.parametrize(
    ("x", "features", "message"),
    [
        (np.ones((10, 2)), ["a", "b"], "at least 50 rows"),
        (np.ones((100, 2)), ["a"], "does not match"),
        (np.ones((100, 2)), ["a", "a"], "unique"),
        (np.full((100, 1), np.nan), ["a"], "NaN"),
    ],
)
def test_unusable_training_data_is_refused(
    tmp_path: Path, x: np.ndarray, features: list[str], message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        train(x, features, tmp_path / "m", source="test")
    assert not (tmp_path / "m").exists()


def test_retraining_replaces_the_model_set_in_place_and_leaves_other_files(
    tmp_path: Path,
) -> None:
    from daemon.models import load_bundle
    from daemon.training.train import train_default

    out = tmp_path / "models"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    first = train_default(out, rows=600, seed=1)
    second = train_default(out, rows=600, seed=2)
    assert first["model_version"] != second["model_version"]
    # the default ensemble: Isolation Forest and the autoencoder (LOF only when asked for)
    assert sorted(first["detectors"]) == ["autoencoder", "ensemble", "isolation_forest"]
    assert (out / "README.md").read_text() == "keep me"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert load_bundle(out).version == second["model_version"]


def test_a_model_set_of_chosen_detectors_fuses_only_those(tmp_path: Path) -> None:
    """--detectors: fewer members score faster; the ensemble is fitted and served from
    exactly the members named, and an unknown name is refused before any work."""
    x, _, _ = generate_dataset(1500, 3, fault_fraction=0.0)
    x_val, y_val, _ = generate_dataset(600, 4, fault_fraction=0.5)
    from daemon.training.synthetic import FEATURES

    manifest = train(x, FEATURES, tmp_path / "m", source="test", validation=(x_val, y_val),
                     detectors=["lof", "isolation_forest"])
    assert sorted(manifest["detectors"]) == ["ensemble", "isolation_forest", "lof"]
    assert not (tmp_path / "m" / AutoencoderDetector.artifact_names[0]).exists()
    bundle = load_bundle(tmp_path / "m")
    assert bundle.detector_names == ("isolation_forest", "lof", "ensemble")
    scored = bundle.score(x_val[:50], "ensemble")
    assert scored.members is not None and sorted(scored.members) == ["isolation_forest", "lof"]
    # real detection from the two members: most injected faults found, few false alarms
    assert manifest["detectors"]["ensemble"]["validation"]["recall"] >= 0.8
    assert manifest["detectors"]["ensemble"]["validation"]["far"] <= 0.05
    with pytest.raises(ValueError, match="detectors must be some of"):
        train(x, FEATURES, tmp_path / "n", source="test", detectors=["lof", "svm"])
    assert not (tmp_path / "n").exists()


def test_tensorflows_benign_native_notices_are_dropped_and_nothing_else(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """TensorFlow writes banner and tf.data notices straight to file descriptor 2; training
    drops exactly those, and passes on any other native output, also when the block fails."""
    from daemon.training.keras_autoencoder import native_notices_filtered

    benign = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to "
        b"STDERR\n",
        b"I0000 00:00:1795728368.762052    1918 port.cc:153] oneDNN custom operations are on."
        b" You may see slightly different numerical results\n",
        b"E0000 00:00:1795725008.217854   13734 node_def_util.cc:682] NodeDef mentions "
        b"attribute use_unbounded_threadpool which is not in the op definition\n",
    ]
    with native_notices_filtered():
        for line in benign:
            os.write(2, line)
        os.write(2, b"E0000 00:00:1.0 7 other.cc:1] a real native error\n")
    err = capfd.readouterr().err
    assert "a real native error" in err
    assert "oneDNN" not in err and "NodeDef" not in err and "absl" not in err

    def fails() -> None:
        with native_notices_filtered():
            os.write(2, b"F0000 fatal detail before the failure\n")
            raise RuntimeError("training failed")

    with pytest.raises(RuntimeError):
        fails()
    assert "fatal detail before the failure" in capfd.readouterr().err


def test_fitting_the_autoencoder_says_how_far_it_has_got() -> None:
    """On a day's recording of a plant an epoch alone can take minutes: the fit says which
    epoch it is in, how far into it, the losses, and how it ended."""
    x, _, _ = generate_dataset(600, seed=2)
    z = (x - x.mean(0)) / x.std(0)
    said: list[str] = []
    AutoencoderDetector(seed=1, max_epochs=3, progress_every_s=0).fit(z, progress=said.append)
    assert all(line.startswith("autoencoder: ") for line in said), said
    done = [line for line in said if " done, loss " in line]
    assert [line.split(" done")[0] for line in done] == [
        f"autoencoder: epoch {e} of at most 3" for e in (1, 2, 3)]
    assert any("epoch 1 of at most 3, " in line and "% of it" in line for line in said)
    assert said[-1].startswith("autoencoder: 3 epochs (")


def test_python_lines_pass_at_once_while_native_notices_are_held_back(tmp_path: Path) -> None:
    """Progress printed during a fit must be seen when it is printed, not after the fit:
    only what native code writes to file descriptor 2 is held back (and filtered)."""
    script = (
        "import os, sys\n"
        "from daemon.training.keras_autoencoder import native_notices_filtered\n"
        "with native_notices_filtered():\n"
        "    os.write(2, b'a native line\\n')\n"
        "    print('a progress line', file=sys.stderr, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln in ("a native line", "a progress line")]
    assert lines == ["a progress line", "a native line"]


def test_without_labelled_anomalies_only_the_false_alarm_rate_is_given(tmp_path: Path) -> None:
    """Held-back rows all normal: a detector's few flags are all false, so precision and
    F1 came out as 0.0 in the manifest and ``GET /models`` (a tester: "compare these
    between trainings" read as a detector that finds nothing). They are null, as recall."""
    from daemon.training.synthetic import FEATURES

    x, _, _ = generate_dataset(3000, 4, fault_fraction=0.0)
    manifest = train(x, FEATURES, tmp_path / "m", source="test",
                     detectors=["isolation_forest"])
    figures = manifest["detectors"]["ensemble"]["validation"]
    assert figures["n_anomalous"] == 0 and figures["far"] > 0  # some normal rows flagged
    assert figures["precision"] is None and figures["f1"] is None and figures["recall"] is None
