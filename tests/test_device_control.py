"""Operators' device commands: the control queue between HTTP and scorer threads, the
trackers' forget/summary, the HTTP rules, and list/show/rewarm through the real daemon,
a real Mosquitto and the command line."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from daemon import state
from daemon.alerts import AlertTracker
from daemon.config import AlertConfig, BaselineConfig, HttpConfig, LimitsConfig, Settings
from daemon.control import (
    Command,
    ControlFailedError,
    ControlQueue,
    ControlUnavailableError,
    DeviceControl,
    UnknownDeviceError,
)
from daemon.devices import DeviceTracker
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.payloads import Outbound
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from tests.broker import Broker, free_port
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_cli import anomalyd

WARMUP = 20
TOKEN = "tok-device-control"
PATTERN = LimitsConfig().device_id_pattern


def normal(i: int) -> dict[str, Any]:
    """NORMAL with 1 % noise: a device whose normal has some spread."""
    rng = np.random.default_rng(i)
    return {k: v * (1 + 0.01 * float(rng.normal())) for k, v in NORMAL.items()} | {"seq": i}


# -- the control queue ------------------------------------------------------------------


@contextmanager
def drained(q: ControlQueue, execute: Callable[[Command], Any]) -> Iterator[threading.Thread]:
    """A stand-in scorer thread draining ``q`` until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.001):
            q.drain(execute)

    t = threading.Thread(target=loop, name="test-scorer")
    t.start()
    try:
        yield t
    finally:
        stop.set()
        t.join()


def test_a_command_runs_on_the_draining_thread_and_its_result_comes_back() -> None:
    q = ControlQueue()
    ran_on: list[str] = []

    def execute(cmd: Command) -> dict[str, Any]:
        ran_on.append(threading.current_thread().name)
        return {"action": cmd.action, "device": cmd.device_id}

    with drained(q, execute):
        assert q.call(Command("show", "p-1")) == {"action": "show", "device": "p-1"}
    assert ran_on == ["test-scorer"]


def test_a_commands_error_reaches_the_caller_and_a_bug_is_counted() -> None:
    metrics = Metrics(CollectorRegistry())
    q = ControlQueue(metrics)

    def execute(cmd: Command) -> None:
        if cmd.action == "show":
            raise UnknownDeviceError(cmd.device_id)
        raise ValueError("a bug")

    with drained(q, execute) as scorer:
        with pytest.raises(UnknownDeviceError, match="p-9"):
            q.call(Command("show", "p-9"))
        with pytest.raises(ControlFailedError, match="see its log"):
            q.call(Command("rewarm", "p-9"))
        assert scorer.is_alive()  # the bug did not stop the scorer
    errors = metrics.registry.get_sample_value(
        "anomalyd_callback_errors_total", {"where": "control"}
    )
    assert errors == 1


def test_a_command_not_taken_in_time_is_refused_and_never_runs() -> None:
    q = ControlQueue()
    ran: list[Command] = []
    with pytest.raises(ControlUnavailableError, match="nothing was changed"):
        q.call(Command("rewarm", "p-1"), timeout=0.01)  # no scorer drains
    assert q.drain(ran.append) == 0
    assert ran == []


def test_close_answers_a_waiting_command_and_refuses_later_ones() -> None:
    q = ControlQueue()
    raised: list[BaseException] = []

    def caller() -> None:
        try:
            q.call(Command("list"), timeout=30)
        except ControlUnavailableError as exc:
            raised.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    while q._queue.empty():  # the caller has queued its command
        t.join(0.001)
    q.close("the scorer has stopped")
    t.join()
    assert [str(e) for e in raised] == ["the scorer has stopped"]
    with pytest.raises(ControlUnavailableError, match="stopped"):
        q.call(Command("list"))


# -- forget and summary on the trackers -------------------------------------------------


