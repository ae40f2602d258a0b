"""Isolation Forest trained by scikit-learn, served from flat numpy arrays.

scikit-learn's ``score_samples`` walks each tree in Python-level loops (~7 ms for one
reading). After fitting, the trees are flattened into padded (n_trees, n_nodes) arrays and
all trees are walked at once, ``max_depth`` steps of fancy indexing; leaves point to
themselves so rows that arrive early just stay put. Each leaf stores its full path length
(depth + c(samples in leaf)), so the score is one gather and a mean. The result equals
``-IsolationForest.score_samples``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

from daemon.detectors.base import Matrix, Progress, Vector, load_arrays, save_arrays
from daemon.errors import ModelLoadError

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

_EULER_GAMMA = 0.5772156649015329
_CHUNK = 512
#: Weight of the identity in the shrunk correlation matrix the rotation comes from: the
#: smallest axis is scaled up at most 1/sqrt(0.01) = 10 times, so a near-constant
#: combination of inputs does not turn rounding noise into anomalies.
SHRINKAGE = 0.01


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): mean path length of an unsuccessful search in a binary search tree of n keys."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    m = n[big]
    out[big] = 2.0 * (np.log(m - 1.0) + _EULER_GAMMA) - 2.0 * (m - 1.0) / m
    return out


class IsolationForestDetector:
    name: ClassVar[str] = "isolation_forest"
    artifact_names: ClassVar[tuple[str, ...]] = ("isolation_forest.npz",)

    def __init__(self, seed: int = 0, n_estimators: int = 100, max_samples: int = 256) -> None:
        self.seed = seed
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self._arrays: dict[str, np.ndarray] | None = None

    def fit(self, x: Matrix, progress: Progress | None = None) -> None:
        del progress  # a few hundred milliseconds whatever the rows: nothing to report
        # Imported here: serving never fits, and scikit-learn's import costs ~1 s of start-up.
        from sklearn.ensemble import IsolationForest

        rotation = principal_rotation(x)
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, x.shape[0]),
            random_state=self.seed,
        ).fit(x @ rotation)
        self._arrays = _with_children({**flatten_forest(forest), "rotation": rotation})

    def score(self, x: Matrix) -> Vector:
        a = self._require()
        rotation = a.get("rotation")
        if rotation is not None:
            x = np.asarray(x, dtype=np.float64) @ rotation
        # sklearn compares float32 features with float64 thresholds; do the same so the
        # scores agree bit for bit at split boundaries.
        x = np.ascontiguousarray(x, dtype=np.float32).astype(np.float64)
        # (n_trees, rows) index arrays stay cache-sized in chunks: ~30 % faster at 10k rows
        parts = [self._mean_paths(a, x[i : i + _CHUNK]) for i in range(0, x.shape[0], _CHUNK)]
        mean_path = np.concatenate(parts) if parts else np.empty(0)
        return np.asarray(np.exp2(-mean_path / float(a["c_max_samples"])), dtype=np.float64)

    @staticmethod
    def _mean_paths(a: dict[str, np.ndarray], x: Matrix) -> Vector:
        n_trees, n_nodes = a["feature"].shape
        n, d = x.shape
        flat_x = x.ravel()
        row_offset = (np.arange(n) * d)[None, :]
        node = np.repeat((np.arange(n_trees) * n_nodes)[:, None], n, axis=1)
        feature, threshold = a["feature"].ravel(), a["threshold"].ravel()
        children = a["children"]
        for _ in range(int(a["max_depth"])):
            go_right = flat_x[row_offset + feature[node]] > threshold[node]
            node = children[2 * node + go_right]
        return np.asarray(a["path_length"].ravel()[node].mean(axis=0), dtype=np.float64)

    def save(self, directory: Path) -> list[Path]:
        stored = {k: v for k, v in self._require().items() if k in _KEYS + _OPTIONAL}
        return [save_arrays(directory / self.artifact_names[0], stored)]

    @classmethod
    def load(cls, directory: Path) -> Self:
        path = directory / cls.artifact_names[0]
        arrays = load_arrays(path, _KEYS)
        rotation = arrays.get("rotation")
        d = int(arrays["feature"].max()) + 1 if arrays["feature"].size else 0
        if rotation is not None and (
            rotation.ndim != 2
            or rotation.shape[0] != rotation.shape[1]
            or rotation.shape[0] < d
            or not np.all(np.isfinite(rotation))
        ):
            raise ModelLoadError(f"{path.name}: rotation of shape {rotation.shape} is unusable")
        det = cls()
        det._arrays = _with_children(arrays)
        return det

    def _require(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise RuntimeError("IsolationForestDetector used before fit() or load()")
        return self._arrays


_KEYS = ("feature", "threshold", "left", "right", "path_length", "max_depth", "c_max_samples")
_OPTIONAL = ("rotation",)  # absent in model sets trained before it


def principal_rotation(x: Matrix) -> Matrix:
    """(d, d) matrix turning standardised inputs to unit-variance principal axes.

    From the inputs' correlation matrix shrunk towards the identity (``SHRINKAGE``); the
    axes are ordered and signed deterministically, so the same rows give the same matrix.
    """
    d = x.shape[1]
    corr = np.atleast_2d(np.cov(x, rowvar=False)) if x.shape[0] > 1 else np.eye(d)
    spread = np.sqrt(np.clip(np.diag(corr), 1e-12, None))
    corr = corr / np.outer(spread, spread)
    corr = (1.0 - SHRINKAGE) * corr + SHRINKAGE * np.eye(d)
    variances, axes = np.linalg.eigh(corr)
    # eigh's sign per axis is arbitrary: make each axis's largest entry positive
    signs = np.sign(axes[np.argmax(np.abs(axes), axis=0), np.arange(d)])
    axes = axes * np.where(signs == 0, 1.0, signs)
    return np.asarray(axes / np.sqrt(variances), dtype=np.float64)


def _with_children(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add ``children``: [2 * node] is the left child, [2 * node + 1] the right one.

    The walk then does one gather per level instead of two and a select (inputs are
    finite, so "not <=" is ">"): ~35 % faster for a 512-row chunk.
    """
    children = np.stack([arrays["left"].ravel(), arrays["right"].ravel()], axis=1).ravel()
    return {**arrays, "children": children}


