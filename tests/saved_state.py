"""A pipeline's per-device state as a restarted daemon finds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import state
from daemon.pipeline import Pipeline


def saved_and_loaded(p: Pipeline, folder: Path) -> dict[str, Any]:
    """The fleet's state written to a file under ``folder`` and read back."""
    path = folder / "devices.json"
    state.save(path, p.fleet.snapshot())
    snapshot = state.load(path)
    assert snapshot is not None
    return snapshot
