"""What survives a restart when the saved state no longer fits the configuration.

Alert states must survive any change (the broker keeps each device's last retained alert,
and only a tracker that knows it is raised will publish "resolved"); windows, baselines
and seq windows only survive for the same model schema, and a change of warm-up length
restarts only the warm-ups that cannot continue under it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon import state
from daemon.config import AlertConfig, StateConfig, TopicsConfig
from daemon.fleet import describe_warmup_change
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING

ALERTS = AlertConfig(raise_after=1, window=1, resolve_after=2)


def normal(i: int) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    return {k: v * (1 + 0.01 * float(rng.normal())) for k, v in NORMAL_READING.items()}


def pipeline(bundle: ModelBundle, warmup: int) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    return Pipeline(bundle, decoder, TopicsConfig(), ALERTS, warmup=warmup)


def feed(p: Pipeline, *readings: dict[str, Any]) -> list[dict[str, Any]]:
    """The alert messages the readings caused."""
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in readings]
    outputs, _ = p.process(msgs, 1000.0)
    return [orjson.loads(o.payload) for outs in outputs for o in outs if o.kind == "alert"]


def saved_with_a_raised_alert(bundle: ModelBundle, tmp_path: Path) -> Path:
    before = pipeline(bundle, warmup=4)
    feed(before, *(normal(i) for i in range(4)))
    (raised,) = feed(before, ANOMALOUS_READING)
    assert raised["state"] == "raised"
    path = tmp_path / "devices.json"
    state.save(path, before.fleet.snapshot())
    return path


def test_the_same_configuration_restores_devices_and_alert_states(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    snapshot = state.load(saved_with_a_raised_alert(model_bundle, tmp_path))
    assert snapshot is not None
    after = pipeline(model_bundle, warmup=4)
    assert after.fleet.restore(snapshot) == (1, 1, [])
    assert after.devices.summary("p-1") is not None
    (resolved,) = feed(after, normal(10), normal(11))
    assert resolved["state"] == "resolved"


def verdicts(p: Pipeline, *readings: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in readings]
    outputs, _ = p.process(msgs, 1000.0)
    return [orjson.loads(o.payload) for outs in outputs for o in outs if o.kind == "verdict"]


@pytest.mark.parametrize("warmup", [2, 8])  # shorter, longer
def test_another_warm_up_length_keeps_fitted_baselines_repeats_and_the_raised_alert(
    model_bundle: ModelBundle, tmp_path: Path, warmup: int
) -> None:
    """The operator changed warmup_readings: a device whose baseline is fitted keeps it
    (its next verdicts are not ``warming_up``), its seq window (a redelivered reading is a
    repeat) and its raised alert."""
    before = pipeline(model_bundle, warmup=4)
    verdicts(before, *({**normal(i), "seq": i} for i in range(5)))
    (raised,) = feed(before, {**ANOMALOUS_READING, "seq": 5})
    assert raised["state"] == "raised"
    path = tmp_path / "devices.json"
    state.save(path, before.fleet.snapshot())
    snapshot = state.load(path)
    assert snapshot is not None
    after = pipeline(model_bundle, warmup=warmup)
    assert after.fleet.restore(snapshot) == (1, 1, [])
    change = after.fleet.warmup_change
    assert change is not None and (change.saved, change.now, change.fitted) == (4, warmup, 1)
    assert change.restarted == []
    assert describe_warmup_change(change) == (
        f"warm-up length changed from 4 to {warmup} readings: 1 fitted baseline kept as "
        f"fitted, 0 unfinished warm-ups continued towards {warmup} readings, 0 unfinished "
        "warm-ups restarted (from their next reading). Every device's window, seq window "
        "(repeats) and alert state is kept")
    summary = after.devices.summary("p-1")
    assert summary is not None and summary["warming_up"] is False
    assert summary["baseline_threshold"] == before.devices.summary("p-1")["baseline_threshold"]
    out = verdicts(after, {**normal(3), "seq": 3}, {**normal(10), "seq": 10})
    assert [v.get("repeat", False) for v in out] == [True, False]
    assert [v["warming_up"] for v in out] == [False, False]
    # the alert the broker still holds as raised is resolved once the device is normal
    (resolved,) = feed(after, normal(11))
    assert resolved["state"] == "resolved" and resolved["device_id"] == "p-1"


def test_state_of_another_model_schema_keeps_only_the_alert_states(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    snapshot = state.load(saved_with_a_raised_alert(model_bundle, tmp_path))
    assert snapshot is not None
    snapshot["schema"] = {"features": ["something", "else"], "window": 1}
    after = pipeline(model_bundle, warmup=4)
    devices, alerts, problems = after.fleet.restore(snapshot)
    assert (devices, alerts) == (0, 1)
    assert len(problems) == 1 and "['something', 'else']" in problems[0]
    assert after.alert_states.is_active("p-1")


def test_the_state_file_keeps_every_value_exactly(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    """Every float as it was, and the widest seq mask (64 bits); a file that is not strict
    JSON is refused as unreadable (the daemon then starts afresh)."""
    before = pipeline(model_bundle, warmup=4)
    feed(before, *({**normal(i), "seq": 2**63 - 64 + i} for i in range(70)))
    snap = before.fleet.snapshot()
    (dev,) = snap["devices"]["devices"].values()
    assert dev["seq_mask"] == 2**64 - 1  # 64 consecutive seq values seen
    path = tmp_path / "devices.json"
    state.save(path, snap)
    loaded = state.load(path)
    assert loaded is not None
    assert loaded == {"format": state.FORMAT, **_plain(snap)}
    after = pipeline(model_bundle, warmup=4)
    assert after.fleet.restore(loaded) == (1, 1, [])
    path.write_bytes(b'{"format": 1, "devices": NaN}')
    with pytest.raises(state.StateError, match="unreadable state"):
        state.load(path)


def test_each_device_is_saved_as_it_was_at_its_turn(model_bundle: ModelBundle) -> None:
    """The state writer encodes a snapshot a device at a time while the scorer goes on
    between slices: a device's entry is made at its turn (taking the snapshot copies
    nothing), and once made it holds nothing the scorer changes afterwards."""
    p = pipeline(model_bundle, warmup=4)
    feed(p, *(normal(i) for i in range(6)))  # fitted: the centre now adapts in place
    fresh = pipeline(model_bundle, warmup=4)
    feed(fresh, normal(100))  # a device still fitting: its moments change in place
    snap, snap_fitting = p.fleet.snapshot(), fresh.fleet.snapshot()
    # made at its turn: the readings after the snapshot, before the device's turn, count
    feed(p, normal(6))
    assert state.encode(snap) == state.encode(p.fleet.snapshot())
    # once made, an entry stays as it was made, while the device itself changes
    def entries(s: dict[str, Any]) -> list[dict[str, Any]]:
        return [s["devices"]["devices"]["p-1"], s["alerts"]["devices"]["p-1"]]

    def dumped(es: list[dict[str, Any]]) -> list[bytes]:
        return [orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY) for e in es]

    made = entries(snap) + entries(snap_fitting)[:1]
    as_made = dumped(made)
    feed(p, *(normal(i) for i in range(7, 12)), ANOMALOUS_READING)
    feed(fresh, normal(101), normal(102))
    assert dumped(made) == as_made
    now = dumped(entries(p.fleet.snapshot()) + entries(fresh.fleet.snapshot())[:1])
    assert all(a != b for a, b in zip(now, as_made, strict=True))
    st = p.devices.devices["p-1"]
    assert st.scale is not None and not st.scale.flags.writeable  # shared, never changed
    # a device forgotten before its turn is left out; one first seen since waits
    p.fleet.forget("p-1")
    p.process([RawMessage("sensors/p-2/readings", orjson.dumps(normal(0)), 0.0)], 1000.0)
    assert list(snap["devices"]["devices"]) == [] and list(snap["alerts"]["devices"]) == []


def test_the_state_writer_encodes_in_slices_and_writes_the_newest_snapshot(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    p = pipeline(model_bundle, warmup=4)
    for i in range(40):  # devices enough for many slices of 64 pieces
        msg = RawMessage(f"sensors/d-{i}/readings", orjson.dumps(normal(i)), 0.0)
        p.process([msg], 1000.0)
    path = tmp_path / "devices.json"
    errors: list[Exception] = []
    writer = state.StateWriter(path, errors.append)
    writer.submit(p.fleet.snapshot())
    writer.step(0.0)  # one slice: the encoding goes on, nothing is written yet
    assert writer.encoding and not writer.idle and not path.exists()
    feed(p, normal(99))
    newest = p.fleet.snapshot()
    writer.submit(newest)  # replaces the one half encoded
    slices = 0
    while writer.encoding:
        writer.step(0.0)
        slices += 1
    assert slices > 2
    assert writer.flush(10.0) and writer.idle and errors == []
    loaded = state.load(path)
    assert loaded is not None and loaded == orjson.loads(state.encode(newest))
    assert pipeline(model_bundle, warmup=4).fleet.restore(loaded)[0] == 41
    assert writer.close(10.0)
    feed(p, normal(100))  # after close, a snapshot is written on the caller's thread
    writer.submit(p.fleet.snapshot())
    assert writer.flush(0.0)
    assert state.load(path) == orjson.loads(state.encode(p.fleet.snapshot()))


def test_a_failed_state_write_is_reported_and_the_next_one_still_made(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    p = pipeline(model_bundle, warmup=4)
    feed(p, normal(0))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the state directory should be")
    errors: list[Exception] = []
    writer = state.StateWriter(blocked / "devices.json", errors.append)
    writer.submit(p.fleet.snapshot())
    assert writer.flush(10.0)
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    blocked.unlink()
    writer.submit(p.fleet.snapshot())
    assert writer.close(10.0) and len(errors) == 1
    assert state.load(blocked / "devices.json") is not None

def _plain(value: Any) -> Any:
    """``value`` with numpy arrays and tuples as lists (what JSON holds), floats exact."""
    if isinstance(value, Mapping):  # a snapshot's devices are made when read
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@pytest.mark.integration
def test_the_running_daemon_saves_its_state_periodically_while_it_scores(
    broker: Any, trained_model_dir: Path, start_daemon: Any, publisher_for: Any
) -> None:
    """The periodic save of the live daemon: the scorer takes the snapshot and encodes it
    between batches, a thread writes it; the file appears without a stop."""
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(update={"state": StateConfig(
        dir=settings.state.dir, save_interval_s=0.2)})
    svc = start_daemon(settings=settings)
    pub = publisher_for(broker)
    path = svc.state_path
    deadline = time.monotonic() + 15.0
    seen: dict[str, Any] = {}
    i = 0
    while time.monotonic() < deadline:
        pub.send("sensors/saved-1/readings", {**NORMAL_READING, "seq": i})
        i += 1
        loaded = state.load(path) if path.exists() else None
        if loaded is not None and "saved-1" in loaded["alerts"]["devices"]:
            seen = loaded
            break
        time.sleep(0.05)
    assert seen, f"no state file with the device within 15 s ({i} readings sent)"
    assert svc.mqtt.loop_alive  # written while running, not at a stop
    saved_at = 0.0
    while time.monotonic() < deadline + 5.0 and not saved_at:  # set just after the rename
        saved_at = svc.metrics.registry.get_sample_value(
            "anomalyd_state_saved_timestamp_seconds") or 0.0
        time.sleep(0.01)
    assert abs(saved_at - time.time()) < 30.0


def test_a_malformed_part_of_the_state_is_dropped_and_the_rest_restored(
    model_bundle: ModelBundle,
) -> None:
    """Valid JSON of the wrong shape (a hand edit, a bug) costs the part it is in, never
    the start: here a re-warmed device's seq window that is a number, not an object."""
    before = pipeline(model_bundle, warmup=4)
    feed(before, *(normal(i) for i in range(4)))
    feed(before, ANOMALOUS_READING)
    snap = orjson.loads(state.encode(before.fleet.snapshot()))
    snap["devices"]["kept_seqs"] = {"p-9": 5}
    after = pipeline(model_bundle, warmup=4)
    devices, alerts, problems = after.fleet.restore(snap)
    assert (devices, alerts) == (0, 1)
    assert len(problems) == 1 and problems[0].startswith("device state:")
    assert after.alert_states.is_active("p-1")