def flatten_forest(forest: IsolationForest) -> dict[str, np.ndarray]:
    """Pack a fitted forest into padded arrays with global (tree-offset) child indices."""
    trees = [est.tree_ for est in forest.estimators_]
    n_trees = len(trees)
    n_nodes = max(t.node_count for t in trees)
    feature = np.zeros((n_trees, n_nodes), dtype=np.intp)
    threshold = np.zeros((n_trees, n_nodes), dtype=np.float64)
    path_length = np.zeros((n_trees, n_nodes), dtype=np.float64)
    own = np.arange(n_trees * n_nodes, dtype=np.intp).reshape(n_trees, n_nodes)
    left, right = own.copy(), own.copy()
    max_depth = 0
    for i, (tree, features) in enumerate(zip(trees, forest.estimators_features_, strict=True)):
        k = tree.node_count
        is_split = tree.children_left[:k] != -1
        base = i * n_nodes
        # leaves carry feature -2; give them a valid column, their children are themselves
        feature[i, :k] = np.asarray(features)[np.where(is_split, tree.feature[:k], 0)]
        threshold[i, :k] = tree.threshold[:k]
        left[i, :k] = np.where(is_split, tree.children_left[:k] + base, own[i, :k])
        right[i, :k] = np.where(is_split, tree.children_right[:k] + base, own[i, :k])
        depth = _node_depths(tree.children_left[:k], tree.children_right[:k])
        path_length[i, :k] = depth + average_path_length(tree.n_node_samples[:k])
        max_depth = max(max_depth, int(depth.max()))
    c_max = average_path_length(np.array([forest.max_samples_]))[0]
    return {
        "feature": feature,
        "threshold": threshold,
        "left": left,
        "right": right,
        "path_length": path_length,
        "max_depth": np.array(max_depth),
        "c_max_samples": np.array(c_max),
    }


def _node_depths(children_left: np.ndarray, children_right: np.ndarray) -> np.ndarray:
    depth = np.zeros(children_left.shape[0], dtype=np.float64)
    # sklearn numbers nodes depth-first, so every parent precedes its children.
    for node in range(children_left.shape[0]):
        if children_left[node] != -1:
            depth[children_left[node]] = depth[children_right[node]] = depth[node] + 1
    return depth
