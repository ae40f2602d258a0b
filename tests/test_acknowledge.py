"""Acknowledging an active alert: the tracker keeps who and when until the alert resolves
or escalates; the retained alert is published again as "acknowledged" with what it was
raised for; the HTTP rules; and the command line against the real daemon and Mosquitto."""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from daemon import state
from daemon.alerts import Acknowledgement, AlertTracker
from daemon.config import AlertConfig, BaselineConfig, Settings, TopicsConfig
from daemon.control import Command, DeviceControl, UnknownDeviceError
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.payloads import Outbound
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.watch import describe
from tests.broker import Broker
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.test_cli import anomalyd
from tests.test_device_control import TOKEN, bare_server, normal, request, warm_settings

__all__ = ["warm_settings"]  # a fixture the integration test below uses

ALICE = Acknowledgement(1000.0, "alice", "valve 3 replaced at 14:00")


def test_an_acknowledgement_holds_until_the_alert_resolves_and_the_resolution_names_it() -> None:
    t = AlertTracker(raise_after=1, window=1, resolve_after=2)
    assert t.acknowledge("p-1", ALICE) is None  # unknown device: nothing to acknowledge
    t.observe("p-1", False, "minor", 0.0, 1.0)
    assert t.acknowledge("p-1", ALICE) is None  # known, no active alert
    raised = t.observe("p-1", True, "major", 3.0, 2.0)
    assert raised is not None and raised.acknowledged is None
    st = t.acknowledge("p-1", ALICE)
    assert st is not None and st.acknowledged == ALICE
    assert t.observe("p-1", True, "minor", 1.0, 3.0) is None  # a lesser one changes nothing
    assert t.observe("p-1", False, "minor", 0.0, 4.0) is None
    resolved = t.observe("p-1", False, "minor", 0.0, 5.0)
    assert resolved is not None and resolved.transition == "resolved"
    assert resolved.acknowledged == ALICE
    again = t.observe("p-1", True, "major", 3.0, 6.0)  # a new incident starts unacknowledged
    assert again is not None and again.transition == "raised" and again.acknowledged is None
    summary = t.summary("p-1")
    assert summary is not None and summary["acknowledged"] is None


def test_an_escalation_drops_the_acknowledgement() -> None:
    t = AlertTracker(raise_after=1, window=1, resolve_after=1)
    t.observe("p-1", True, "minor", 1.0, 1.0)
    t.acknowledge("p-1", ALICE)
    escalated = t.observe("p-1", True, "critical", 20.0, 2.0)
    assert escalated is not None and escalated.transition == "escalated"
    assert t.devices["p-1"].acknowledged is None
    resolved = t.observe("p-1", False, "minor", 0.0, 3.0)
    assert resolved is not None and resolved.acknowledged is None


def test_the_acknowledgement_and_the_last_message_survive_a_restart() -> None:
    t = AlertTracker(raise_after=1, window=1, resolve_after=1)
    t.observe("p-1", True, "major", 3.0, 1.0)
    t.record_message("p-1", {"state": "raised", "explanation": "flow 12 is 9σ below"})
    t.acknowledge("p-1", ALICE)
    t.record_message("p-2", {"state": "raised"})  # no alert: not kept
    saved = orjson.loads(state.encode(t.to_json()))  # as written and read back
    again = AlertTracker(raise_after=1, window=1, resolve_after=1)
    assert again.restore(saved) == 1
    st = again.devices["p-1"]
    assert st.acknowledged == ALICE and st.message == {"state": "raised",
                                                      "explanation": "flow 12 is 9σ below"}
    for dev in saved["devices"].values():  # saved before acknowledgements existed
        del dev["acknowledged"], dev["message"]
    older = AlertTracker(raise_after=1, window=1, resolve_after=1)
    assert older.restore(saved) == 1 and older.devices["p-1"].acknowledged is None
    saved["devices"]["p-1"]["acknowledged"] = {"at": 5.0, "by": 7, "note": None}
    with pytest.raises(ValueError, match="saved acknowledgement"):
        AlertTracker(raise_after=1, window=1, resolve_after=1).restore(saved)


def _pipeline(bundle: ModelBundle) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    alerts = AlertConfig(raise_after=1, window=1, resolve_after=2)
    return Pipeline(bundle, decoder, TopicsConfig(), alerts, warmup=0)


