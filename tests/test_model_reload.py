"""Reloading the model set without a restart: ``POST /models/reload``, SIGHUP and
``anomalyd reload`` through the real daemon and a real Mosquitto; a failed reload keeps the
old model serving; per-device alert states survive a reload."""

from __future__ import annotations

import json
import shutil
import signal
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from daemon.config import HttpConfig, ModelConfig, Settings
from daemon.control import Command
from daemon.models import MANIFEST
from daemon.service import Service
from daemon.training.train import train
from tests.broker import Broker, free_port
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.test_cli import anomalyd
from tests.test_device_control import bare_server, request

TOKEN = "tok-model-reload"
NEW_VERSION = "reloaded-test-v2"
NEW_FEATURES = ("Bearing Temp", "Flow")


@pytest.fixture
def model_copy(trained_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained model set, which tests may edit or corrupt."""
    out = tmp_path / "models"
    shutil.copytree(trained_model_dir, out)  # copy2 keeps the modes: not writable by others
    assert not out.stat().st_mode & stat.S_IWOTH
    return out


@pytest.fixture
def reload_settings(broker: Broker, model_copy: Path) -> Settings:
    s = make_settings(broker, model_copy)
    return s.model_copy(
        update={"http": HttpConfig(port=0, token=SecretStr(TOKEN)),
                "model": ModelConfig(dir=model_copy)}
    )


def set_version(model_dir: Path, version: str) -> None:
    """A valid new model set: the manifest is not hashed (its artifacts are), so changing
    its model_version gives a set that loads and reports the new version."""
    path = model_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["model_version"] = version
    path.write_text(json.dumps(manifest))  # rewrites in place: the mode stays


def corrupt_an_artifact(model_dir: Path) -> str:
    manifest = json.loads((model_dir / MANIFEST).read_text())
    name = sorted(manifest["artifacts"])[0]
    with (model_dir / name).open("ab") as fh:
        fh.write(b"\0")
    return name


def reloads(svc: Service, outcome: str) -> float:
    value = svc.metrics.registry.get_sample_value(
        "anomalyd_model_reloads_total", {"outcome": outcome}
    )
    return value or 0.0


def raise_alert(pub: Any, col: Any, dev: str) -> Any:
    """Three anomalous readings (warm-up is off: 3 anomalous of the last 5 raise the
    alert); the raised alert."""
    for i in range(3):
        pub.send(f"sensors/{dev}/readings", {**ANOMALOUS, "seq": i})
    (raised,) = col.json_on(f"anomaly/{dev}/alert", count=1)
    assert raised["state"] == "raised"
    return raised


def verdict_after(pub: Any, col: Any, dev: str, reading: dict[str, Any], seen: int) -> Any:
    """Publish one reading and return its verdict (the ``seen``-th on the device's topic)."""
    pub.send(f"sensors/{dev}/readings", reading)
    return col.json_on(f"anomaly/{dev}/verdict", count=seen)[-1]


# -- the HTTP rules, with no scorer behind the queue -------------------------------------


def test_reload_is_a_post_under_the_same_rules_as_rewarm() -> None:
    with bare_server("0.0.0.0") as server:  # noqa: S104 (the rule under test)
        status, body, _ = request(server.port, "POST", "/models/reload")
        assert status == 403 and "http.token" in body["error"]
    with bare_server("127.0.0.1") as server:
        status, body, resp = request(server.port, "GET", "/models/reload")
        assert status == 405 and resp.getheader("Allow") == "POST"
        status, body, _ = request(server.port, "POST", "/models/reload",
                                  Origin="http://evil.example")
        assert status == 403 and "Origin" in body["error"]
        assert request(server.port, "GET", "/models")[0] == 200  # still there


# -- end to end ----------------------------------------------------------------------------


@pytest.mark.integration
def test_reload_over_http_swaps_the_model_and_keeps_alert_states(
    broker: Broker,
    reload_settings: Settings,
    model_copy: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "reload-pump-1"
    col = collector_for(broker, [f"anomaly/{dev}/#"])
    pub = publisher_for(broker)
    svc = start_daemon(settings=reload_settings)
    port = svc.http.port
    old_version = svc.bundle.version
    raised = raise_alert(pub, col, dev)
    before = col.json_on(f"anomaly/{dev}/verdict", count=3)
    assert {v["model_version"] for v in before} == {old_version}

    set_version(model_copy, NEW_VERSION)
    svc.state_path.unlink(missing_ok=True)
    assert request(port, "POST", "/models/reload")[0] == 401  # the token rule holds
    status, done, _ = request(port, "POST", "/models/reload", TOKEN)
    assert status == 200, done
    assert done["old_version"] == old_version and done["new_version"] == NEW_VERSION
    assert done["alert_states_kept"] == 1 and done["devices_kept"] == 1
    assert done["problems"] == []  # same features and window: windows are kept too
    assert svc.state_path.exists()  # saved at once after the swap
    assert svc.device_control.pipeline is svc.pipeline

    after = verdict_after(pub, col, dev, {**NORMAL, "seq": 10}, seen=4)
    assert after["seq"] == 10 and after["model_version"] == NEW_VERSION
    status, models, _ = request(port, "GET", "/models", TOKEN)
    assert status == 200 and models["version"] == NEW_VERSION
    status, shown, _ = request(port, "GET", f"/devices/{dev}", TOKEN)
    assert status == 200 and shown["alert"]["active"] is True
    assert shown["alert"]["severity"] == raised["severity"]
    assert reloads(svc, "ok") == 1 and reloads(svc, "failed") == 0
    _, text, _ = request(port, "GET", "/metrics", TOKEN)
    assert f'version="{NEW_VERSION}"' in text  # anomalyd_model_info follows


@pytest.mark.integration
def test_a_failed_reload_names_the_problem_and_the_old_model_keeps_serving(
    broker: Broker,
    reload_settings: Settings,
    model_copy: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "reload-pump-2"
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    pub = publisher_for(broker)
    svc = start_daemon(settings=reload_settings)
    old_version = svc.bundle.version
    assert verdict_after(pub, col, dev, {**NORMAL, "seq": 1}, 1)["model_version"] == old_version

    set_version(model_copy, NEW_VERSION)  # would be taken, were the artifact not corrupt
    name = corrupt_an_artifact(model_copy)
    pipeline = svc.pipeline
    status, body, _ = request(svc.http.port, "POST", "/models/reload", TOKEN)
    assert status == 409 and body["reloaded"] is False
    assert name in body["error"] and "SHA-256" in body["error"]
    assert f"model {old_version} is still serving" in body["error"]
    assert svc.pipeline is pipeline and svc.bundle.version == old_version

    after = verdict_after(pub, col, dev, {**NORMAL, "seq": 2}, 2)
    assert after["seq"] == 2 and after["model_version"] == old_version
    assert request(svc.http.port, "GET", "/models", TOKEN)[1]["version"] == old_version
    assert reloads(svc, "failed") == 1 and reloads(svc, "ok") == 0


@pytest.mark.integration
def test_reload_into_another_schema_reads_the_new_features_and_keeps_the_raised_alert(
    broker: Broker,
    reload_settings: Settings,
    model_copy: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "reload-pump-4"
    col = collector_for(broker, [f"anomaly/{dev}/#", "anomaly/dead-letter"])
    pub = publisher_for(broker)
    svc = start_daemon(settings=reload_settings)
    raise_alert(pub, col, dev)

    # The plant re-instruments the pump: a new model set over two other sensors, trained
    # by the real training code into the configured directory (Isolation Forest: fast).
    rng = np.random.default_rng(4)
    rows = np.column_stack([rng.normal(60.0, 1.0, 800), rng.normal(30.0, 0.5, 800)])
    manifest = train(rows, NEW_FEATURES, model_copy, source="re-instrumented",
                     detectors=("isolation_forest",))
    status, done, _ = request(svc.http.port, "POST", "/models/reload", TOKEN)
    assert status == 200, done
    assert done["new_version"] == manifest["model_version"]
    assert done["features"] == list(NEW_FEATURES)
    # windows and baselines of the old inputs mean nothing now; the alert state does
    assert done["devices_kept"] == 0 and done["alert_states_kept"] == 1
    assert len(done["problems"]) == 1 and "['temperature'," in done["problems"][0]
    assert "the model reads features ['Bearing Temp', 'Flow'] (window 1)" in done["problems"][0]

    pub.send(f"sensors/{dev}/readings", {**NORMAL, "seq": 10})  # the old schema
    new_reading = {"Bearing Temp": 60.2, "Flow": 30.1, "seq": 11}
    after = verdict_after(pub, col, dev, new_reading, seen=4)
    assert after["seq"] == 11 and after["model_version"] == manifest["model_version"]
    assert after["is_anomaly"] is False
    dead = [d for d in col.json_on("anomaly/dead-letter", count=1) if d["device_id"] == dev]
    assert dead[0]["reason"] == "missing_feature" and "Bearing Temp" in dead[0]["detail"]
    status, shown, _ = request(svc.http.port, "GET", f"/devices/{dev}", TOKEN)
    assert status == 200 and shown["alert"]["active"] is True


@pytest.mark.integration
def test_sighup_queues_a_reload_that_the_scorer_runs(
    broker: Broker,
    reload_settings: Settings,
    model_copy: Path,
    start_daemon: Any,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    dev = "reload-pump-3"
    col = collector_for(broker, [f"anomaly/{dev}/verdict"])
    pub = publisher_for(broker)
    svc = start_daemon(settings=reload_settings)
    set_version(model_copy, NEW_VERSION)
    svc._on_reload_signal(signal.SIGHUP)  # what the signals thread runs for SIGHUP
    # Commands run in order: once this one is answered, the queued reload has run.
    svc.control.call(Command("list"))
    assert svc.bundle.version == NEW_VERSION and reloads(svc, "ok") == 1
    after = verdict_after(pub, col, dev, {**NORMAL, "seq": 1}, 1)
    assert after["model_version"] == NEW_VERSION

    corrupt_an_artifact(model_copy)  # a failed reload by signal is logged and counted
    svc._on_reload_signal(signal.SIGHUP)
    svc.control.call(Command("list"))
    assert reloads(svc, "failed") == 1 and svc.bundle.version == NEW_VERSION


@pytest.mark.integration
def test_sighup_after_the_scorer_stopped_is_ignored(
    broker: Broker, start_daemon: Any
) -> None:
    svc = start_daemon(broker)
    svc.shutdown()
    svc._on_reload_signal(signal.SIGHUP)  # neither raises nor queues
    assert svc.control._queue.empty()


@pytest.mark.integration
def test_cli_reload_prints_old_and_new_version_and_fails_with_the_reason(
    broker: Broker,
    reload_settings: Settings,
    model_copy: Path,
    start_daemon: Any,
) -> None:
    svc = start_daemon(settings=reload_settings)
    old_version = svc.bundle.version
    env = {"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(svc.http.port), "HEALTH_TOKEN": TOKEN,
           "STATE_DIR": str(svc.settings.state.dir)}  # its layout.json: the layout it runs
    set_version(model_copy, NEW_VERSION)
    res = anomalyd("reload", env=env)
    assert res.returncode == 0, res.stderr
    assert f"model {old_version} -> {NEW_VERSION}" in res.stdout

    name = corrupt_an_artifact(model_copy)
    res = anomalyd("reload", env=env)
    assert res.returncode == 1
    assert "answered 409" in res.stderr and name in res.stderr
    assert f"model {NEW_VERSION} is still serving" in res.stderr
    assert svc.bundle.version == NEW_VERSION


def test_cli_reload_says_when_the_daemon_cannot_be_reached() -> None:
    res = anomalyd("reload", env={"HEALTH_HOST": "127.0.0.1", "HEALTH_PORT": str(free_port())})
    assert res.returncode == 1 and "cannot reach the daemon" in res.stderr


def _ignores_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_a_sighup_while_starting_does_not_end_the_daemon(
    broker: Broker, trained_model_dir: Path, tmp_path: Path
) -> None:
    """SIGHUP's default action ends a process; until the service's reload handler is in
    place the daemon ignores it (``systemctl reload`` right after a start)."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.broker import REPO

    port = free_port()
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(trained_model_dir), HEALTH_PORT=str(port),
               MQTT_CLIENT_ID=f"hup-{port}", STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _ignores_sighup(proc.pid):  # set first thing in `run`, before any loading
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGHUP)
        while True:  # still starts, and becomes ready
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "never became ready"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0
