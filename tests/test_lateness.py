"""Late readings: one whose timestamp is more than ``readings.late_after_s`` older than its
device's newest is judged apart (its verdict says ``"late": true``; no window, baseline or
alert state changes) or dead-lettered as ``late``; a device whose clock moved back is
recognised and judged as usual again."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from daemon.config import AlertConfig, ReadingsConfig, TopicsConfig, load_settings
from daemon.control import DeviceControl
from daemon.devices import DeviceTracker
from daemon.errors import ConfigError
from daemon.lateness import ON_TIME, Arrival, EventClock
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.payloads import iso
from daemon.pipeline import BatchStats, Pipeline, RawMessage
from daemon.readings import Decoder, Reading
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING
from tests.saved_state import saved_and_loaded

DEV = "sensors/p-7/readings"
T = 1_800_000_000.0  # a device's clock, epoch seconds


def one(c: EventClock, t: float, received: float) -> Arrival:
    """One single-reading message (no repeats), received ``received`` s after T."""
    return c.take((t,), T + received, 60, lambda _i: False)


def test_a_reading_is_late_beyond_the_tolerance_and_only_then() -> None:
    c = EventClock()
    assert one(c, T, 0.0) == ON_TIME
    assert one(c, T + 10, 1.0) == ON_TIME and c.newest == T + 10
    assert one(c, T - 50, 2.0) == ON_TIME  # 60 s behind: within tolerance
    assert c.newest == T + 10  # an older on-time reading does not move the newest back
    assert one(c, T - 51, 3.0) == Arrival([True], newest=T + 10)
    assert one(c, T + 11, 4.0) == ON_TIME and c.late_since is None and c.late_count == 1


def test_a_timestamp_from_the_future_moves_the_newest_no_further_than_its_receipt() -> None:
    """One reading stamped a year ahead (a clock glitch) must not make the device's next
    readings late; a device whose clock runs minutes ahead stays on time."""
    c = EventClock()
    one(c, T, 0.0)
    assert one(c, T + 365 * 86_400, 1.0) == ON_TIME
    assert c.newest == T + 1.0 + 60  # its receipt plus late_after_s
    assert all(one(c, T + 2.0 + i, 2.0 + i) == ON_TIME for i in range(120))
    assert c.late_count == 0
    ahead = EventClock()  # five minutes fast, all along
    assert all(one(ahead, T + 300 + i, float(i)) == ON_TIME for i in range(120))
    assert ahead.newest == T + 119 + 60
    # its backlog is late once more than its clock's lead (300 s) behind its newest
    assert one(ahead, T + 300 + 119 - 290, 120.0) == ON_TIME
    assert one(ahead, T + 300 + 119 - 310, 121.0).late == [True]


def test_a_clock_set_back_is_adopted_after_late_after_s_of_nothing_on_time() -> None:
    c = EventClock()
    one(c, T, 100.0)
    # the device rebooted with its clock an hour behind: late, by the daemon's clock ...
    assert all(one(c, T - 3600 + i, 101.0 + i).late == [True] for i in range(60))
    # ... until every one of its readings has been late for 60 s
    assert one(c, T - 3540, 161.0) == Arrival(None, clock_reset=True)
    assert c.newest == T - 3540 and one(c, T - 3539, 162.0) == ON_TIME
    # an on-time reading in between starts the count again (a backlog among live readings)
    c = EventClock()
    one(c, T, 100.0)
    for i in range(120):
        assert one(c, T - 3600 + i, 101.0 + i).late == [True]
        assert one(c, T + i, 101.0 + i) == ON_TIME


def test_a_message_is_judged_against_the_earlier_ones_not_within_itself() -> None:
    """A batch listed newest first is on time as a whole; its late entries are those
    older than the device's earlier messages allow, and a repeat is never one."""
    c = EventClock()
    one(c, T, 100.0)
    newest_first = [T + 100 - i for i in range(100)]
    assert c.take(newest_first, T + 101.0, 60, lambda _i: False) == ON_TIME
    assert c.newest == T + 100
    stamps = [T + 101, T + 30, T + 39, T + 41]  # the floor is T + 40
    got = c.take(stamps, T + 102.0, 60, lambda i: i == 2)  # the third is a repeat
    assert got == Arrival([False, True, False, False], newest=T + 100)
    assert c.newest == T + 101 and c.late_count == 1


