"""Per-device windows and warm-up baselines: what the model is fed, and that it persists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.devices import DeviceTracker, derived_names, windowed_matrix

G_CENTER = np.array([0.0, 0.0, 0.0, 0.0])
G_SCALE = np.array([1.0, 1.0, 1.0, 1.0])


def tracker(warmup: int = 5, window: int = 2) -> DeviceTracker:
    return DeviceTracker(2, window, warmup, G_CENTER, G_SCALE)


def test_window_names_keep_the_raw_names_with_spaces_and_capitals() -> None:
    assert derived_names(["Flow Rate", "T"], 1) == ("Flow Rate", "T")
    assert derived_names(["Flow Rate", "T"], 3) == (
        "Flow Rate [mean 3]",
        "T [mean 3]",
        "Flow Rate [std 3]",
        "T [std 3]",
    )


def test_streamed_rows_equal_the_offline_windowed_matrix_exactly() -> None:
    x = np.random.default_rng(0).normal(size=(30, 2)) * [3.0, 0.01] + [50.0, 1.0]
    t = tracker(warmup=0, window=4)
    streamed = np.array([t.observe("d", r.tolist()).row for r in x])
    assert np.array_equal(streamed, windowed_matrix(x, 4))  # bit for bit
    assert np.allclose(streamed[10, :2], x[7:11].mean(axis=0))
    assert np.allclose(streamed[10, 2:], x[7:11].std(axis=0))
    assert np.allclose(streamed[0, 2:], 0.0)  # a window of one reading at the start


def test_warm_up_is_judged_globally_then_against_the_devices_own_baseline() -> None:
    t = tracker(warmup=5, window=2)
    rng = np.random.default_rng(1)
    rows = rng.normal([100.0, 5.0], [2.0, 0.5], size=(8, 2))
    obs = [t.observe("pump", r.tolist()) for r in rows]
    assert [o.warming_up for o in obs] == [True] * 5 + [False] * 3
    assert all(o.center is G_CENTER for o in obs[:5])
    inputs = windowed_matrix(rows, 2)[:5]
    assert np.allclose(obs[5].center, inputs.mean(axis=0))
    assert np.allclose(obs[5].scale[:2], inputs.std(axis=0)[:2])
    assert obs[6].center is obs[5].center  # frozen: later readings do not move it
    assert t.progress("pump") == 5 and t.progress("other") == 0


def test_scale_is_floored_for_a_channel_that_sat_still_during_warm_up() -> None:
    t = tracker(warmup=3, window=1)
    for _ in range(3):
        t.observe("d", [32.0, 7.0])
    o = t.observe("d", [32.0, 7.0])
    assert np.allclose(o.scale[:2], [0.032, 0.007])  # 0.1 % of the level, not 0


def test_warmup_zero_disables_baselines() -> None:
    t = tracker(warmup=0)
    o = t.observe("d", [1.0, 2.0])
    assert not o.warming_up and not o.baseline and o.center is G_CENTER


def test_state_round_trips_through_json_and_continues_identically() -> None:
    rng = np.random.default_rng(2)
    a = tracker(warmup=4, window=3)
    for r in rng.normal(size=(6, 2)):
        a.observe("done", r.tolist())
    a.observe("half", [1.0, 1.0])
    b = tracker(warmup=4, window=3)
    assert b.restore(json.loads(json.dumps(a.to_json()))) == 2
    for r in rng.normal(size=(5, 2)):
        oa, ob = a.observe("done", r.tolist()), b.observe("done", r.tolist())
        assert np.array_equal(oa.row, ob.row) and np.array_equal(oa.center, ob.center)
        ha, hb = a.observe("half", r.tolist()), b.observe("half", r.tolist())
        assert ha.warming_up == hb.warming_up and np.array_equal(ha.row, hb.row)
    assert b.progress("half") == 4


def test_state_for_another_window_is_refused() -> None:
    saved = tracker(window=2).to_json()
    with pytest.raises(ValueError, match="window"):
        tracker(window=3).restore(saved)
