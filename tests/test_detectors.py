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
from daemon.detectors.base import load_arrays, save_arrays
from daemon.detectors.isolation_forest import (
    SHRINKAGE,
    flatten_forest,
    principal_rotation,
)
from daemon.errors import ModelLoadError
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


def test_most_faults_found_at_one_percent_of_normal_readings_flagged(
    fitted: tuple[str, Detector], data: tuple[np.ndarray, ...]
) -> None:
    """Most synthetic pump faults break a relation between sensors (flow, current and
    pressure follow the duty cycle) more than they leave a sensor's range. A threshold at
    the 99th percentile of normal scores must still find most of them."""
    _, det = fitted
    _, test, labels = data
    scores = det.score(test)
    threshold = np.quantile(det.score(data[0]), 0.99)
    recall = float(np.mean(scores[labels] > threshold))
    assert recall > 0.8, recall


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
    """The served forest scores exactly as scikit-learn's forest grown on the rotated inputs."""
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(2000, 4)) * [1, 5, 0.1, 3]
    det = IsolationForestDetector(seed=seed)
    det.fit(train)
    turn = principal_rotation(train)
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed)
    forest.fit(train @ turn)
    probe = np.vstack([rng.normal(size=(500, 4)) * 3, train[:100]])
    np.testing.assert_allclose(det.score(probe), -forest.score_samples(probe @ turn), atol=1e-9)
    # and on the synthetic pump data, where features are strongly correlated
    det.fit(data[0])
    turn = principal_rotation(data[0])
    forest = IsolationForest(n_estimators=100, max_samples=256, random_state=seed)
    forest.fit(data[0] @ turn)
    np.testing.assert_allclose(
        det.score(data[1]), -forest.score_samples(data[1] @ turn), atol=1e-9
    )


def test_principal_rotation_whitens_and_is_deterministic() -> None:
    rng = np.random.default_rng(5)
    duty = rng.normal(size=3000)
    x = np.column_stack([duty, duty + 0.1 * rng.normal(size=3000), rng.normal(size=3000)])
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    turn = principal_rotation(x)
    cov = np.cov(x @ turn, rowvar=False)
    # uncorrelated axes; unit variance but for the shrinkage towards the identity, which
    # keeps the thin axis (duty against duty plus noise) from being scaled up fully
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-9)
    true = np.linalg.eigvalsh(np.corrcoef(x, rowvar=False))
    expected = true / ((1 - SHRINKAGE) * true + SHRINKAGE)
    # (x has population variance 1; np.cov divides by n - 1)
    np.testing.assert_allclose(np.diag(cov), expected * 3000 / 2999, rtol=1e-9)
    assert expected[0] < 0.5 < 0.99 < expected[1]
    np.testing.assert_array_equal(principal_rotation(x.copy()), turn)
    # a constant input is not scaled up without bound
    flat = np.column_stack([x, np.zeros(3000)])
    assert np.abs(principal_rotation(flat)).max() <= 10.0 + 1e-9


def test_isolation_forest_of_an_older_model_set_scores_unrotated(tmp_path: Path) -> None:
    """A set trained before the rotation has none in its arrays: its scores are unchanged."""
    rng = np.random.default_rng(2)
    train = rng.normal(size=(1000, 3))
    forest = IsolationForest(n_estimators=50, max_samples=256, random_state=2).fit(train)
    save_arrays(tmp_path / "isolation_forest.npz", flatten_forest(forest))
    loaded = IsolationForestDetector.load(tmp_path)
    probe = rng.normal(size=(200, 3)) * 2
    np.testing.assert_allclose(loaded.score(probe), -forest.score_samples(probe), atol=1e-9)


@pytest.mark.parametrize(
    "rotation",
    [np.eye(2), np.ones((3, 2)), np.full((3, 3), np.nan)],
    ids=["narrow", "oblong", "nan"],
)
def test_isolation_forest_with_an_unusable_rotation_is_refused(
    rotation: np.ndarray, tmp_path: Path
) -> None:
    det = IsolationForestDetector(seed=1, n_estimators=10)
    det.fit(np.random.default_rng(1).normal(size=(300, 3)))
    det.save(tmp_path)
    arrays = load_arrays(tmp_path / "isolation_forest.npz")
    assert arrays["rotation"].shape == (3, 3)
    save_arrays(tmp_path / "isolation_forest.npz", {**arrays, "rotation": rotation})
    with pytest.raises(ModelLoadError, match="rotation"):
        IsolationForestDetector.load(tmp_path)


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