def pipeline(
    bundle: ModelBundle, warmup: int = 0, policy: str = "judge", after: float = 60.0
) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    alerts = AlertConfig(raise_after=3, window=5, resolve_after=2)
    readings = ReadingsConfig(late_after_s=after, late_policy=policy)  # type: ignore[arg-type]
    return Pipeline(bundle, decoder, TopicsConfig(), alerts, warmup=warmup, readings=readings)


def send(
    p: Pipeline, *readings: dict[str, Any], at: float = 1.0
) -> tuple[list[dict[str, Any]], BatchStats]:
    """The readings received ``at`` s after T, each a message."""
    raws = [RawMessage(DEV, orjson.dumps(r), T + at) for r in readings]
    outputs, stats = p.process(raws, T + at)
    return [orjson.loads(o.payload) | {"kind": o.kind} for outs in outputs for o in outs], stats


def test_late_anomalies_are_judged_but_raise_no_alert_and_teach_nothing(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle, warmup=50)
    metrics = Metrics(CollectorRegistry())
    out, _ = send(p, *({**NORMAL_READING, "timestamp": T + i} for i in range(8)))
    window = list(p.devices.devices["p-7"].recent)
    assert p.devices.progress("p-7") == 8
    # three anomalous readings from two hours ago (a gateway's backlog) would raise an alert
    out, stats = send(p, *({**ANOMALOUS_READING, "timestamp": T - 7200 + i} for i in range(3)))
    metrics.record_batch(stats)
    assert [o["kind"] for o in out] == ["verdict"] * 3
    assert all(o["late"] is True and o["is_anomaly"] is True for o in out)
    assert list(p.devices.devices["p-7"].recent) == window and p.devices.progress("p-7") == 8
    assert stats.late == 3
    assert metrics.registry.get_sample_value("anomalyd_late_readings_total") == 3.0
    # the same readings on time do raise it: it was their lateness that kept it quiet
    out, _ = send(p, *({**ANOMALOUS_READING, "timestamp": T + 8 + i} for i in range(3)))
    assert [o["kind"] for o in out] == ["verdict", "verdict", "verdict", "alert"]
    assert "late" not in out[0] and p.devices.progress("p-7") == 11


def test_a_late_reading_is_judged_with_the_window_as_it_stands(
    model_bundle: ModelBundle,
) -> None:
    """Its inputs are the device's newest readings with it in place of the oldest: the
    same inputs the same reading gets on time (here the window is all alike)."""
    on_time = pipeline(model_bundle)
    late = pipeline(model_bundle)
    for p in (on_time, late):
        send(p, *({**NORMAL_READING, "timestamp": T + i} for i in range(10)))
    (a,), _ = send(on_time, {**ANOMALOUS_READING, "timestamp": T + 10})
    (b,), _ = send(late, {**ANOMALOUS_READING, "timestamp": T - 600})
    assert b["late"] is True and "late" not in a
    assert b["anomaly_score"] == pytest.approx(a["anomaly_score"])
    assert b["is_anomaly"] is a["is_anomaly"] is True


def test_the_drop_policy_dead_letters_late_readings_with_their_payload(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle, policy="drop")
    metrics = Metrics(CollectorRegistry())
    send(p, {**NORMAL_READING, "timestamp": T})
    late = {**NORMAL_READING, "timestamp": T - 3600, "seq": 9}
    out, stats = send(p, late)
    metrics.record_batch(stats)
    (dead,) = out
    assert dead["kind"] == "dead_letter" and dead["reason"] == "late"
    assert orjson.loads(dead["payload"]) == late
    assert "3600 s older" in dead["detail"] and "late_after_s" in dead["detail"]
    assert metrics.registry.get_sample_value(
        "anomalyd_dead_letters_total", {"reason": "late"}) == 1.0
    # in a batch message only the late entries go, each named by its index
    entries = [{**NORMAL_READING, "timestamp": T + 1}, {**NORMAL_READING, "timestamp": T - 900},
               {**NORMAL_READING, "timestamp": T + 2}]
    out, stats = send(p, {"readings": entries})
    kinds = {o["kind"]: o for o in out}
    assert [pred["index"] for pred in kinds["verdict"]["predictions"]] == [0, 2]
    assert [r["index"] for r in kinds["dead_letter"]["rejections"]] == [1]
    assert kinds["dead_letter"]["rejections"][0]["reason"] == "late"
    assert stats.readings == 2 and stats.late == 1


