"""Per-device windows and baselines: what the model is fed, what the baseline flags, and that
it persists."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from daemon import state
from daemon.baseline import ADAPT_READINGS, MAX_FLAGGED_SHARE, MIN_THRESHOLD
from daemon.devices import Assessment, DeviceTracker
from daemon.windows import derived_names, windowed_matrix

G_CENTER = np.array([0.0, 0.0, 0.0, 0.0])
G_SCALE = np.array([1.0, 1.0, 1.0, 1.0])


def tracker(warmup: int = 8, window: int = 2, n: int = 2) -> DeviceTracker:
    """A tracker whose global scale is too small to floor anything."""
    width = n if window == 1 else 2 * n
    return DeviceTracker(n, window, warmup, np.zeros(width), np.full(width, 1e-3))


def feed(
    t: DeviceTracker, dev: str, x: np.ndarray, global_anomaly: bool | np.ndarray = True
) -> list[Assessment]:
    """Stream rows of one device with the global model's verdict on each (one for all, or
    one per row)."""
    verdicts = np.broadcast_to(global_anomaly, len(x)).tolist()
    return [t.assess(dev, t.observe(dev, r.tolist()), g) for r, g in zip(x, verdicts, strict=True)]


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


def test_the_threshold_margin_is_configurable_and_applies_to_restored_baselines() -> None:
    rows = np.random.default_rng(1).normal([100.0, 5.0], [2.0, 0.5], size=(10, 2))
    width = 2

    def tracker_with(margin: float) -> DeviceTracker:
        return DeviceTracker(2, 1, 8, np.zeros(width), np.full(width, 1e-3), margin)

    default, wide = tracker_with(1.5), tracker_with(6.0)
    feed(default, "pump", rows[:8])
    feed(wide, "pump", rows[:8])
    held = default.devices["pump"].held_back_max
    assert held == wide.devices["pump"].held_back_max and 6.0 * held > MIN_THRESHOLD
    assert wide.devices["pump"].threshold == 6.0 * held
    assert default.devices["pump"].threshold == max(MIN_THRESHOLD, 1.5 * held)
    # a saved baseline restored under another margin takes that margin (its held-back
    # maximum is saved), without warming up again
    again = tracker_with(6.0)
    again.restore(orjson.loads(state.encode(default.to_json())))
    assert again.devices["pump"].threshold == 6.0 * held
    assert again.devices["pump"].threshold != default.devices["pump"].threshold


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


def faulty_warm_up() -> tuple[np.ndarray, np.ndarray]:
    """40 readings (a warm-up of 40: 30 fitted, 10 held back) with a fault, channel 0 up by
    15σ, in 7 fitted and 2 held-back readings, which the global model flags."""
    x = np.random.default_rng(6).normal([100.0, 5.0], [2.0, 0.5], size=(40, 2))
    faulty = np.zeros(40, dtype=bool)
    faulty[[3, 7, 11, 15, 19, 23, 27, 32, 36]] = True
    x[faulty, 0] += 30.0
    return x, faulty


def test_warm_up_leaves_out_the_readings_the_global_model_flagged() -> None:
    x, faulty = faulty_warm_up()
    t, learns_all = tracker(warmup=40, window=1), tracker(warmup=40, window=1)
    feed(t, "d", x, faulty)
    feed(learns_all, "d", x, False)  # what a warm-up that learns every reading does
    st = t.devices["d"]
    assert st.trusts_global
    assert st.scale is not None and np.allclose(st.scale, x[:30][~faulty[:30]].std(axis=0))
    # the held-back faults (15σ) would have set a threshold above 20
    assert st.threshold is not None and st.threshold < 10.0
    fault = np.array([[130.0, 5.0]])
    assert feed(t, "d", fault)[0].is_anomaly
    assert not feed(learns_all, "d", fault)[0].is_anomaly  # the fault was learnt as normal


@pytest.mark.parametrize("n_flagged", [15, 16])
def test_a_global_model_flagging_most_of_the_warm_up_is_not_listened_to(n_flagged: int) -> None:
    """Flagging more than half of the fitted readings marks a device unlike the fleet: the
    baseline then learns from every reading; up to half, the flagged ones are left out."""
    x = np.random.default_rng(7).normal([100.0, 5.0], [2.0, 0.5], size=(40, 2))
    flagged = np.arange(40) < n_flagged
    t = tracker(warmup=40, window=1)
    feed(t, "d", x[:20], flagged[:20])
    during = t.summary("d")
    assert during is not None and during["warmup_fit"] is None
    assert during["warmup_flagged"] == min(n_flagged, 20)
    assert during["warmup_alerts"] is (n_flagged <= 10)  # flagged so far, of 20 readings
    feed(t, "d", x[20:], flagged[20:])
    st = t.devices["d"]
    trusted = n_flagged <= MAX_FLAGGED_SHARE * 30
    assert st.trusts_global is trusted
    summary = t.summary("d")  # what an operator sees (GET /devices/d)
    assert summary is not None and summary["warmup_flagged"] is None
    assert summary["warmup_alerts"] is None  # warm-up over: the baseline confirms verdicts
    assert summary["warmup_fit"] == ("left_out_flagged" if trusted else "all_readings")
    fitted = x[n_flagged:30] if trusted else x[:30]
    assert st.scale is not None and np.allclose(st.scale, fitted.std(axis=0))


def test_warm_up_verdicts_count_for_alerts_only_while_the_global_model_is_informative() -> None:
    """During the fitting part a verdict may count towards the alert while the global
    model has flagged at most half of the warm-up so far (the reading itself included);
    in the held-back part, if the fit trusted it; after warm-up, always."""
    x = np.random.default_rng(6).normal([100.0, 5.0], [2.0, 0.5], size=(50, 2))
    # a device like the fleet: a first reading flagged, then normal, then a flagged run
    flagged = np.zeros(50, dtype=bool)
    flagged[[0, 10, 11, 12]] = True
    like = tracker(warmup=40, window=1)
    got = feed(like, "d", x[:20], flagged[:20])
    shown = like.summary("d")  # what GET /devices/d says meanwhile
    assert shown is not None and shown["warmup_alerts"] is True
    got += feed(like, "d", x[20:], flagged[20:])
    assert [a.alerts for a in got[:3]] == [False, True, True]  # 1 of 1, then 1 of 2
    assert all(a.alerts for a in got[1:]), [i for i, a in enumerate(got) if not a.alerts]
    # a device unlike the fleet: every reading flagged
    unlike = feed(tracker(warmup=40, window=1), "d", x, True)
    assert [a.alerts for a in unlike] == [False] * 40 + [True] * 10
    assert [a.warming_up for a in unlike] == [True] * 40 + [False] * 10
    # flagged from the 9th reading on: informative while at most half is flagged
    late = feed(tracker(warmup=40, window=1), "d", x, np.arange(50) >= 8)
    assert [a.alerts for a in late[:18]] == [True] * 16 + [False] * 2  # 8 of 16, 9 of 17
    assert not any(a.alerts for a in late[16:40]) and all(a.alerts for a in late[40:])


def test_too_few_unflagged_readings_for_the_inputs_fall_back_to_all() -> None:
    """Four inputs (window 2) and six fitted readings: two flagged would leave four, not
    enough for a covariance of four inputs, so all six are used."""
    x = np.random.default_rng(8).normal([100.0, 5.0], [2.0, 0.5], size=(8, 2))
    t = tracker(warmup=8, window=2)
    feed(t, "d", x, np.arange(8) < 2)
    st = t.devices["d"]
    assert not st.trusts_global
    assert st.scale is not None and np.allclose(st.scale, windowed_matrix(x, 2)[:6].std(axis=0))


@pytest.mark.parametrize("cut", [12, 35])  # in the fitted part, in the held-back part
def test_a_restart_mid_warm_up_continues_as_if_uninterrupted(cut: int) -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(70, 2))
    flagged = rng.random(70) < 0.3
    x[flagged] += 6.0
    whole = tracker(warmup=40, window=3)
    expected = feed(whole, "d", x, flagged)
    before = tracker(warmup=40, window=3)
    feed(before, "d", x[:cut], flagged[:cut])
    after = tracker(warmup=40, window=3)
    assert after.restore(orjson.loads(state.encode(before.to_json()))) == 1
    got = feed(after, "d", x[cut:], flagged[cut:])
    assert [(a.warming_up, a.is_anomaly, a.score, a.threshold) for a in got] == [
        (a.warming_up, a.is_anomaly, a.score, a.threshold) for a in expected[cut:]
    ]
    assert after.devices["d"].trusts_global and whole.devices["d"].trusts_global
    assert any(a.active for a in got)


def test_state_round_trips_through_json_and_continues_identically() -> None:
    rng = np.random.default_rng(2)
    a = tracker(warmup=4, window=3)
    feed(a, "done", rng.normal(size=(6, 2)))
    feed(a, "half", np.array([[1.0, 1.0]]))
    b = tracker(warmup=4, window=3)
    assert b.restore(orjson.loads(state.encode(a.to_json()))) == 2
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


def test_state_of_another_format_or_window_is_refused() -> None:
    saved = tracker(window=2).to_json()
    with pytest.raises(ValueError, match="format"):  # format 2: one accumulator, no verdicts
        tracker(window=2).restore({**saved, "format": 2})
    with pytest.raises(ValueError, match="window"):
        tracker(window=3).restore(saved)
    with pytest.raises(ValueError, match="warm-up length"):
        tracker(window=2).restore({**saved, "warmup": None})
    assert tracker(warmup=9, window=2).restore(saved) == 0  # another warm-up: not refused


def _verdicts(got: list[Assessment]) -> list[tuple[bool, bool, float, float]]:
    return [(a.warming_up, a.is_anomaly, a.score, a.threshold) for a in got]


@pytest.mark.parametrize("saved_warmup", [40, 12, 400])  # the new one: 20, shorter, longer
def test_a_fitted_baseline_is_kept_whatever_the_new_warm_up_length(saved_warmup: int) -> None:
    """A fitted baseline is used without the warm-up length (which only says where the
    fitting and held-back parts end): after a restart with another length its verdicts
    are those it would have given without the restart, never ``warming_up``."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(saved_warmup + 60, 2))
    x[-5:] += 8.0
    whole = tracker(warmup=saved_warmup, window=3)
    expected = feed(whole, "d", x, False)
    before = tracker(warmup=saved_warmup, window=3)
    feed(before, "d", x[: saved_warmup + 10], False)
    before.repeat("d", 7)
    after = tracker(warmup=20, window=3)
    assert after.restore(orjson.loads(state.encode(before.to_json()))) == 1
    change = after.warmup_change
    assert change is not None and (change.saved, change.now) == (saved_warmup, 20)
    assert (change.fitted, change.continued, change.restarted) == (1, 0, [])
    got = feed(after, "d", x[saved_warmup + 10 :], False)
    assert _verdicts(got) == _verdicts(expected[saved_warmup + 10 :])
    assert not any(a.warming_up for a in got) and got[-1].is_anomaly
    assert after.repeat("d", 7)  # its seq window is kept