def test_a_raised_alert_is_saved_at_once_not_at_the_next_periodic_save(
    broker: Any, trained_model_dir: Path, start_daemon: Any, publisher_for: Any,
    collector_for: Any, model_bundle: ModelBundle,
) -> None:
    """The readings that raised it are acknowledged already: a daemon killed before its
    periodic save (an hour away here) would restart without the alert, while the broker
    keeps it retained as raised, and nothing would ever resolve it."""
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(update={
        "state": StateConfig(dir=settings.state.dir, save_interval_s=3600.0),
        "alerts": ALERTS})
    svc = start_daemon(settings=settings)
    col = collector_for(broker, ["anomaly/saved-2/alert"])
    pub = publisher_for(broker)
    pub.send("sensors/saved-2/readings", {**ANOMALOUS_READING, "seq": 1})
    (raised,) = col.json_on("anomaly/saved-2/alert", count=1)
    assert raised["state"] == "raised"
    restarted = pipeline(model_bundle, warmup=0)
    deadline = time.monotonic() + 15.0
    while not restarted.alert_states.is_active("saved-2"):
        assert time.monotonic() < deadline, "the raised alert was not saved within 15 s"
        loaded = state.load(svc.state_path) if svc.state_path.exists() else None
        if loaded is not None:
            restarted.fleet.restore(loaded)
        time.sleep(0.05)
    assert svc.mqtt.loop_alive  # saved while running, not at a stop


