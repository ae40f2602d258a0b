"""Devices gone quiet: the tracker, the pipeline's messages, and the running daemon
announcing a device that stopped publishing and its return, through a real Mosquitto."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from daemon import state
from daemon.config import AlertConfig, Settings, TopicsConfig
from daemon.control import Command, DeviceControl
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.presence import PresenceTracker
from daemon.readings import Decoder
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_device_control import request

# -- the tracker ----------------------------------------------------------------------------


def test_a_device_is_announced_new_once_quiet_once_and_back_once() -> None:
    t = PresenceTracker(quiet_after_s=10.0)
    new = t.seen("a", 100.0)
    assert new is not None and (new.state, new.first, new.last_seen) == ("reporting", True, 100.0)
    assert t.seen("a", 100.0) is None
    assert t.seen("b", 105.0) is not None
    assert t.due(100.0) == []  # the first check starts the clock
    assert t.due(110.0) == []  # "a" was seen 10 s ago: not more than the limit
    (quiet,) = t.due(110.5)
    assert (quiet.device_id, quiet.state, quiet.last_seen, quiet.at) == ("a", "quiet", 100.0, 110.5)
    assert t.due(111.0) == []  # announced once
    assert [e.device_id for e in t.due(115.5)] == ["b"]
    back = t.seen("a", 130.0)
    assert back is not None and (back.state, back.last_seen, back.at) == ("reporting", 100.0, 130.0)
    assert back.first is False
    assert t.seen("a", 131.0) is None  # back once
    assert t.summary("a") == {"last_seen": 131.0, "quiet": False}
    assert t.summary("b") == {"last_seen": 105.0, "quiet": True}
    assert t.summary("c") is None


def test_skipped_devices_are_announced_when_no_longer_skipped() -> None:
    t = PresenceTracker(quiet_after_s=5.0)
    t.seen("a", 0.0)
    t.due(0.0)
    assert t.due(10.0, skip={"a"}) == []
    assert [e.device_id for e in t.due(11.0)] == ["a"]


def test_after_a_restart_nothing_is_announced_before_the_limit_has_passed() -> None:
    """The broker first delivers what the devices published while the daemon was down."""
    t = PresenceTracker(quiet_after_s=60.0)
    t.seen("a", 1000.0)
    t.seen("gone", 1000.0)
    t.due(1000.0)
    assert [e.device_id for e in t.due(1061.0)] == ["a", "gone"]
    t.seen("a", 1062.0)
    saved = json.loads(json.dumps(t.to_json()))
    again = PresenceTracker(quiet_after_s=60.0)
    assert again.restore(saved) == 2
    assert again.quiet == {"gone"}  # announced before the restart: not again
    assert again.due(5000.0) == []  # hours later, but the first check after the restart
    assert again.seen("a", 5001.0) is None  # the backlog arrives
    assert again.due(5060.5) == []  # "a" was seen at 5001, "gone" is announced already
    assert [e.device_id for e in again.due(5061.5)] == ["a"]


def test_nothing_is_announced_while_cut_off_from_the_broker_nor_just_after() -> None:
    """Readings cannot arrive while anomalyd has no broker connection; once it is back,
    the broker first delivers what the devices published meanwhile."""
    t = PresenceTracker(quiet_after_s=10.0)
    t.seen("a", 0.0)
    t.due(0.0)
    for now in (5.0, 20.0, 40.0):  # disconnected from 5 s to 40 s
        t.hold(now)
        assert t.due(now) == []
    assert t.due(49.0) == []  # 9 s after the connection came back
    t.seen("a", 45.0)  # the backlog
    assert t.due(50.5) == [] and [e.device_id for e in t.due(55.5)] == ["a"]


def test_saved_presence_is_checked() -> None:
    t = PresenceTracker(quiet_after_s=1.0)
    with pytest.raises(ValueError, match="no mapping"):
        t.restore({"last_seen": [["a", 1.0]]})
    with pytest.raises(ValueError, match="not finite"):
        t.restore({"last_seen": {"a": "nan"}})
    assert t.restore({"last_seen": {"a": 1.0}, "quiet": ["a", "unknown"]}) == 1
    assert t.quiet == {"a"}


def test_off_by_default_and_the_limit_is_checked() -> None:
    assert AlertConfig().quiet_after_s == 0.0
    assert PresenceTracker(0.0).due(1e9) == []
    with pytest.raises(ValidationError, match="at least 1 second"):
        AlertConfig(quiet_after_s=0.5)
    with pytest.raises(ValidationError, match="device_id"):
        TopicsConfig(presence="anomaly/presence")
    with pytest.raises(ValidationError, match="wildcards"):
        TopicsConfig(presence="anomaly/+/{device_id}")


# -- the pipeline ---------------------------------------------------------------------------


def _pipeline(bundle: ModelBundle, quiet_after_s: float) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    return Pipeline(bundle, decoder, Settings().topics,
                    AlertConfig(raise_after=2, window=3, resolve_after=2,
                                quiet_after_s=quiet_after_s))


def _feed(pipeline: Pipeline, now: float, *readings: dict[str, Any]) -> list[Any]:
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), now) for r in readings]
    return [o for outs in pipeline.process(msgs, now)[0] for o in outs]


def test_the_pipeline_announces_a_quiet_device_and_its_return(model_bundle: ModelBundle) -> None:
    p = _pipeline(model_bundle, quiet_after_s=30.0)
    outs = _feed(p, 1000.0, NORMAL, NORMAL)  # a new device: reporting, once
    assert [o.kind for o in outs] == ["verdict", "presence", "verdict"]
    assert orjson.loads(outs[1].payload) == {
        "device_id": "p-1", "state": "reporting", "last_seen": "1970-01-01T00:16:40.000Z",
        "quiet_for_s": 0.0, "quiet_after_s": 30.0, "published_at": "1970-01-01T00:16:40.000Z",
        "first_seen": True,
    }
    assert p.fleet.newly_quiet(1000.0) == [] and p.fleet.newly_quiet(1030.0) == []
    (event,) = p.fleet.newly_quiet(1031.0)
    out = p.payloads.presence(event)
    assert out.topic == "anomaly/p-1/presence" and out.retain and out.kind == "presence"
    assert orjson.loads(out.payload) == {
        "device_id": "p-1", "state": "quiet", "last_seen": "1970-01-01T00:16:40.000Z",
        "quiet_for_s": 31.0, "quiet_after_s": 30.0, "published_at": "1970-01-01T00:17:11.000Z",
    }
    # its next reading: the verdict, and the retained "reporting" beside it
    outs = _feed(p, 1100.0, ANOMALOUS)
    assert [o.kind for o in outs] == ["verdict", "presence"]
    back = orjson.loads(outs[1].payload)
    assert back["state"] == "reporting" and back["quiet_for_s"] == 100.0
    assert "first_seen" not in back
    assert back["last_seen"] == "1970-01-01T00:18:20.000Z"
    assert [o.kind for o in _feed(p, 1101.0, NORMAL)] == ["verdict"]  # once
    # a batch message that brings it back says so too
    assert p.fleet.newly_quiet(1200.0)[0].device_id == "p-1"
    outs = _feed(p, 1300.0, {"readings": [NORMAL, NORMAL]})
    assert [o.kind for o in outs] == ["verdict", "presence"]
    # a redelivered reading says nothing about the device being there now
    _feed(p, 1301.0, {**NORMAL, "seq": 5})
    assert p.fleet.newly_quiet(1400.0)[0].device_id == "p-1"
    assert [o.kind for o in _feed(p, 1401.0, {**NORMAL, "seq": 5})] == ["verdict"]


def test_a_silenced_device_is_announced_only_after_its_silence(
    model_bundle: ModelBundle,
) -> None:
    p = _pipeline(model_bundle, quiet_after_s=10.0)
    now = [1000.0]
    control = DeviceControl(p, Metrics(CollectorRegistry()), lambda _o: True,
                            lambda: None, clock=lambda: now[0])
    _feed(p, 1000.0, NORMAL)
    p.fleet.newly_quiet(1000.0)
    control.execute(Command("silence", "p-1", 60.0))  # a maintenance window
    assert p.fleet.newly_quiet(1020.0) == [] and p.fleet.newly_quiet(1059.0) == []
    assert control.show("p-1")["quiet"] is False
    assert [e.device_id for e in p.fleet.newly_quiet(1061.0)] == ["p-1"]
    now[0] = 1062.0
    shown = control.show("p-1")
    assert shown["quiet"] is True and shown["last_seen"] == "1970-01-01T00:16:40.000Z"


def test_presence_survives_a_restart_and_a_reload(model_bundle: ModelBundle) -> None:
    p = _pipeline(model_bundle, quiet_after_s=10.0)
    _feed(p, 1000.0, NORMAL)
    p.fleet.newly_quiet(1000.0)
    assert len(p.fleet.newly_quiet(1011.0)) == 1
    snapshot = orjson.loads(state.encode(p.fleet.snapshot()))
    again = _pipeline(model_bundle, quiet_after_s=10.0)
    assert again.fleet.restore(snapshot)[2] == []
    assert again.fleet.newly_quiet(2000.0) == []
    assert again.fleet.newly_quiet(2011.0) == []  # announced before the restart: not twice
    outs = _feed(again, 2012.0, NORMAL)
    assert [o.kind for o in outs] == ["verdict", "presence"]
    old = {k: v for k, v in snapshot.items() if k != "presence"}  # saved before presence
    assert again.fleet.restore(old)[2] == [] and again.presence.last_seen == {}
    # a state saved before presence was kept: its devices are announced as new
    assert [o.kind for o in _feed(again, 2013.0, NORMAL)] == ["verdict", "presence"]
    bad = {**snapshot, "presence": {"last_seen": 5}}
    assert again.fleet.restore(bad)[2] == ["presence: saved presence has no mapping of device to "
                                     "last-seen time"]


# -- the running daemon -----------------------------------------------------------------


@pytest.mark.integration
def test_the_daemon_announces_a_device_that_stopped_publishing(
    broker: Broker,
    trained_model_dir: Any,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "presence-pump-1"
    topic = f"anomaly/{dev}/presence"
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(
        update={"alerts": AlertConfig(quiet_after_s=1.0)}
    )
    col = collector_for(broker, [topic])
    svc = start_daemon(settings=settings)
    pub = publisher_for(broker)
    for i in range(3):
        pub.send(f"sensors/{dev}/readings", {**NORMAL, "seq": i})
    new, quiet = col.json_on(topic, count=2, timeout=15)
    assert new["state"] == "reporting" and new["first_seen"] is True
    assert quiet["state"] == "quiet" and quiet["quiet_for_s"] > 1.0
    status, shown, _ = request(svc.http.port, "GET", f"/devices/{dev}")
    assert status == 200 and shown["quiet"] is True
    pub.send(f"sensors/{dev}/readings", {**NORMAL, "seq": 3})
    back = col.json_on(topic, count=3, timeout=15)[2]
    assert back["state"] == "reporting" and back["quiet_for_s"] >= quiet["quiet_for_s"]
    assert "first_seen" not in back
    # retained: a subscriber that comes later sees the device's last presence at once
    late = collector_for(broker, [topic])
    (retained,) = late.json_on(topic, count=1, timeout=10)
    assert retained["state"] in ("reporting", "quiet")  # it may have gone quiet again
    assert late.messages[0][2] is True
    _, text, _ = request(svc.http.port, "GET", "/metrics")
    assert 'anomalyd_presence_changes_total{state="quiet"}' in text
    assert 'anomalyd_presence_changes_total{state="reporting"} 2.0' in text  # new, back