def test_device_tracker_forgets_a_device_which_then_warms_up_again() -> None:
    tracker = DeviceTracker(2, 1, 8, np.zeros(2), np.ones(2))
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for _ in range(8):
            row = tracker.observe(name, [10 + rng.normal(), 5 + rng.normal()])
            tracker.assess(name, row, global_anomaly=False)
    warm = tracker.summary("a")
    assert warm is not None
    assert warm["warming_up"] is False and warm["warmup_seen"] == 8
    assert warm["baseline_threshold"] is not None and warm["window_filled"] == 1

    assert tracker.forget("a") is not None
    assert tracker.summary("a") is None and tracker.forget("a") is None
    row = tracker.observe("a", [10.0, 5.0])
    assert tracker.assess("a", row, global_anomaly=False).warming_up is True
    again = tracker.summary("a")
    assert again is not None and again["warming_up"] is True and again["warmup_seen"] == 1
    b = tracker.summary("b")
    assert b is not None and b["warming_up"] is False  # the other device is untouched


def test_alert_tracker_forgets_an_active_alert_and_a_new_one_needs_fresh_verdicts() -> None:
    alerts = AlertTracker(raise_after=3, window=5, resolve_after=10)
    events = [alerts.observe("a", True, "major", 4.0, float(t)) for t in range(3)]
    assert events[-1] is not None and events[-1].transition == "raised"
    summary = alerts.summary("a")
    assert summary is not None
    assert summary["active"] is True and summary["severity"] == "major"
    assert summary["raised_at"] == 2.0 and summary["anomalous_in_window"] == 3

    old = alerts.forget("a")
    assert old is not None and old.active and old.severity == "major"
    assert alerts.summary("a") is None and not alerts.is_active("a")
    assert alerts.observe("a", True, "major", 4.0, 3.0) is None  # 1 of 3, not raised


# -- DeviceControl on a real pipeline ----------------------------------------------------


def test_rewarm_forgets_publishes_a_retained_cleared_alert_saves_and_counts(
    model_bundle: ModelBundle,
) -> None:
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    settings = Settings()
    pipeline = Pipeline(
        model_bundle, decoder, settings.topics, AlertConfig(raise_after=1, window=1), warmup=4
    )

    def feed(device: str, *readings: dict[str, Any]) -> list[list[Outbound]]:
        msgs = [RawMessage(f"sensors/{device}/readings", orjson.dumps(r), 0.0) for r in readings]
        return pipeline.process(msgs, 1000.0)[0]

    feed("p-1", *(normal(i) for i in range(4)))
    feed("p-2", normal(9))
    outs = feed("p-1", ANOMALOUS)
    assert [o.kind for o in outs[0]] == ["verdict", "alert"]  # raised
    pipeline.fleet.restore(pipeline.fleet.snapshot())  # replaces the trackers: control must follow

    published: list[Outbound] = []
    saves: list[int] = []

    def publish(out: Outbound) -> bool:
        published.append(out)
        return True

    metrics = Metrics(CollectorRegistry())
    control = DeviceControl(pipeline, metrics, publish, lambda: saves.append(1))
    listing = control.execute(Command("list"))
    assert [d["device_id"] for d in listing["devices"]] == ["p-1", "p-2"]
    assert listing["devices"][0]["alert"]["active"] is True
    drift = listing["devices"][0]["drift"]  # fitted: its drift, the input by its name
    assert drift["input"] in model_bundle.model_features and isinstance(drift["spreads"], float)
    assert listing["devices"][1]["drift"] is None  # still warming up

    with structlog.testing.capture_logs() as logs:
        done = control.execute(Command("rewarm", "p-1"))
    assert done["alert_cleared"] is True and done["before"]["warming_up"] is False
    (said,) = [e for e in logs if e["event"] == "device_rewarmed"]
    assert said["drift"] == drift  # what it had absorbed, on record
    (out,) = published
    body = orjson.loads(out.payload)
    assert out.topic == "anomaly/p-1/alert" and out.retain is True
    assert body["state"] == "cleared" and body["active"] is False
    assert body["reason"] == "rewarm" and body["severity"] == done["before"]["alert"]["severity"]
    assert saves == [1]
    assert metrics.registry.get_sample_value("anomalyd_device_rewarms_total") == 1
    assert metrics.registry.get_sample_value("anomalyd_devices") == 1  # p-2 only, at once
    with pytest.raises(UnknownDeviceError):
        control.execute(Command("show", "p-1"))
    verdict = orjson.loads(feed("p-1", normal(20))[0][0].payload)
    assert verdict["warming_up"] is True

    with pytest.raises(UnknownDeviceError):
        control.execute(Command("rewarm", "nobody"))
    assert len(published) == 1 and saves == [1]  # nothing done for an unknown device