def _feed(p: Pipeline, *readings: dict[str, Any]) -> list[dict[str, Any]]:
    """The alert messages the readings caused."""
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in readings]
    outputs, _ = p.process(msgs, 1000.0)
    return [orjson.loads(o.payload) for outs in outputs for o in outs if o.kind == "alert"]


def test_acknowledging_republishes_the_raised_alert_retained_saves_and_counts(
    model_bundle: ModelBundle,
) -> None:
    p = _pipeline(model_bundle)
    published: list[Outbound] = []
    saves: list[int] = []
    metrics = Metrics(CollectorRegistry())
    control = DeviceControl(p, metrics, lambda o: published.append(o) or True,
                            lambda: saves.append(1), clock=lambda: 1234.5)
    with pytest.raises(UnknownDeviceError):
        control.execute(Command("ack", "p-1", by="alice"))
    _feed(p, normal(0))
    quiet = control.execute(Command("ack", "p-1", by="alice"))
    assert quiet == {"device_id": "p-1", "alert_active": False, "acknowledged": None,
                     "published": False}
    assert published == [] and saves == []

    (raised,) = _feed(p, ANOMALOUS)
    assert raised["state"] == "raised" and raised["acknowledged"] is None
    done = control.execute(Command("ack", "p-1", by="alice", note="on my way"))
    assert done["alert_active"] and done["published"] and done["severity"] == raised["severity"]
    (out,) = published
    assert out.topic == "anomaly/p-1/alert" and out.retain
    body = orjson.loads(out.payload)
    ack = {"at": "2026-01-01T00:00:00.000Z", "by": "alice", "note": "on my way"}
    ack["at"] = body["acknowledged"]["at"]
    assert body == {**raised, "state": "acknowledged", "published_at": ack["at"],
                    "acknowledged": ack}  # what it was raised for, as it was
    assert ack["at"].startswith("1970-01-01T00:20:34.5")  # the control's clock
    assert saves == [1]
    assert metrics.registry.get_sample_value("anomalyd_alert_acknowledgements_total") == 1
    shown = control.execute(Command("show", "p-1"))["alert"]
    assert shown["acknowledged"] == ack

    resolved = _feed(p, normal(1), normal(2))
    assert [a["state"] for a in resolved] == ["resolved"]
    assert resolved[0]["acknowledged"] == ack
    assert describe("anomaly/p-1/alert", out.payload, Settings()).startswith(
        "ALERT   p-1 acknowledged by alice (on my way) [")


def test_a_device_listed_only_by_its_silence_has_no_alert_to_acknowledge(
    model_bundle: ModelBundle,
) -> None:
    """A device ``anomalyd devices`` lists (here by its silence: silenced before its first
    reading, or re-warmed with only its presence left) is known to ``ack`` as well: no
    active alert, not "the daemon does not know device" (404) as it was."""
    control = DeviceControl(_pipeline(model_bundle), Metrics(CollectorRegistry()),
                            lambda o: True, lambda: None, clock=lambda: 1234.5)
    control.execute(Command("silence", "p-2", seconds=3600))
    assert [d["device_id"] for d in control.execute(Command("list"))["devices"]] == ["p-2"]
    assert control.execute(Command("ack", "p-2", by="alice")) == {
        "device_id": "p-2", "alert_active": False, "acknowledged": None, "published": False}
    with pytest.raises(UnknownDeviceError):  # one never heard of is still unknown
        control.execute(Command("ack", "p-3", by="alice"))


def test_acknowledge_paths_and_texts_are_checked_before_the_scorer_is_asked() -> None:
    with bare_server("127.0.0.1") as server:
        port = server.port
        for query, words in (("who=bob", "takes 'by' and 'note'"),
                             ("by=a&by=b", "each be given once"),
                             ("note=" + "x" * 501, "at most 500 characters"),
                             ("by=" + "x" * 65, "at most 64 characters"),
                             ("note=line%0Abreak", "control character"),
                             ("by", "bad query string")):
            status, body, _ = request(port, "POST", f"/devices/p-1/ack?{query}")
            assert status == 400 and words in body["error"], (query, body)
        status, _, resp = request(port, "GET", "/devices/p-1/ack")
        assert status == 405 and resp.getheader("Allow") == "POST"
        assert request(port, "POST", "/devices/p-1/ack/now")[0] == 404
        # good requests reach the queue (nobody drains it here: 503)
        assert request(port, "POST", "/devices/p-1/ack")[0] == 503
        assert request(port, "POST", "/devices/p-1/ack?by=al%20ice&note=ok")[0] == 503


