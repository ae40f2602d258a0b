"""How many devices anomalyd keeps state for (``limits.max_devices``), and forgetting a
device taken out of service: in the pipeline, through the control, and through the
running daemon, the command line and a real Mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError

from daemon.config import AlertConfig, HttpConfig, LimitsConfig, Settings
from daemon.control import Command, DeviceControl, UnknownDeviceError
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.payloads import Outbound
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_cli import anomalyd
from tests.test_device_control import bare_server, request

TOKEN = "tok-device-limits"


def _pipeline(bundle: ModelBundle, max_devices: int | None) -> Pipeline:
    decoder = Decoder(bundle.features, bundle.detector_names)
    return Pipeline(bundle, decoder, Settings().topics,
                    AlertConfig(raise_after=2, window=3, resolve_after=2, quiet_after_s=60.0),
                    max_devices=max_devices)


def _feed(p: Pipeline, *msgs: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each message's first output (verdict or dead letter), decoded."""
    raw = [RawMessage(f"sensors/{dev}/readings", orjson.dumps(body), 0.0) for dev, body in msgs]
    return [orjson.loads(outs[0].payload) for outs in p.process(raw, 1000.0)[0]]


# -- the limit ------------------------------------------------------------------------------


def test_devices_beyond_the_limit_are_dead_lettered_and_the_known_ones_still_judged(
    model_bundle: ModelBundle,
) -> None:
    p = _pipeline(model_bundle, max_devices=2)
    assert all("is_anomaly" in v for v in _feed(p, ("a", NORMAL), ("b", NORMAL)))
    # one batch: a known device, two new ones (no room), a known one's batch message
    out = _feed(p, ("a", NORMAL), ("c", NORMAL), ("d", {"readings": [NORMAL, NORMAL]}),
                ("b", {"readings": [NORMAL]}))
    assert "is_anomaly" in out[0] and out[3]["total_samples"] == 1
    for dead, dev in ((out[1], "c"), (out[2], "d")):
        assert dead["reason"] == "too_many_devices" and dead["device_id"] == dev
        assert dead["detail"] == (
            "anomalyd already keeps state for 2 devices (limits.max_devices); forget a "
            "device that is gone (anomalyd forget) or raise the limit")
        assert dead["payload"]  # the reading is not lost: it is in the dead letter
    assert sorted(p.devices.devices) == ["a", "b"]
    p.fleet.forget("a")  # room for one more
    out = _feed(p, ("c", NORMAL), ("d", NORMAL))
    assert "is_anomaly" in out[0] and out[1]["reason"] == "too_many_devices"


def test_new_devices_in_one_batch_are_counted_before_any_has_state(
    model_bundle: ModelBundle,
) -> None:
    p = _pipeline(model_bundle, max_devices=3)
    out = _feed(p, *[(f"n{i}", NORMAL) for i in range(5)])
    assert [("is_anomaly" in v) for v in out] == [True, True, True, False, False]
    assert len(p.devices.devices) == 3
    # a device whose only message is refused for another reason takes no room
    q = _pipeline(model_bundle, max_devices=1)
    bad = _feed(q, ("x", {"temperature": "hot"}), ("y", NORMAL))
    assert bad[0]["reason"] != "too_many_devices" and "is_anomaly" in bad[1]


def test_the_limit_defaults_to_ten_thousand_devices_and_is_positive() -> None:
    assert LimitsConfig().max_devices == 10_000
    with pytest.raises(ValidationError):
        LimitsConfig(max_devices=0)


# -- forget ---------------------------------------------------------------------------------


