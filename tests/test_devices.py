"""Per-device windows and baselines: what the model is fed, what the baseline flags, and that
it persists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daemon.devices import (
    ADAPT_READINGS,
    MIN_THRESHOLD,
    Assessment,
    DeviceTracker,
    derived_names,
    windowed_matrix,
)

G_CENTER = np.array([0.0, 0.0, 0.0, 0.0])
G_SCALE = np.array([1.0, 1.0, 1.0, 1.0])


def tracker(warmup: int = 8, window: int = 2, n: int = 2) -> DeviceTracker:
    """A tracker whose global scale is too small to floor anything."""
    width = n if window == 1 else 2 * n
    return DeviceTracker(n, window, warmup, np.zeros(width), np.full(width, 1e-3))


def feed(
    t: DeviceTracker, dev: str, x: np.ndarray, global_anomaly: bool = True
) -> list[Assessment]:
    """Stream rows of one device; the global model's verdict is the same for every row."""
    return [t.assess(dev, t.observe(dev, r.tolist()), global_anomaly) for r in x]


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
    t = DeviceTracker(2, 4, 0, G_CENTER, G_SCALE)
    streamed = np.array([t.observe("d", r.tolist()) for r in x])
    assert np.array_equal(streamed, windowed_matrix(x, 4))  # bit for bit
    assert np.allclose(streamed[10, :2], x[7:11].mean(axis=0))
    assert np.allclose(streamed[10, 2:], x[7:11].std(axis=0))
    assert np.allclose(streamed[0, 2:], 0.0)  # a window of one reading at the start


def test_warm_up_fits_on_three_quarters_and_sets_the_threshold_on_the_rest() -> None:
    t = tracker(warmup=8, window=1)
    rows = np.random.default_rng(1).normal([100.0, 5.0], [2.0, 0.5], size=(10, 2))
    got = feed(t, "pump", rows)
    assert [a.warming_up for a in got] == [True] * 8 + [False] * 2
    assert not any(a.active for a in got[:8]) and got[8].active
    st = t.devices["pump"]
    assert st.scale is not None and np.allclose(st.scale, rows[:6].std(axis=0))
    assert st.threshold == max(MIN_THRESHOLD, 1.5 * st.held_back_max)
    assert t.progress("pump") == 8 and t.progress("other") == 0


def test_scale_is_floored_for_a_channel_that_sat_still_during_warm_up() -> None:
    t = tracker(warmup=4, window=1)
    feed(t, "d", np.array([[32.0, 7.0]] * 4))
    scale = t.devices["d"].scale
    assert scale is not None and np.allclose(scale, [0.032, 0.007])  # 0.1 % of the level


def test_scale_is_floored_at_a_fraction_of_the_global_models_scale() -> None:
    t = DeviceTracker(1, 1, 4, np.zeros(1), np.array([10.0]))
    feed(t, "d", np.array([[0.0]] * 4))
    scale = t.devices["d"].scale
    assert scale is not None and scale[0] == pytest.approx(0.5)  # 5 % of 10


def test_warmup_zero_disables_baselines() -> None:
    t = DeviceTracker(2, 2, 0, G_CENTER, G_SCALE)
    a = t.assess("d", t.observe("d", [1.0, 2.0]), True)
    assert not a.warming_up and not a.active


def test_slow_drift_is_followed_but_a_step_is_flagged_for_as_long_as_it_lasts() -> None:
    """Channel 0 drifts by 0.02σ per reading throughout (a warming motor); channel 1 steps
    down by 8σ for 300 readings (a valve closing), then comes back."""
    rng = np.random.default_rng(3)
    n, warmup = 1500, 400
    x = rng.normal(size=(n, 2))
    x[:, 0] += 0.02 * np.arange(n)
    fault = slice(900, 1200)
    x[fault, 1] -= 8.0
    t = tracker(warmup=warmup, window=5)
    flags = np.array([a.is_anomaly for a in feed(t, "d", x)])
    normal = np.ones(n, dtype=bool)
    normal[:warmup] = normal[fault] = False
    normal[1200:1210] = False  # the window still holds fault readings
    assert flags[normal].mean() <= 0.02  # the drift (30σ by the end) is not an anomaly
    assert flags[fault][10:].mean() >= 0.95  # frozen: the step stays an anomaly
    # a frozen baseline (the previous design) would flag the drift almost everywhere
    frozen_far = np.mean(np.abs(x[normal, 0] - x[: warmup, 0].mean()) > 3 * x[:warmup, 0].std())
    assert frozen_far > 0.5


def test_an_input_that_breaks_its_relation_to_the_others_is_flagged() -> None:
    """Two inputs that move together (flow and current of a pump changing duty): both
    moving is normal, one moving alone is not, although each is within its own range."""
    rng = np.random.default_rng(5)
    duty = rng.uniform(-3.0, 3.0, 1000)
    x = np.column_stack([duty, duty]) + rng.normal(0, 0.1, (1000, 2))
    t = tracker(warmup=400, window=1)
    feed(t, "d", x[:400])
    together = t.assess("d", t.observe("d", [2.5, 2.5]), True)
    alone = t.assess("d", t.observe("d", [0.0, 2.5]), True)
    assert not together.is_anomaly and alone.is_anomaly
    assert alone.z is not None and np.abs(alone.z).max() < 2.0  # no input out of range


def test_a_regime_the_global_model_knows_is_learnt_not_flagged_forever() -> None:
    """A level change judged normal by the global model is absorbed within a few time
    constants; the same change judged anomalous stays frozen."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1400, 2))
    x[600:] += 10.0
    known, unknown = tracker(warmup=400, window=1), tracker(warmup=400, window=1)
    k = [a.is_anomaly for a in feed(known, "d", x, global_anomaly=False)]
    u = [a.is_anomaly for a in feed(unknown, "d", x, global_anomaly=True)]
    settle = 600 + int(5 * ADAPT_READINGS)
    assert not any(k[settle:]) and all(u[600:])


def test_state_round_trips_through_json_and_continues_identically() -> None:
    rng = np.random.default_rng(2)
    a = tracker(warmup=4, window=3)
    feed(a, "done", rng.normal(size=(6, 2)))
    feed(a, "half", np.array([[1.0, 1.0]]))
    b = tracker(warmup=4, window=3)
    assert b.restore(json.loads(json.dumps(a.to_json()))) == 2
    for r in rng.normal(size=(5, 2)):
        for dev in ("done", "half"):
            oa, ob = a.observe(dev, r.tolist()), b.observe(dev, r.tolist())
            assert np.array_equal(oa, ob)
            ja, jb = a.assess(dev, oa, True), b.assess(dev, ob, True)
            assert (ja.warming_up, ja.is_anomaly, ja.score) == (
                jb.warming_up, jb.is_anomaly, jb.score
            )
    assert b.progress("half") == 4
    assert np.array_equal(a.devices["done"].center, b.devices["done"].center)  # type: ignore[arg-type]


def test_state_for_another_window_or_warm_up_is_refused() -> None:
    saved = tracker(window=2).to_json()
    with pytest.raises(ValueError, match="window"):
        tracker(window=3).restore(saved)
    with pytest.raises(ValueError, match="warm-up"):
        tracker(warmup=9).restore(saved)