def test_acknowledge_texts_on_the_command_line() -> None:
    res = anomalyd("ack", "p-1", "--note", "two\nlines")
    assert res.returncode == 2 and "control character" in res.stderr
    res = anomalyd("ack", "p-1", "--by", "x" * 65)
    assert res.returncode == 2 and "at most 64 characters" in res.stderr


@pytest.mark.integration
def test_cli_acknowledges_the_running_daemon_s_alert_which_a_late_subscriber_sees(
    broker: Broker,
    warm_settings: Settings,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "ctl-ack-1"
    alerts = f"anomaly/{dev}/alert"
    col = collector_for(broker, [f"anomaly/{dev}/#"])
    svc = start_daemon(settings=warm_settings.model_copy(
        update={"baseline": BaselineConfig(warmup_readings=0)}))
    pub = publisher_for(broker)
    env = {"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(svc.http.port), "HEALTH_TOKEN": TOKEN,
           "STATE_DIR": str(svc.settings.state.dir)}  # its layout.json: the layout it runs
    pub.send(f"sensors/{dev}/readings", normal(0))
    col.json_on(f"anomaly/{dev}/verdict", count=1)
    res = anomalyd("ack", dev, "--by", "alice", env=env)
    assert res.returncode == 1 and "has no active alert to acknowledge" in res.stderr

    for i in range(3):  # the default rule: 3 of the last 5 raise
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": 10 + i})
    (raised,) = col.json_on(alerts, count=1)
    res = anomalyd("ack", dev, "--by", "alice", "--note", "pump 2 isolated", env=env)
    assert res.returncode == 0, res.stderr
    assert f"{dev}: {raised['severity']} alert acknowledged by alice at " in res.stdout
    acked = col.json_on(alerts, count=2)[1]
    assert acked["state"] == "acknowledged" and acked["active"] is True
    assert acked["explanation"] == raised["explanation"] and acked["key"] == raised["key"]
    assert acked["acknowledged"]["by"] == "alice"
    assert acked["acknowledged"]["note"] == "pump 2 isolated"
    res = anomalyd("devices", env=env)
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(dev)]
    assert "(acknowledged by alice)" in line
    col_2 = collector_for(broker, ["anomaly/ctl-ack-2/verdict"])
    pub.send("sensors/ctl-ack-2/readings", normal(1))  # a device not in alert
    col_2.json_on("anomaly/ctl-ack-2/verdict", count=1)
    assert "ctl-ack-2" in anomalyd("devices", env=env).stdout
    res = anomalyd("devices", "--alerts", env=env)
    assert res.returncode == 0
    assert [ln.split()[0] for ln in res.stdout.splitlines()[1:]] == [dev]
    res = anomalyd("devices", dev, "--alerts", env=env)
    assert res.returncode == 2 and "takes no device id" in res.stderr

    late = collector_for(broker, [alerts])  # a dashboard that connects now
    assert late.json_on(alerts, count=1)[0]["state"] == "acknowledged"
    for i in range(10):  # the default rule: 10 normal verdicts resolve
        pub.send(f"sensors/{dev}/readings", normal(20 + i))
    resolved = col.json_on(alerts, count=3)[2]
    assert resolved["state"] == "resolved"
    assert resolved["acknowledged"] == acked["acknowledged"]


def test_a_message_without_one_kept_still_acknowledges() -> None:
    """An alert raised before messages were kept (restored from older state) is published
    in the shape of a cleared alert, with the acknowledgement."""
    from daemon.alerts import AlertState
    from daemon.payloads import Payloads

    payloads = Payloads(TopicsConfig(), AlertConfig(), "v1")
    st = AlertState(deque([True]), active=True, severity="major", raised_at=10.0,
                    peak_margin=4.0)
    out = payloads.acknowledged_alert("p-9", st, ALICE, 2000.0)
    body = orjson.loads(out.payload)
    assert body["state"] == "acknowledged" and body["active"] is True
    assert body["severity"] == "major" and body["raised_at"].startswith("1970-01-01T00:00:10")
    assert body["acknowledged"]["by"] == "alice" and out.retain