def test_forget_drops_every_state_and_deletes_the_retained_messages(
    model_bundle: ModelBundle,
) -> None:
    p = _pipeline(model_bundle, max_devices=None)
    published: list[Outbound] = []
    saves: list[int] = []
    registry = CollectorRegistry()
    control = DeviceControl(p, Metrics(registry), lambda o: published.append(o) is None,
                            lambda: saves.append(1), clock=lambda: 1000.0)
    _feed(p, ("gone", ANOMALOUS), ("gone", ANOMALOUS), ("kept", NORMAL))
    control.execute(Command("silence", "gone", 60.0))
    assert p.alert_states.is_active("gone")
    done = control.execute(Command("forget", "gone"))
    assert done["known"] is True and done["retained_cleared"] is True
    assert done["before"]["alert"]["active"] is True
    assert [(o.topic, o.payload, o.retain) for o in published] == [
        ("anomaly/gone/alert", b"", True), ("anomaly/gone/presence", b"", True)]
    with pytest.raises(UnknownDeviceError):
        control.show("gone")
    assert "gone" not in p.alert_states.silences and "gone" not in p.presence.last_seen
    assert [d["device_id"] for d in control.execute(Command("list"))["devices"]] == ["kept"]
    assert registry.get_sample_value("anomalyd_devices") == 1  # at once, not at the next batch
    assert saves == [1, 1]  # the silence, then the forget: written at once
    # unknown here (a typo, or a device another worker held): deleted at the broker anyway
    again = control.execute(Command("forget", "never-seen"))
    assert again == {"device_id": "never-seen", "known": False, "retained_cleared": True,
                     "before": None}
    assert registry.get_sample_value("anomalyd_device_forgets_total") == 2


def test_forget_is_a_post_under_the_device() -> None:
    with bare_server("127.0.0.1") as server:
        status, _, resp = request(server.port, "GET", "/devices/p-1/forget")
        assert status == 405 and resp.getheader("Allow") == "POST"
        assert request(server.port, "POST", "/devices/p-1/forget/now")[0] == 404
        assert request(server.port, "POST", "/devices/p-1/forget")[0] == 503  # queued


@pytest.mark.integration
def test_forgetting_a_device_of_the_running_daemon_deletes_its_retained_alert(
    broker: Broker,
    trained_model_dir: Any,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "limits-old-pump"
    alert_topic = f"anomaly/{dev}/alert"
    settings = make_settings(broker, trained_model_dir).model_copy(
        update={"http": HttpConfig(port=0, token=SecretStr(TOKEN))})
    col = collector_for(broker, [alert_topic, f"anomaly/{dev}/verdict"])
    svc = start_daemon(settings=settings)
    pub = publisher_for(broker)
    for i in range(4):
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": i})
    (raised,) = col.json_on(alert_topic, count=1, timeout=15)
    assert raised["state"] == "raised"
    col.json_on(f"anomaly/{dev}/verdict", count=4)
    env = {"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(svc.http.port), "HEALTH_TOKEN": TOKEN,
           "STATE_DIR": str(svc.settings.state.dir)}  # its layout.json: the layout it runs

    res = anomalyd("forget", dev, env=env)
    assert res.returncode == 0, res.stderr
    assert f"{dev}: forgotten; its retained alert and presence were deleted" in res.stdout
    deleted = col.wait_for(lambda t, p: t == alert_topic and p == b"", timeout=10)
    assert len(deleted) == 1
    # the broker holds no retained alert for it now: a new subscriber's first message on
    # the topic is one published after it subscribed, not a retained one
    late = collector_for(broker, [alert_topic])
    pub.send(alert_topic, b"after", qos=1)
    late.wait_for(lambda t, p: p == b"after", timeout=10)
    assert [p for _, p, _, _ in late.messages] == [b"after"]
    status, _, _ = request(svc.http.port, "GET", f"/devices/{dev}", TOKEN)
    assert status == 404
    res = anomalyd("forget", "no-such-pump", env=env)
    assert res.returncode == 0 and "does not know device 'no-such-pump'" in res.stderr
    _, text, _ = request(svc.http.port, "GET", "/metrics", TOKEN)
    assert "anomalyd_device_forgets_total 2.0" in text


def test_forget_with_two_shared_workers_says_which_one_held_the_device(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Under shared dispatch every worker is asked (under device dispatch only the owner:
    tests/test_workers.py)."""
    from daemon import device_client, worker_http
    from daemon.config import ServiceConfig, StateConfig

    answers = [
        {"device_id": "p-1", "known": False, "retained_cleared": True, "worker": 0},
        {"device_id": "p-1", "known": True, "retained_cleared": True, "worker": 1},
    ]
    monkeypatch.setattr(worker_http.Workers, "ask", lambda *a, **k: answers)
    settings = Settings(service=ServiceConfig(workers=2, dispatch="shared"),
                        state=StateConfig(dir=tmp_path))
    assert device_client.forget(settings, "p-1") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "p-1 on worker 0: not held by this worker; its retained alert and presence were deleted",
        "p-1 on worker 1: forgotten; its retained alert and presence were deleted",
    ]
