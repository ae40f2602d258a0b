"""One suite run against every detector, plus the Isolation Forest fast path's exactness."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor

from daemon.calibration import Calibration
from daemon.detectors import (
    AutoencoderDetector,
    Detector,
    Ensemble,
    IsolationForestDetector,
    LofDetector,
)
from daemon.preprocess import StandardScaler
from daemon.training.synthetic import generate_dataset

Factory = Callable[[int], Detector]
FACTORIES: dict[str, Factory] = {
    "isolation_forest": lambda seed: IsolationForestDetector(seed=seed),
    "lof": lambda seed: LofDetector(seed=seed, max_rows=1500),
    # few epochs: the suite checks behaviour, not the best reachable fit
    "autoencoder": lambda seed: AutoencoderDetector(seed=seed, max_epochs=15),
}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised normal training rows, and a labelled test set with 30 % faults."""
    train, _, _ = generate_dataset(3000, seed=10)
    test, labels, _ = generate_dataset(1500, seed=11, fault_fraction=0.3)
    scaler = StandardScaler.fit(train)
    return scaler.transform(train), scaler.transform(test), labels


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def fitted(request: pytest.FixtureRequest, data: tuple[np.ndarray, ...]) -> tuple[str, Detector]:
    name: str = request.param
    det = FACTORIES[name](7)
    det.fit(data[0])
    return name, det


def test_name_matches_registry(fitted: tuple[str, Detector]) -> None:
    name, det = fitted
    assert det.name == name


def test_faults_score_higher_than_normal(
    fitted: tuple[str, Detector], data: tuple[np.ndarray, ...]
) -> None:
    _, det = fitted
    _, test, labels = data
    assert roc_auc_score(labels, det.score(test)) > 0.9


def test_scores_are_finite_float64_vector(
    fitted: tuple[str, Detector], data: tuple[np.ndarray, ...]
) -> None:
    _, det = fitted
    extreme = np.vstack([data[1], np.full((1, 6), 50.0), np.full((1, 6), -50.0)])
    scores = det.score(extreme)
    assert scores.shape == (extreme.shape[0],)
    assert scores.dtype == np.float64
    assert np.isfinite(scores).all()


def test_single_row_equals_row_in_batch(
    fitted: tuple[str, Detector], data: tuple[np.ndarray, ...]
) -> None:
    _, det = fitted
    test = data[1][:200]
    batch = det.score(test)
    singles = np.array([det.score(test[i : i + 1])[0] for i in (0, 57, 199)])
    np.testing.assert_allclose(singles, batch[[0, 57, 199]], rtol=1e-12, atol=1e-12)


def test_same_seed_same_scores(fitted: tuple[str, Detector], data: tuple[np.ndarray, ...]) -> None:
    name, det = fitted
    again = FACTORIES[name](7)
    again.fit(data[0])
    np.testing.assert_array_equal(again.score(data[1]), det.score(data[1]))


def test_save_load_round_trip(
    fitted: tuple[str, Detector], data: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    _, det = fitted
    written = det.save(tmp_path)
    assert sorted(p.name for p in written) == sorted(det.artifact_names)
    loaded = type(det).load(tmp_path)
    np.testing.assert_array_equal(loaded.score(data[1]), det.score(data[1]))


def test_autoencoder_feature_errors_average_to_score(data: tuple[np.ndarray, ...]) -> None:
    w = [np.eye(6), np.zeros(6)]
    det = AutoencoderDetector.from_layers([(w[0], w[1])])  # identity: zero error
    assert np.all(det.score(data[1]) == 0)
    shifted = AutoencoderDetector.from_layers([(np.eye(6), np.array([0, 2.0, 0, 0, 0, 0]))])
    errors = shifted.feature_errors(data[1][:5])
    np.testing.assert_allclose(errors[:, 1], 4.0)
    np.testing.assert_allclose(shifted.score(data[1][:5]), 4.0 / 6)


@pytest.mark.parametrize("seed", [0, 3])
def test_isolation_forest_fast_path_equals_sklearn(seed: int, data: tuple[np.ndarray, ...]) -> None:
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(2000, 4)) * [1, 5, 0.1, 3]
    det = IsolationForestDetector(seed=seed)
    det.fit(train)
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed).fit(train)
    probe = np.vstack([rng.normal(size=(500, 4)) * 3, train[:100]])
    np.testing.assert_allclose(det.score(probe), -forest.score_samples(probe), atol=1e-9)
    # and on the synthetic pump data, where features are strongly correlated
    det.fit(data[0])
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed).fit(data[0])
    np.testing.assert_allclose(det.score(data[1]), -forest.score_samples(data[1]), atol=1e-9)


@pytest.mark.parametrize("neighbours", [20, 1])
def test_lof_served_from_arrays_equals_sklearn(
    neighbours: int, data: tuple[np.ndarray, ...]
) -> None:
    det = LofDetector(n_neighbors=neighbours, max_rows=10**6)
    det.fit(data[0])
    lof = LocalOutlierFactor(n_neighbors=neighbours, novelty=True).fit(data[0])
    np.testing.assert_allclose(det.score(data[1]), -lof.score_samples(data[1]), rtol=1e-12)


def test_ensemble_maps_member_median_to_zero_and_threshold_to_one() -> None:
    class Fixed:
        name = "fixed"
        artifact_names = ()

        def score(self, x: np.ndarray) -> np.ndarray:
            return np.asarray(x[:, 0], dtype=np.float64)

    a = Calibration(center=1.0, spread=0.5, threshold=3.0, quantile=0.99)
    b = Calibration(center=10.0, spread=1.0, threshold=20.0, quantile=0.99)
    ens = Ensemble({"a": (Fixed(), a), "b": (Fixed(), b)})  # type: ignore[dict-item]
    combined = ens.combine({"a": np.array([1.0, 3.0, 5.0]), "b": np.array([10.0, 20.0, 10.0])})
    np.testing.assert_allclose(combined, [0.0, 1.0, 1.0])
    scores, members = ens.score(np.array([[3.0]]))
    assert set(members) == {"a", "b"}
    np.testing.assert_allclose(scores, [(1.0 + (3 - 10) / 10) / 2])