def test_a_redelivered_reading_is_a_repeat_not_late(model_bundle: ModelBundle) -> None:
    """The broker redelivers a reading after newer ones were judged (its ack was lost):
    it must get its verdict again, even when late readings are dropped."""
    p = pipeline(model_bundle, policy="drop")
    send(p, {**NORMAL_READING, "timestamp": T, "seq": 1})
    send(p, {**NORMAL_READING, "timestamp": T + 120, "seq": 2})
    (verdict,), stats = send(p, {**NORMAL_READING, "timestamp": T, "seq": 1})
    assert verdict["kind"] == "verdict" and verdict["repeat"] is True and "late" not in verdict
    assert stats.late == 0
    # a reading never judged, as old, is late
    (dead,), _ = send(p, {**NORMAL_READING, "timestamp": T, "seq": 0})
    assert dead["kind"] == "dead_letter" and dead["reason"] == "late"


def test_a_device_whose_clock_moved_back_is_judged_as_usual_again(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle, warmup=100)
    metrics = Metrics(CollectorRegistry())
    send(p, *({**NORMAL_READING, "timestamp": T + i} for i in range(5)), at=1000.0)
    # the device restarts with its clock a day behind, one reading a second
    late = [send(p, {**NORMAL_READING, "timestamp": T - 86_400 + i}, at=1001.0 + i)
            for i in range(61)]
    for _out, stats in late:
        metrics.record_batch(stats)
    assert [o[0]["late"] for o, _ in late[:60]] == [True] * 60
    assert "late" not in late[60][0][0] and late[60][1].clock_resets == ["p-7"]
    assert p.devices.newest("p-7") == T - 86_400 + 60
    assert p.devices.progress("p-7") == 6  # the warm-up goes on from the reset
    assert metrics.registry.get_sample_value("anomalyd_device_clock_resets_total") == 1.0
    assert metrics.registry.get_sample_value("anomalyd_late_readings_total") == 60.0
    # which device it was, for an operator (anomalyd devices p-7)
    control = DeviceControl(p, metrics, lambda _o: True, lambda: None)
    shown = control.show("p-7")
    assert shown["late_readings"] == 60
    assert shown["newest_timestamp"] == iso(T - 86_400 + 60)


def test_with_late_after_s_0_readings_are_judged_in_arrival_order(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle, warmup=6, after=0.0)
    send(p, {**NORMAL_READING, "timestamp": T})
    (verdict,), stats = send(p, {**NORMAL_READING, "timestamp": T - 86_400})
    assert "late" not in verdict and stats.late == 0 and p.devices.progress("p-7") == 2


def test_the_newest_timestamp_survives_a_restart_and_old_state_loads(
    model_bundle: ModelBundle, tmp_path: Any
) -> None:
    before = pipeline(model_bundle, warmup=4)
    send(before, {**NORMAL_READING, "timestamp": T}, at=1000.0)
    send(before, {**NORMAL_READING, "timestamp": T - 3600}, at=1001.0)  # a late run begins
    snapshot = saved_and_loaded(before, tmp_path)
    after = pipeline(model_bundle, warmup=4)
    assert after.fleet.restore(snapshot)[0] == 1
    # an hour later, after a restart: the downtime does not count as an hour of lateness
    (verdict,), stats = send(after, {**NORMAL_READING, "timestamp": T - 3599}, at=4600.0)
    assert verdict["late"] is True and stats.clock_resets == []
    summary = after.devices.summary("p-7")
    assert summary is not None and summary["newest_timestamp"] == T

    for dev in snapshot["devices"]["devices"].values():  # saved before the event clock
        del dev["newest_ts"]
    older = pipeline(model_bundle, warmup=4)
    devices, _, problems = older.fleet.restore(snapshot)
    assert devices == 1 and problems == []
    (verdict,), _ = send(older, {**NORMAL_READING, "timestamp": T - 3600})
    assert "late" not in verdict  # nothing to be late against yet


