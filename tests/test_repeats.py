"""Redelivered readings: a reading whose ``seq`` its device sent before is judged again (its
verdict goes out, with ``"repeat": true``) but changes no window, baseline or alert state,
so a broker's redelivery after a fault cannot raise an alert or teach the baseline twice."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from daemon import state
from daemon.config import AlertConfig, TopicsConfig
from daemon.control import Command, DeviceControl, UnknownDeviceError
from daemon.devices import DeviceTracker
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.repeats import MAX_GAP, REPEAT_SPAN, SeqWindow
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING
from tests.saved_state import saved_and_loaded

DEV = "sensors/p-7/readings"


def tracker(warmup: int = 0, window: int = 3) -> DeviceTracker:
    return DeviceTracker(2, window, warmup, np.zeros(2 * window), np.ones(2 * window))


def test_a_seq_is_a_repeat_only_once_judged_and_inside_the_window() -> None:
    t = tracker()
    seen = [t.repeat("d", s) for s in (5, 6, 7, 6, 5, 7, 8)]
    assert seen == [False, False, False, True, True, True, False]
    # a late reading never judged is new, once
    assert [t.repeat("d", 3), t.repeat("d", 3)] == [False, True]
    # readings without seq are never repeats; other devices have their own window
    assert not t.repeat("d", None) and not t.repeat("other", 8)


def test_the_window_slides_and_a_restarted_counter_starts_it_anew() -> None:
    t = tracker()
    assert not t.repeat("d", 1000)
    assert not t.repeat("d", 1000 + 3 * REPEAT_SPAN)  # a jump: older bits slide out
    assert not t.repeat("d", 1000)  # far below the window: a restarted device counts again
    assert t.repeat("d", 1000)
    assert not t.repeat("d", 1001)
    last = 1001 + REPEAT_SPAN - 1
    assert not t.repeat("d", last)
    assert t.repeat("d", 1001)  # REPEAT_SPAN - 1 below the highest: still remembered


def test_the_largest_seq_jump_costs_no_memory() -> None:
    """seq may be anything below 2**63: a jump that large must not shift the window by
    2**63 bits (it once built an integer of that size and the process ran out of memory)."""
    t = tracker()
    assert not t.repeat("d", 0)
    assert not t.repeat("d", 2**63 - 1)
    assert t.devices["d"].seqs.mask == 1
    assert t.repeat("d", 2**63 - 1) and not t.repeat("d", 0)


def test_a_repeat_leaves_the_window_and_the_warm_up_as_they_were() -> None:
    t = tracker(warmup=8, window=3)
    rows = [t.observe("d", (float(i), 2.0 * i)) for i in range(4)]
    for i, row in enumerate(rows):
        t.assess("d", row, False)
        assert t.progress("d") == i + 1
    window = list(t.devices["d"].recent)
    again = t.observe("d", (1.0, 2.0), learn=False)
    t.assess("d", again, False, learn=False)
    assert list(t.devices["d"].recent) == window and t.progress("d") == 4
    np.testing.assert_array_equal(again, rows[-1])  # the window as it stands


def pipeline(bundle: ModelBundle, warmup: int = 0) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    alerts = AlertConfig(raise_after=3, window=5, resolve_after=2)
    return Pipeline(bundle, decoder, TopicsConfig(), alerts, warmup=warmup)


def send(p: Pipeline, *readings: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    outputs, stats = p.process([RawMessage(DEV, orjson.dumps(r), 0.0) for r in readings], 1.0)
    return [orjson.loads(o.payload) | {"kind": o.kind} for outs in outputs for o in outs], stats


def test_a_redelivered_anomaly_does_not_count_towards_the_alert(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle)
    metrics = Metrics(CollectorRegistry())
    out, stats = send(p, {**ANOMALOUS_READING, "seq": 1}, {**ANOMALOUS_READING, "seq": 2})
    metrics.record_batch(stats)
    assert [o["is_anomaly"] for o in out] == [True, True]
    # the broker redelivers seq 2 (its ack was lost with the connection): 3 of the last 5
    # verdicts would be anomalous, but the reading is the same one
    out, stats = send(p, {**ANOMALOUS_READING, "seq": 2})
    metrics.record_batch(stats)
    (verdict,) = out
    assert verdict["kind"] == "verdict" and verdict["repeat"] is True
    assert verdict["is_anomaly"] is True and verdict["key"] == "p-7:2"  # same key as before
    assert stats.repeats == 1
    summary = p.devices.summary("p-7")
    assert summary is not None and summary["last_seq"] == 2  # what an operator sees
    assert metrics.registry.get_sample_value("anomalyd_repeated_readings_total") == 1.0
    out, _ = send(p, {**ANOMALOUS_READING, "seq": 3})  # a third anomalous reading raises
    assert [o["kind"] for o in out] == ["verdict", "alert"] and "repeat" not in out[0]
    assert out[1]["state"] == "raised"


def test_a_reading_redelivered_after_a_rewarm_is_still_a_repeat(
    model_bundle: ModelBundle,
) -> None:
    """A re-warm-up forgets the device's window, baseline and alert state, not which
    readings it sent: one the broker redelivers does not start the new warm-up."""
    p = pipeline(model_bundle, warmup=4)
    control = DeviceControl(p, Metrics(CollectorRegistry()), lambda _o: True, lambda: None)
    send(p, *({**NORMAL_READING, "seq": s} for s in range(3)))
    control.execute(Command("rewarm", "p-7"))
    with pytest.raises(UnknownDeviceError):
        control.show("p-7")  # unknown until its next reading
    out, _ = send(p, {**NORMAL_READING, "seq": 2})  # redelivered
    assert out[0]["repeat"] is True and control.show("p-7")["warmup_seen"] == 0
    out, _ = send(p, {**NORMAL_READING, "seq": 3})
    assert "repeat" not in out[0] and control.show("p-7")["warmup_seen"] == 1
    control.execute(Command("forget", "p-7"))  # forgetting a device forgets that too
    out, _ = send(p, {**NORMAL_READING, "seq": 3})
    assert "repeat" not in out[0]


def test_a_rewarm_s_seq_window_survives_a_restart_before_the_next_reading(
    model_bundle: ModelBundle, tmp_path: Any
) -> None:
    p = pipeline(model_bundle, warmup=4)
    control = DeviceControl(p, Metrics(CollectorRegistry()), lambda _o: True, lambda: None)
    send(p, *({**NORMAL_READING, "seq": s} for s in range(3)))
    control.execute(Command("rewarm", "p-7"))
    path = tmp_path / "devices.json"
    state.save(path, p.fleet.snapshot())  # saved before the device's next reading
    snapshot = state.load(path)
    assert snapshot is not None
    after = pipeline(model_bundle, warmup=4)
    assert after.fleet.restore(snapshot) == (0, 0, [])  # the device itself warms up anew
    out, _ = send(after, {**NORMAL_READING, "seq": 2})  # redelivered after the restart
    assert out[0]["repeat"] is True and after.devices.progress("p-7") == 0
    out, _ = send(after, {**NORMAL_READING, "seq": 3})
    assert "repeat" not in out[0] and after.devices.progress("p-7") == 1


def test_repeats_inside_one_batch_message_are_marked_per_entry(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle)
    entries = [{**NORMAL_READING, "seq": s} for s in (10, 11, 10)]
    out, stats = send(p, {"readings": entries})
    (verdict,) = out
    assert [pred.get("repeat", False) for pred in verdict["predictions"]] == [False, False, True]
    assert stats.repeats == 1 and stats.readings == 3


def test_the_seq_window_survives_a_restart_and_old_state_still_loads(
    model_bundle: ModelBundle, tmp_path: Any
) -> None:
    before = pipeline(model_bundle, warmup=4)
    send(before, *({**NORMAL_READING, "seq": s} for s in range(6)))
    snapshot = saved_and_loaded(before, tmp_path)
    after = pipeline(model_bundle, warmup=4)
    assert after.fleet.restore(snapshot)[0] == 1
    out, _ = send(after, {**NORMAL_READING, "seq": 5}, {**NORMAL_READING, "seq": 6})
    assert [o.get("repeat", False) for o in out] == [True, False]

    for dev in snapshot["devices"]["devices"].values():  # saved before the seq window
        del dev["last_seq"], dev["seq_mask"]
    older = pipeline(model_bundle, warmup=4)
    devices, _, problems = older.fleet.restore(snapshot)
    assert devices == 1 and problems == []
    out, _ = send(older, {**NORMAL_READING, "seq": 5})
    assert "repeat" not in out[0]


# -- readings that never arrived ------------------------------------------------------------


def _window(*seqs: int) -> SeqWindow:
    w = SeqWindow()
    for s in seqs:
        w.seen(s)
    return w


def test_skipped_seq_values_count_as_missing_once_they_leave_the_window() -> None:
    assert _window(*range(200)).missing == 0  # a device counting one by one
    w = _window(*range(10), *range(15, 20))  # 10..14 skipped
    assert w.missing == 0  # still inside the window: they may yet arrive late
    for s in range(20, 15 + REPEAT_SPAN):
        w.seen(s)
    assert w.missing == 5
    # filled in late, while still inside the window: not missing
    w = _window(*range(10), 12, 10, 11, *range(13, 200))
    assert w.missing == 0


def test_a_jump_past_the_window_counts_what_it_skipped() -> None:
    w = _window(0, REPEAT_SPAN + 100)
    assert w.missing == 100  # 1..100 never inside the window
    for s in range(REPEAT_SPAN + 101, 2 * REPEAT_SPAN + 100):
        w.seen(s)
    assert w.missing == REPEAT_SPAN + 99  # every value from 1 to REPEAT_SPAN + 99


def test_a_restarted_or_renumbered_count_is_not_loss() -> None:
    w = _window(*range(5000, 5100), *range(0, 100))  # the device restarted from 0
    assert w.missing == 0
    w = _window(*range(100), *range(100 + MAX_GAP + 1, 100 + MAX_GAP + 200))  # a new count
    assert w.missing == 0
    assert _window(0, MAX_GAP, *range(MAX_GAP + 1, MAX_GAP + REPEAT_SPAN)).missing == MAX_GAP - 1


@given(st.lists(st.tuples(st.integers(1, 3 * REPEAT_SPAN), st.booleans()), max_size=60),
       st.randoms(use_true_random=False))
def test_missing_is_every_value_out_of_the_window_never_seen(
    steps: list[tuple[int, bool]], rnd: Any,
) -> None:
    """Against a plain set: a count moving ahead by 1 or more at each step, sometimes
    followed by a late value from within the window; the values that left the window
    never seen are exactly the missing ones."""
    w, seen = SeqWindow(), set()
    last = 1000
    w.seen(last)
    seen.add(last)
    for step, late in steps:
        last += step
        w.seen(last)
        seen.add(last)
        if late:
            s = last - rnd.randrange(REPEAT_SPAN)
            w.seen(s)
            seen.add(s)
    expected = sum(1 for s in range(1000, last - REPEAT_SPAN + 1) if s not in seen)
    assert w.missing == expected


def test_missing_readings_are_counted_shown_per_device_and_saved(
    model_bundle: ModelBundle, tmp_path: Any,
) -> None:
    p = pipeline(model_bundle)
    _, stats = send(p, *({**NORMAL_READING, "seq": s} for s in (*range(10), *range(20, 100))))
    assert stats.missing == 10
    metrics = Metrics(CollectorRegistry())
    metrics.record_batch(stats)
    assert metrics.registry.get_sample_value("anomalyd_readings_missing_total") == 10.0
    summary = p.devices.summary("p-7")
    assert summary is not None and summary["missing_readings"] == 10
    snapshot = saved_and_loaded(p, tmp_path)
    again = pipeline(model_bundle)
    again.fleet.restore(snapshot)
    summary = again.devices.summary("p-7")
    assert summary is not None and summary["missing_readings"] == 10
    _, stats = send(again, {**NORMAL_READING, "seq": 110}, {**NORMAL_READING, "seq": 200})
    assert stats.missing == 10 + 26  # 100..109 left the window unseen; 111..136 jumped past
    # saved before the window's depth was: it is taken from the seen values
    for dev in snapshot["devices"]["devices"].values():
        del dev["seq_depth"], dev["seq_missing"]
    older = pipeline(model_bundle)
    assert older.fleet.restore(snapshot)[2] == []
    assert older.devices.devices["p-7"].seqs.depth == REPEAT_SPAN