# -- the HTTP rules, with no scorer behind the queue -------------------------------------


class _Status:
    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok"}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {"ready": True}

    def models(self) -> dict[str, Any]:
        return {}

    def info(self) -> dict[str, Any]:
        return {}


@contextmanager
def bare_server(host: str, token: str | None = None) -> Iterator[HttpServer]:
    server = HttpServer(
        host,
        0,
        _Status(),
        CollectorRegistry(),
        token,
        control=ControlQueue(),
        device_id_pattern=PATTERN,
        control_timeout_s=0.01,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def request(
    port: int, method: str, path: str, token: str | None = None, **more: str
) -> tuple[int, Any, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(more)
    conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, (raw.decode() if path == "/metrics" else json.loads(raw)), resp


def test_post_without_a_token_is_refused_unless_bound_to_loopback() -> None:
    with bare_server("0.0.0.0") as server:  # noqa: S104 (the rule under test)
        status, body, _ = request(server.port, "POST", "/devices/p-1/rewarm")
        assert status == 403 and "http.token" in body["error"]
        assert request(server.port, "GET", "/health")[0] == 200  # reads stay open
    with bare_server("127.0.0.1") as server:
        status, body, _ = request(server.port, "POST", "/devices/p-1/rewarm")
        # accepted, handed to the queue; nobody drains it here, hence 503
        assert status == 503 and "nothing was changed" in body["error"]
        # ... but not from a web page: a browser adds Origin to a cross-origin POST
        status, body, _ = request(server.port, "POST", "/devices/p-1/rewarm",
                                  Origin="http://evil.example")
        assert status == 403 and "Origin" in body["error"]


def test_a_wrong_token_is_told_apart_from_none() -> None:
    """With a token configured, a request with another one is told so, not that a token
    is required (``HEALTH_TOKEN=old anomalyd devices`` read as if none had been given)."""
    with bare_server("127.0.0.1", TOKEN) as server:
        status, body, _ = request(server.port, "GET", "/devices")
        assert status == 401 and body["error"] == "a bearer token is required"
        status, body, _ = request(server.port, "GET", "/devices", "wrong")
        assert status == 401 and body["error"] == "the bearer token given is not the daemon's"


def test_wrong_methods_paths_and_device_ids_get_json_errors() -> None:
    with bare_server("127.0.0.1") as server:
        port = server.port
        status, body, resp = request(port, "GET", "/devices/p-1/rewarm")
        assert status == 405 and resp.getheader("Allow") == "POST" and "POST" in body["error"]
        status, _, resp = request(port, "POST", "/health")
        assert status == 405 and resp.getheader("Allow") == "GET"
        assert request(port, "DELETE", "/devices/p-1")[0] == 405
        assert request(port, "GET", "/nowhere")[:2] == (404, {"error": "not found"})
        assert request(port, "GET", "/devices/p-1/reset")[0] == 404
        status, body, _ = request(port, "GET", "/devices/-bad%20id")
        assert status == 400 and "device_id_pattern" in body["error"]
        status, body, _ = request(port, "BREW", "/devices")
        assert status == 501 and "BREW" in body["error"]


# -- end to end: the real daemon, a real Mosquitto --------------------------------------


@pytest.fixture
def warm_settings(broker: Broker, trained_model_dir: Path) -> Settings:
    s = make_settings(broker, trained_model_dir)
    return s.model_copy(
        update={
            "baseline": BaselineConfig(warmup_readings=WARMUP),
            "http": HttpConfig(port=0, token=SecretStr(TOKEN)),
        }
    )


@pytest.mark.integration
def test_rewarm_through_http_restarts_warm_up_and_clears_the_retained_alert(
    broker: Broker,
    warm_settings: Settings,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "ctl-pump-1"
    verdicts, alerts = f"anomaly/{dev}/verdict", f"anomaly/{dev}/alert"
    col = collector_for(broker, [f"anomaly/{dev}/#"])
    pub = publisher_for(broker)
    svc = start_daemon(settings=warm_settings)
    port = svc.http.port
    for i in range(WARMUP + 1):
        pub.send(f"sensors/{dev}/readings", normal(i))
    seen = col.json_on(verdicts, count=WARMUP + 1)
    assert [v["warming_up"] for v in seen] == [True] * WARMUP + [False]

    status, listing, _ = request(port, "GET", "/devices", TOKEN)
    assert status == 200
    (row,) = [d for d in listing["devices"] if d["device_id"] == dev]
    assert row["warming_up"] is False and row["warmup_seen"] == WARMUP
    assert row["baseline_threshold"] > 0 and row["alert"]["active"] is False

    for i in range(3):  # the default alert rule: 3 anomalous of the last 5
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": 100 + i})
    (raised,) = col.json_on(alerts, count=1)
    assert raised["state"] == "raised"
    status, shown, _ = request(port, "GET", f"/devices/{dev}", TOKEN)
    assert status == 200 and shown["alert"]["active"] is True
    assert shown["alert"]["severity"] == raised["severity"]

    assert request(port, "GET", "/devices")[0] == 401
    assert request(port, "POST", f"/devices/{dev}/rewarm")[0] == 401
    assert request(port, "POST", f"/devices/{dev}/rewarm", "wrong")[0] == 401
    status, body, _ = request(port, "GET", "/devices/nobody", TOKEN)
    assert status == 404 and body["device_id"] == "nobody"
    assert request(port, "POST", "/devices/nobody/rewarm", TOKEN)[0] == 404

    status, done, _ = request(port, "POST", f"/devices/{dev}/rewarm", TOKEN)
    assert status == 200 and done["rewarmed"] is True and done["alert_cleared"] is True
    assert done["before"]["alert"]["active"] is True
    saved = json.loads((warm_settings.state.dir / "devices.json").read_text())
    assert dev not in saved["devices"]["devices"] and dev not in saved["alerts"]["devices"]
    cleared = col.json_on(alerts, count=2)[1]
    assert cleared["state"] == "cleared" and cleared["active"] is False
    assert cleared["reason"] == "rewarm"
    late = collector_for(broker, [alerts])  # a new subscriber sees the cleared state
    (retained,) = late.json_on(alerts, count=1)
    assert retained["state"] == "cleared" and late.messages[0][2] is True
    assert request(port, "GET", f"/devices/{dev}", TOKEN)[0] == 404  # forgotten

    pub.send(f"sensors/{dev}/readings", normal(200))
    after = col.json_on(verdicts, count=WARMUP + 5)[-1]
    assert after["seq"] == 200 and after["warming_up"] is True
    status, shown, _ = request(port, "GET", f"/devices/{dev}", TOKEN)
    assert shown["warming_up"] is True and shown["warmup_seen"] == 1
    assert shown["alert"]["active"] is False
    _, text, _ = request(port, "GET", "/metrics", TOKEN)
    assert "anomalyd_device_rewarms_total 1.0" in text


@pytest.mark.integration
def test_cli_lists_shows_and_rewarms_devices_of_the_running_daemon(
    broker: Broker,
    warm_settings: Settings,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "ctl-cli-1"
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    svc = start_daemon(settings=warm_settings)
    pub = publisher_for(broker)
    for i in range(3):
        pub.send(f"sensors/{dev}/readings", normal(i))
    col.json_on(f"anomaly/{dev}/verdict", count=3)
    env = {"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(svc.http.port), "HEALTH_TOKEN": TOKEN,
           "STATE_DIR": str(svc.settings.state.dir)}  # its layout.json: the layout it runs

    res = anomalyd("devices", env=env)
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(dev)]
    assert f"3/{WARMUP} warming" in line
    res = anomalyd("devices", dev, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["warmup_seen"] == 3

    res = anomalyd("rewarm", dev, env=env)
    assert res.returncode == 0, res.stderr
    assert f"{dev}: window, baseline and alert state forgotten" in res.stdout
    res = anomalyd("rewarm", dev, env=env)  # now unknown
    assert res.returncode == 1 and "does not know device" in res.stderr

    res = anomalyd("devices", env={**env, "HEALTH_TOKEN": ""})
    assert res.returncode == 1 and "answered 401" in res.stderr
    assert "HEALTH_TOKEN or HEALTH_TOKEN_FILE" in res.stderr  # what to give it
    res = anomalyd("devices", env={**env, "HEALTH_PORT": str(free_port())})
    assert res.returncode == 1 and "cannot reach the daemon" in res.stderr


# -- silences ---------------------------------------------------------------------------


def test_alert_tracker_silence_ends_by_itself_and_survives_a_restart() -> None:
    alerts = AlertTracker(raise_after=1, window=1, resolve_after=1)
    alerts.silence("a", until=100.0)
    assert alerts.silenced_until("a", 99.0) == 100.0
    saved = alerts.to_json()
    again = AlertTracker(raise_after=1, window=1, resolve_after=1)
    again.restore(orjson.loads(state.encode(saved)))
    assert again.silenced_until("a", 50.0) == 100.0
    assert alerts.silenced_until("a", 100.0) is None and alerts.silences == {}  # ended
    again.silence("a", None)  # lifted
    assert again.silenced_until("a", 50.0) is None
    old = {k: v for k, v in saved.items() if k != "silences"}  # saved before silences
    assert again.restore(old) == 0 and again.silences == {}
    with pytest.raises(ValueError, match="finite"):
        again.restore({**saved, "silences": {"a": "inf"}})
    with pytest.raises(ValueError, match="not a mapping"):
        again.restore({**saved, "silences": [["a", 100.0]]})


def test_a_re_warmed_device_still_listed_is_silenced_as_known(
    model_bundle: ModelBundle,
) -> None:
    """Re-warmed, a device is still listed by its presence (``alerts.quiet_after_s``): a
    silence then is no "not seen yet (a typo?)" (it said so, the device listed beside)."""
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    pipeline = Pipeline(model_bundle, decoder, Settings().topics,
                        AlertConfig(quiet_after_s=60.0))
    control = DeviceControl(pipeline, Metrics(CollectorRegistry()), lambda _o: True,
                            lambda: None, clock=lambda: 1000.0)
    pipeline.process([RawMessage("sensors/p-1/readings", orjson.dumps(NORMAL), 0.0)], 1000.0)
    control.execute(Command("rewarm", "p-1"))
    assert [d["device_id"] for d in control.execute(Command("list"))["devices"]] == ["p-1"]
    assert control.execute(Command("silence", "p-1", 30.0))["known"] is True
    assert control.execute(Command("silence", "p-2", 30.0))["known"] is False


def test_a_silenced_device_raises_nothing_until_the_silence_ends(
    model_bundle: ModelBundle,
) -> None:
    """Its verdicts are published with ``silenced_until`` and feed no alert; an active
    alert stays active; after the silence (or when lifted) alerts work as before."""
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    pipeline = Pipeline(model_bundle, decoder, Settings().topics,
                        AlertConfig(raise_after=2, window=3, resolve_after=2))
    now = [1000.0]
    control = DeviceControl(pipeline, Metrics(CollectorRegistry()), lambda _o: True,
                            lambda: None, clock=lambda: now[0])

    def feed(*readings: dict[str, Any]) -> list[dict[str, Any]]:
        msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in readings]
        return [orjson.loads(o.payload) for outs in pipeline.process(msgs, now[0])[0]
                for o in outs]

    early = control.execute(Command("silence", "p-1", 30.0))  # before its first reading
    assert early["known"] is False and early["silenced_until"] == "1970-01-01T00:17:10.000Z"
    (listed,) = control.execute(Command("list"))["devices"]
    assert listed["device_id"] == "p-1"
    # never seen: the same fields as a device that has been
    assert listed["window_filled"] == 0 and listed["last_seq"] is None
    feed(NORMAL)
    (again,) = control.execute(Command("list"))["devices"]
    assert set(again) == set(listed) and again["window_filled"] == pipeline.devices.window
    done = control.execute(Command("silence", "p-1", 60.0))
    assert done["silenced_until"] == "1970-01-01T00:17:40.000Z" and done["known"] is True
    assert done["alert_active"] is False
    assert done["was_silenced_until"] == "1970-01-01T00:17:10.000Z"
    out = feed(ANOMALOUS, ANOMALOUS, ANOMALOUS)
    assert [o["is_anomaly"] for o in out] == [True] * 3  # judged and published as usual
    assert all(o["silenced_until"] == "1970-01-01T00:17:40.000Z" for o in out)
    again = feed({**NORMAL, "seq": 7}, {**NORMAL, "seq": 7})[1]  # a redelivery says so too
    assert again["repeat"] is True and again["silenced_until"] == "1970-01-01T00:17:40.000Z"
    # no verdict reached the state machine while silenced (the first reading's neither)
    assert pipeline.alert_states.summary("p-1") is None
    assert control.show("p-1")["alert"] == {
        "active": False, "silenced_until": "1970-01-01T00:17:40.000Z"
    }
    now[0] = 1060.0  # the silence is over: two anomalous verdicts of three raise
    out = feed(ANOMALOUS, ANOMALOUS)
    assert "silenced_until" not in out[0]
    assert [o.get("state") for o in out] == [None, None, "raised"]
    assert control.show("p-1")["alert"]["silenced_until"] is None

    control.execute(Command("silence", "p-1", 3600.0))  # an active alert stays active
    assert [o.get("state") for o in feed(NORMAL, NORMAL, NORMAL)] == [None] * 3
    assert pipeline.alert_states.is_active("p-1")
    lifted = control.execute(Command("silence", "p-1", 0.0))
    assert lifted["silenced_until"] is None and lifted["alert_active"] is True
    assert [o.get("state") for o in feed(NORMAL, NORMAL)] == [None, None, "resolved"]
    metrics = control.metrics.registry
    assert metrics.get_sample_value("anomalyd_device_silences_total", {"action": "set"}) == 3
    assert metrics.get_sample_value("anomalyd_device_silences_total", {"action": "lifted"}) == 1


def test_a_silenced_device_teaches_its_baseline_nothing(model_bundle: ModelBundle) -> None:
    """Readings during a maintenance window are not the device's normal: they are judged
    and published, but its warm-up does not advance and a fitted baseline's centre stays
    where it was; when the silence ends, both go on from there."""
    decoder = Decoder(model_bundle.features, model_bundle.detector_names)
    pipeline = Pipeline(model_bundle, decoder, Settings().topics, AlertConfig(),
                        warmup=WARMUP)
    now = [1000.0]
    control = DeviceControl(pipeline, Metrics(CollectorRegistry()), lambda _o: True,
                            lambda: None, clock=lambda: now[0])

    def feed(readings: list[dict[str, Any]]) -> list[dict[str, Any]]:
        msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in readings]
        return [orjson.loads(o.payload) for outs in pipeline.process(msgs, now[0])[0]
                for o in outs if o.topic.endswith("/verdict")]

    feed([normal(i) for i in range(5)])
    control.execute(Command("silence", "p-1", 60.0))
    out = feed([{**ANOMALOUS, "seq": 100 + i} for i in range(30)])
    assert len(out) == 30 and all(o["warming_up"] and "silenced_until" in o for o in out)
    assert all(o["is_anomaly"] for o in out)  # judged as usual
    assert control.show("p-1")["warmup_seen"] == 5  # but not learnt
    now[0] = 1061.0  # the silence is over: the warm-up goes on from 5
    feed([normal(i) for i in range(200, 200 + WARMUP - 5)])
    shown = control.show("p-1")
    assert shown["warming_up"] is False and shown["warmup_seen"] == WARMUP
    state = pipeline.devices.devices["p-1"]
    assert state.center is not None
    center = state.center.copy()
    control.execute(Command("silence", "p-1", 60.0))
    out = feed([{**ANOMALOUS, "seq": 300 + i} for i in range(30)])
    assert all(o["baseline"]["is_anomaly"] for o in out[WARMUP // 2:])
    np.testing.assert_array_equal(state.center, center)  # the centre did not move
    now[0] = 1200.0
    feed([normal(400)])
    assert not np.array_equal(state.center, center)  # it adapts again


def test_silence_paths_and_lengths_are_checked_before_the_scorer_is_asked() -> None:
    with bare_server("127.0.0.1") as server:
        port = server.port
        for bad in ("-5", "nan", "1e9", "soon", "inf"):
            status, body, _ = request(port, "POST", f"/devices/p-1/silence/{bad}")
            assert status == 400 and "a silence lasts 0 (lift it) to 604800" in body["error"]
        status, _, resp = request(port, "GET", "/devices/p-1/silence/60")
        assert status == 405 and resp.getheader("Allow") == "POST"
        assert request(port, "POST", "/devices/p-1/silence")[0] == 404  # no length
        assert request(port, "POST", "/devices/p-1/rewarm/60")[0] == 404
        assert request(port, "GET", "/devices/p-1/show")[0] == 404
        assert request(port, "GET", "/devices/p-1/")[0] == 404
        # a good request reaches the queue (nobody drains it here: 503)
        assert request(port, "POST", "/devices/p-1/silence/60")[0] == 503


def test_the_device_tables_columns_make_room_for_a_long_device_id() -> None:
    """A 38-character id pushed the rest of its line out of the columns (a tester's
    table); every column is now as wide as its widest entry."""
    from daemon.device_client import device_table

    long_id = "site-north-hall-3-cooling-pump-0042-b1"
    rows = [{"device_id": d, "warmup_readings": 0, "baseline_threshold": t,
             "alert": {"active": False}} for d, t in (("p-1", 9.5), (long_id, None))]
    lines = device_table(rows).splitlines()
    at = len(long_id) + 1 + 12 + 1  # where the threshold column begins on every line
    assert [line[at:].split()[0] for line in lines] == ["THRESHOLD", "9.5", "-"]
    assert [line[at - 13:at].strip() for line in lines] == ["WARM-UP", "off", "off"]
    assert lines[2].split() == [long_id, "off", "-", "-", "-"]


def test_the_device_table_says_when_alerts_are_held_back() -> None:
    from daemon.device_client import device_table

    rows = [
        {"device_id": "p-1", "warmup_readings": 400, "warmup_seen": 12, "warming_up": True,
         "warmup_alerts": False, "baseline_threshold": None, "alert": {"active": False}},
        {"device_id": "p-2", "warmup_readings": 400, "warmup_seen": 400, "warming_up": False,
         "warmup_alerts": None, "baseline_threshold": 9.5,
         "drift": {"input": "Temperature [mean 10]", "spreads": -12.34},
         "alert": {"active": True, "severity": "major", "raised_at": "2026-11-27T00:00:00Z",
                   "flapping": True, "resolve_after": 20,
                   "silenced_until": "2026-11-27T02:00:00.000Z"}},
    ]
    rows.append({"device_id": "p-3", "warmup_readings": 0, "baseline_threshold": None,
                 "alert": {"active": False}, "quiet": True,
                 "last_seen": "2026-11-27T01:00:00.000Z"})
    _, first, second, third = device_table(rows).splitlines()
    assert first.endswith("- (unlike the training fleet: its warm-up verdicts now feed no "
                          "alert)")
    assert first.split()[:6] == ["p-1", "12/400", "warming", "-", "-", "-"]
    assert second.split()[:6] == ["p-2", "400/400", "9.5", "-12.3", "Temperature", "[mean"]
    assert second.endswith("major since 2026-11-27T00:00:00Z (flapping: resolves after 20 "
                           "normal readings) (silenced until 2026-11-27T02:00:00.000Z)")
    assert third.split() == ["p-3", "off", "-", "-", "-", "(quiet:", "last", "reading",
                             "2026-11-27T01:00:00.000Z)"]


def test_silence_durations_on_the_command_line() -> None:
    from daemon.device_client import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1d", " 1.5H ")] == [
        90.0, 90.0, 1800.0, 7200.0, 86400.0, 5400.0
    ]
    for bad, message in (("0", "more than 0"), ("8d", "at most 7 days"), ("soon", "not a"),
                         ("nan", "more than 0"), ("-1h", "more than 0")):
        with pytest.raises(ValueError, match=message):
            parse_duration(bad)
    res = anomalyd("silence", "p-1", "--for", "8d")
    assert res.returncode == 2 and "at most 7 days" in res.stderr
    res = anomalyd("silence", "p-1")
    assert res.returncode == 2 and "one of the arguments --for --off is required" in res.stderr


@pytest.mark.integration
def test_cli_silences_a_device_of_the_running_daemon_and_lifts_it(
    broker: Broker,
    warm_settings: Settings,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "ctl-silent-1"
    verdicts, alerts = f"anomaly/{dev}/verdict", f"anomaly/{dev}/alert"
    col = collector_for(broker, [f"anomaly/{dev}/#"])
    svc = start_daemon(settings=warm_settings.model_copy(
        update={"baseline": BaselineConfig(warmup_readings=0)}))
    pub = publisher_for(broker)
    pub.send(f"sensors/{dev}/readings", normal(0))
    col.json_on(verdicts, count=1)
    env = {"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(svc.http.port), "HEALTH_TOKEN": TOKEN,
           "STATE_DIR": str(svc.settings.state.dir)}  # its layout.json: the layout it runs

    res = anomalyd("silence", dev, "--for", "2h", env=env)
    assert res.returncode == 0, res.stderr
    assert f"{dev}: alerts silenced until " in res.stdout and "replaces" not in res.stdout
    res = anomalyd("silence", dev, "--for", "3h", env=env)  # a second one says what it ends
    assert res.returncode == 0 and "; it replaces the silence until 20" in res.stdout
    for i in range(3):  # the default rule would raise on these (3 of the last 5)
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": 10 + i})
    silenced = col.json_on(verdicts, count=4)[1:]
    assert all(v["is_anomaly"] and "silenced_until" in v for v in silenced)
    res = anomalyd("devices", env=env)
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(dev)]
    assert "(silenced until " in line

    res = anomalyd("silence", dev, "--off", env=env)
    assert res.returncode == 0 and f"{dev}: silence lifted" in res.stdout
    for i in range(3):
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": 20 + i})
    (raised,) = col.json_on(alerts, count=1)
    assert raised["state"] == "raised" and raised["seq"] == 22  # only after the silence
    assert "silenced_until" not in col.json_on(verdicts, count=7)[-1]
    res = anomalyd("silence", "nobody", "--for", "1h", env=env)  # e.g. not reporting yet
    assert res.returncode == 0 and "has not seen device 'nobody' yet" in res.stderr
    assert "nobody: alerts silenced until" in res.stdout


def test_an_ipv6_address_is_served() -> None:
    """``http.host = "::1"`` passed the configuration and then failed to start: the server
    was IPv4 only ("Address family for hostname not supported")."""
    with bare_server("::1") as server:
        conn = http.client.HTTPConnection("::1", server.port, timeout=15)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