def test_a_bad_late_policy_is_refused_with_its_name(tmp_path: Any) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[readings]\nlate_policy = "reorder"\n')
    with pytest.raises(ConfigError, match=r"readings\.late_policy"):
        load_settings(cfg, env={})


def test_a_batch_listed_newest_first_is_on_time_and_its_stragglers_late(
    model_bundle: ModelBundle,
) -> None:
    p = pipeline(model_bundle, warmup=500)
    at = 200.0  # received after every timestamp below, as live readings are
    send(p, {**NORMAL_READING, "timestamp": T, "seq": 0}, at=at)
    batch = [{**NORMAL_READING, "timestamp": T + 100 - k, "seq": 100 - k} for k in range(100)]
    (verdict,), stats = send(p, {"readings": batch}, at=at)
    assert stats.late == 0 and p.devices.progress("p-7") == 101
    assert not any(pred.get("late") for pred in verdict["predictions"])
    # the same readings one message each: after the first, those over 60 s older are late
    q = pipeline(model_bundle, warmup=500)
    send(q, {**NORMAL_READING, "timestamp": T, "seq": 0}, at=at)
    _, stats = send(q, *batch, at=at)
    assert stats.late == 39 and q.devices.progress("p-7") == 62
    # a batch with a straggler and a repeat: only the straggler is late
    (verdict,), stats = send(p, {"readings": [
        {**NORMAL_READING, "timestamp": T + 20, "seq": 20},  # judged before: a repeat
        {**NORMAL_READING, "timestamp": T + 101, "seq": 101},
        {**NORMAL_READING, "timestamp": T + 30, "seq": 102}]}, at=at)
    assert [(pr.get("repeat", False), pr.get("late", False))
            for pr in verdict["predictions"]] == [(True, False), (False, False), (False, True)]
    assert stats.late == 1 and p.devices.newest("p-7") == T + 101


messages = st.lists(  # one device's messages: (seconds after T, seq or None) per reading
    st.lists(st.tuples(st.integers(-200, 200), st.none() | st.integers(0, 30)),
             min_size=1, max_size=5),
    min_size=1, max_size=12,
)


@given(messages, st.integers(0, 90))
@settings(max_examples=300, deadline=None)
def test_lateness_keeps_its_rules_whatever_the_messages(
    sent: list[list[tuple[int, int | None]]], gap: int
) -> None:
    """Over any messages, repeats and receipt times: a reading is late only if it is
    more than 60 s older than the newest of the earlier messages and not a repeat; one
    that is so and not a repeat is late unless the device's clock is taken to have moved
    back; the on-time readings move the newest to their newest, but never beyond 60 s
    after their receipt (timestamps up to 200 s after it are sent)."""
    tracker = DeviceTracker(1, 1, 0, np.zeros(1), np.ones(1))
    for k, msg in enumerate(sent):
        received = T + gap * k
        ceiling = received + 60.0
        readings = [Reading("d", (0.0,), None, seq, T + dt, None, "", i)
                    for i, (dt, seq) in enumerate(msg)]
        st_before = tracker.devices.get("d")
        before = None if st_before is None else st_before.clock.newest
        known = [r.seq is not None and st_before is not None and st_before.seqs.known(r.seq)
                 for r in readings]
        got = tracker.arrival("d", readings, received, 60.0)
        old = [before is not None and r.timestamp < before - 60.0 for r in readings]
        late = got.late or [False] * len(readings)
        assert all(not lt or (o and not kn) for lt, o, kn in zip(late, old, known, strict=True))
        if not got.clock_reset:
            assert late == [o and not kn for o, kn in zip(old, known, strict=True)]
        on_time = [r.timestamp for r, lt in zip(readings, late, strict=True) if not lt]
        newest = tracker.devices["d"].clock.newest
        if got.clock_reset:
            assert newest == min(max(r.timestamp for r in readings), ceiling)
        elif on_time:
            capped = min(max(on_time), ceiling)
            assert newest == (capped if before is None else max(before, capped))
        else:
            assert newest == before
        for r in readings:  # judged (late ones too): their seqs are known now
            tracker.repeat("d", r.seq)