def test_an_unreadable_state_file_is_set_aside_not_overwritten(
    broker: Any, trained_model_dir: Path, start_daemon: Any, publisher_for: Any
) -> None:
    """A state file that cannot be read (cut short by a copy, a hand edit) is discarded,
    as before: the daemon starts and its devices warm up again. It was overwritten by the
    first save, so no one could look at it or mend it; it is now renamed beside the new
    one and the log says where."""
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(update={"state": StateConfig(
        dir=settings.state.dir, save_interval_s=0.2)})
    settings.state.dir.mkdir(parents=True, exist_ok=True)
    broken = b'{"format": 4, "devices": {"windows": {"p-1": [1.0, 2'
    (settings.state.dir / "devices.json").write_bytes(broken)
    svc = start_daemon(settings=settings)
    (kept,) = settings.state.dir.glob("devices.json.unreadable-*")
    assert kept.read_bytes() == broken
    pub = publisher_for(broker)
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:  # the daemon saves its own state beside it
        pub.send("sensors/after-1/readings", NORMAL_READING)
        if svc.state_path.exists() and "after-1" in state.load(svc.state_path)["alerts"][
                "devices"]:
            break
        time.sleep(0.05)
    assert "after-1" in state.load(svc.state_path)["alerts"]["devices"]
    assert kept.read_bytes() == broken
