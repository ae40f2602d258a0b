"""Which layout the device commands talk to (``daemon.layout``): the one the state
directory's ``layout.json`` records, written by the running daemon's supervisor."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import layout, state
from daemon.config import ServiceConfig, Settings, StateConfig


def _settings(directory: Path, workers: int = 1) -> Settings:
    return Settings(service=ServiceConfig(workers=workers), state=StateConfig(dir=directory))


def test_the_recorded_layout_wins_over_the_configuration_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORKERS", raising=False)
    state.repartition(tmp_path, 2, "device")  # as the supervisor of 2 workers writes it
    found, note = layout.running(_settings(tmp_path))
    assert found == layout.Layout(2, "device")
    assert note is not None and "runs 2 workers with device dispatch (layout.json)" in note
    assert "this configuration says 1 process (WORKERS is not set here)" in note
    monkeypatch.setenv("WORKERS", "3")
    assert "(WORKERS=3 here)" in str(layout.running(_settings(tmp_path, 3))[1])
    assert layout.running(_settings(tmp_path, 2)) == (layout.Layout(2, "device"), None)


def test_owner_only_under_device_dispatch() -> None:
    assert layout.Layout(1, "single").owner("p-1") is None
    assert layout.Layout(2, "shared").owner("p-1") is None
    assert {layout.Layout(2, "device").owner(f"p-{k}") for k in range(20)} == {0, 1}


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'{"workers": 2}', b'{"workers": 0, "dispatch": "single"}',
    b'{"workers": 2, "dispatch": "single"}', b'{"workers": 1, "dispatch": "device"}',
    b'{"workers": "2", "dispatch": "device"}', b'{"workers": 65, "dispatch": "device"}',
])
def test_a_missing_or_malformed_record_leaves_the_configuration(
    tmp_path: Path, body: bytes
) -> None:
    assert layout.running(_settings(tmp_path, 2)) == (layout.Layout(2, "device"), None)
    (tmp_path / state.LAYOUT_FILE).write_bytes(body)
    assert layout.recorded(tmp_path) is None
    assert layout.running(_settings(tmp_path, 2)) == (layout.Layout(2, "device"), None)


def test_a_single_daemons_record_is_read_back(tmp_path: Path) -> None:
    state.repartition(tmp_path, 1, "device")  # what one daemon (WORKERS=1) writes
    found, note = layout.running(_settings(tmp_path, 2))
    assert found == layout.Layout(1, "single")
    assert note is not None and "runs 1 process" in note