@pytest.mark.parametrize(
    ("saved_warmup", "cut", "new_warmup", "continues"),
    [
        (40, 12, 60, True),  # fitting part, short of the new fitting part's end
        (40, 12, 20, True),  # ... of a shorter warm-up (fitting part: 15 readings)
        (40, 12, 16, False),  # ... whose fitting part ended at 12 unfitted: restarts
        (40, 25, 16, False),  # fitting part, past the new one's end (12): restarts
        (40, 35, 60, False),  # held-back part of another fitting part (30 vs 45)
        (10, 9, 11, True),  # held-back part, the same fitting part (8 readings)
        (11, 9, 10, True),
        (11, 10, 10, False),  # ... but the new warm-up is over: no more held back
        (40, 12, 0, False),  # baselines off: unfinished warm-ups are dropped
    ],
)
def test_an_unfinished_warm_up_continues_only_where_the_new_length_gives_the_same_state(
    saved_warmup: int, cut: int, new_warmup: int, continues: bool
) -> None:
    """A device still warming up continues if its state is exactly what a warm-up of the
    new length would have made of the same readings (then it ends as one uninterrupted
    under the new length would), otherwise it starts its warm-up again, keeping its
    window and seq window."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(cut + 80, 2))
    flagged = rng.random(len(x)) < 0.3
    x[flagged] += 6.0
    before = tracker(warmup=saved_warmup, window=3)
    feed(before, "d", x[:cut], flagged[:cut])
    before.repeat("d", 3)
    after = tracker(warmup=new_warmup, window=3)
    assert after.restore(orjson.loads(state.encode(before.to_json()))) == 1
    change = after.warmup_change
    assert change is not None and change.fitted == 0
    assert (change.continued, change.restarted) == ((1, []) if continues else (0, ["d"]))
    assert list(after.devices["d"].recent) == list(before.devices["d"].recent)
    assert after.repeat("d", 3)
    got = feed(after, "d", x[cut:], flagged[cut:])
    if continues:  # as if the new length had applied from the start
        whole = tracker(warmup=new_warmup, window=3)
        assert _verdicts(got) == _verdicts(feed(whole, "d", x, flagged)[cut:])
    else:  # a new warm-up from the next reading, with the window it had
        fresh = tracker(warmup=new_warmup, window=3)
        for r in x[cut - 3 : cut]:
            fresh.observe("d", r.tolist())
        assert _verdicts(got) == _verdicts(feed(fresh, "d", x[cut:], flagged[cut:]))
        assert got[0].warming_up is (new_warmup > 0)
    assert not got[-1].warming_up  # each warm-up ends in the readings fed


def test_drift_says_how_far_the_adapting_centre_has_moved_since_the_warm_up() -> None:
    """The drift the baseline absorbs without flagging it (the slow-drift case above) is
    what ``drift`` reports: the input, its direction and its size in conditional spreads."""
    rng = np.random.default_rng(3)
    n, warmup = 1500, 400
    x = rng.normal(size=(n, 2))
    x[:, 0] -= 0.02 * np.arange(n)  # a channel falling by 0.02σ a reading
    t = tracker(warmup=warmup, window=1)
    assert t.drift("d") is None  # never seen
    feed(t, "d", x[: warmup // 2])
    assert t.drift("d") is None  # still fitting: no centre to have moved
    flags = [a.is_anomaly for a in feed(t, "d", x[warmup // 2 :])]
    assert np.mean(flags) <= 0.02  # absorbed, not flagged ...
    d = t.drift("d")
    assert d is not None and d.device_id == "d" and d.input == 0
    st = t.devices["d"]
    assert st.origin is not None and st.center is not None and st.scale is not None
    assert st.cond is not None
    # ... and reported, as the baseline judges a reading: the centre's move in conditional
    # spreads (the two channels are independent, so about its move in plain spreads); the
    # centre lags a ramp by its time constant, so it sits where the channel was ~100
    # readings ago; the fit's centre and spread are the fitting part's
    moved = st.cond @ ((st.center - st.origin) / st.scale)
    assert d.spreads == pytest.approx(moved[0]) and abs(moved[1]) < abs(moved[0]) / 10
    fit = x[: t.n_fit, 0]
    expected = (-0.02 * (n - 1 - (ADAPT_READINGS - 1)) - fit.mean()) / fit.std()
    assert d.spreads == pytest.approx(expected, rel=0.02)
    assert t.summary("d")["drift"] == {"input": 0, "spreads": round(d.spreads, 2)}  # type: ignore[index]


def test_drift_beyond_a_limit_is_reported_once_until_it_is_back_within() -> None:
    t = tracker(warmup=8, window=1)
    rng = np.random.default_rng(4)
    for dev in ("steady", "moving"):
        feed(t, dev, rng.normal(size=(8, 2)), False)
    assert t.drifted(3.0) == ([], 0)
    st = t.devices["moving"]
    assert st.center is not None and st.origin is not None and st.scale is not None
    assert st.cond is not None
    st.center[1] = st.origin[1] + 4.0 * st.scale[1]  # as if it had adapted that far
    # input 1 moved (almost) alone: judged against what input 0 predicts, the farther
    moved = st.cond @ ((st.center - st.origin) / st.scale)
    assert abs(moved[1]) >= 4.0 and abs(moved[1]) > abs(moved[0])
    new, beyond = t.drifted(3.0)
    assert beyond == 1 and [(d.device_id, d.input, d.spreads) for d in new] == [
        ("moving", 1, pytest.approx(moved[1]))]
    assert t.drifted(3.0) == ([], 1)  # said once
    assert t.drifted(abs(moved[1]) + 0.1) == ([], 0)  # within a wider limit: re-armed ...
    assert [d.device_id for d in t.drifted(3.0)[0]] == ["moving"]  # ... and said again
    t.forget("moving")  # a re-warm-up starts from a new fit: no drift
    assert t.drifted(3.0) == ([], 0) and t.drift("moving") is None


def test_the_fitted_centre_is_saved_and_old_state_counts_drift_from_the_restore() -> None:
    rng = np.random.default_rng(5)
    a = tracker(warmup=8, window=1)
    feed(a, "d", rng.normal(size=(8, 2)), False)
    feed(a, "d", rng.normal(size=(300, 2)) + np.array([3.0, 0.0]), False)  # the centre moves
    moved = a.drift("d")
    assert moved is not None and moved.input == 0 and moved.spreads > 1.0
    saved = orjson.loads(state.encode(a.to_json()))
    b = tracker(warmup=8, window=1)
    assert b.restore(saved) == 1
    assert b.drift("d") == moved
    del saved["devices"]["d"]["origin"]  # state saved before the fitted centre was kept
    c = tracker(warmup=8, window=1)
    assert c.restore(saved) == 1
    assert c.drift("d") is not None and c.drift("d").spreads == 0.0  # type: ignore[union-attr]
    saved["devices"]["d"]["origin"] = [1.0, float("nan")]
    with pytest.raises(ValueError, match="not finite"):
        tracker(warmup=8, window=1).restore(saved)


def test_drift_is_judged_against_the_other_inputs_so_a_change_of_duty_is_hardly_drift() -> None:
    """Flow and current follow the pump's duty (correlated through the warm-up, whose duty
    varies). Afterwards the duty creeps up by 6 of the warm-up's spreads: both follow, and
    the centre's move is what the warm-up's relation predicts. The same creep in the
    current alone (a motor drawing more at the same flow) is drift."""
    rng = np.random.default_rng(6)
    n, warmup = 1400, 400

    def pump(current_alone: bool) -> DeviceTracker:
        duty = rng.normal(size=n)
        duty[warmup:] += np.linspace(0.0, 6.0, n - warmup)
        flow = duty + 0.1 * rng.normal(size=n)
        current = duty + 0.1 * rng.normal(size=n)
        if current_alone:
            flow[warmup:] -= np.linspace(0.0, 6.0, n - warmup)  # flow stays where it was
        t = tracker(warmup=warmup, window=1)
        feed(t, "p", np.column_stack([flow, current]), False)
        return t

    duty_change, current_alone = pump(False).drift("p"), pump(True).drift("p")
    assert duty_change is not None and current_alone is not None
    assert abs(duty_change.spreads) < 3.0  # within any threshold (at least 3)
    assert abs(current_alone.spreads) > 10.0
