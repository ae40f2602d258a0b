"""Trained-model fixtures built with the real training code (registered from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.models import ModelBundle, load_bundle
from daemon.training.train import ALL_MEMBERS, train_default

#: Smaller than the default 20,000 rows so the session fixture stays well under 40 s.
FIXTURE_ROWS = 6000

NORMAL_READING = {
    "temperature": 45.3,
    "vibration": 2.8,
    "pressure": 6.5,
    "flow_rate": 152.0,
    "current": 87.5,
    "duty_cycle": 0.75,
}
ANOMALOUS_READING = {
    "temperature": 78.5,
    "vibration": 12.4,
    "pressure": 4.2,
    "flow_rate": 98.0,
    "current": 125.0,
    "duty_cycle": 0.95,
}


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic pump set, with every detector (LOF too, which the default
    ensemble leaves out) so that every detector is tested against a real broker."""
    out = tmp_path_factory.mktemp("models") / "default"
    train_default(out, rows=FIXTURE_ROWS, seed=0, detectors=ALL_MEMBERS)
    return out


@pytest.fixture(scope="session")
def model_bundle(trained_model_dir: Path) -> ModelBundle:
    return load_bundle(trained_model_dir)
