"""The daemon end to end through a real Mosquitto: readings in, verdicts and alerts out."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from daemon.config import (
    AlertConfig,
    HttpConfig,
    ModelConfig,
    MqttConfig,
    ReadingsConfig,
    Settings,
)
from daemon.errors import BrokerError
from tests.broker import REPO, Broker, free_port, wait_for_port
from tests.conftest import make_settings
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL

pytestmark = pytest.mark.integration



def _alert_at_once(settings: Settings) -> Settings:
    """Alert on the first anomalous verdict (the default waits for 3 of the last 5)."""
    return settings.model_copy(update={"alerts": AlertConfig(raise_after=1, window=1)})


def http_get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    return status, (body.decode() if path == "/metrics" else json.loads(body))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def test_normal_and_anomalous_readings_get_verdicts_and_one_alert(
    broker: Broker,
    start_daemon: Any,
    trained_model_dir: Path,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    start_daemon(broker, _alert_at_once(make_settings(broker, trained_model_dir)))
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    pub.send("sensors/e2e-pump-1/readings", {**NORMAL, "seq": 1})
    pub.send("sensors/e2e-pump-1/readings", {**ANOMALOUS, "seq": 2})
    verdicts = col.json_on("anomaly/e2e-pump-1/verdict", count=2)
    by_seq = {v["seq"]: v for v in verdicts}
    assert by_seq[1]["is_anomaly"] is False
    assert by_seq[1]["explanation"] == "within normal parameters"
    assert by_seq[2]["is_anomaly"] is True
    assert "vibration" in by_seq[2]["explanation"]
    assert by_seq[2]["model_used"] == "ensemble"
    assert set(by_seq[2]["detector_scores"]) == {"isolation_forest", "lof", "autoencoder"}
    assert by_seq[2]["anomaly_score"] > by_seq[2]["threshold"] > by_seq[1]["anomaly_score"]
    for v in verdicts:
        assert 0.0 <= v["confidence"] <= 1.0
        assert v["key"] == f"e2e-pump-1:{v['seq']}"
    alerts = col.json_on("anomaly/e2e-pump-1/alert", count=1)
    assert len(alerts) == 1 and alerts[0]["seq"] == 2
    assert alerts[0]["severity"] in {"minor", "major", "critical"}
    assert "vibration" in alerts[0]["explanation"]


def test_each_detector_can_be_selected_per_reading(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any
) -> None:
    start_daemon(broker)
    col = collector_for(broker, ["anomaly/e2e-sel/verdict"])
    pub = publisher_for(broker)
    names = ["isolation_forest", "lof", "autoencoder", "ensemble"]
    for i, name in enumerate(names):
        pub.send(
            "sensors/e2e-sel/readings", {"sensor_data": ANOMALOUS, "model_name": name, "seq": i}
        )
    got = {v["model_used"]: v for v in col.json_on("anomaly/e2e-sel/verdict", count=4)}
    assert set(got) == set(names)
    assert all(v["is_anomaly"] for v in got.values())


def metrics_once(port: int, name: str, **labels: str) -> str:
    """The metrics page once ``name`` has a sample (up to 10 s): the daemon counts a
    batch after publishing its outputs, so a verdict may arrive before its count."""
    deadline = time.monotonic() + 10
    while True:
        _, text = http_get(port, "/metrics")
        if metric(text, name, **labels) or time.monotonic() > deadline:
            return str(text)
        time.sleep(0.05)


def test_malformed_payload_is_dead_lettered_and_next_reading_still_judged(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any
) -> None:
    svc = start_daemon(broker)
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    pub.send("sensors/e2e-bad/readings", b"{not json")
    pub.send("sensors/e2e-bad/readings", {**NORMAL, "vibration": "high", "seq": 5})
    pub.send("sensors/e2e-bad/readings", {**NORMAL, "seq": 6})
    dead = col.json_on("anomaly/dead-letter", count=2)
    reasons = {d["reason"] for d in dead if d["device_id"] == "e2e-bad"}
    assert reasons == {"not_json", "non_numeric_feature"}
    assert any(d["payload"] == "{not json" for d in dead)
    verdicts = col.json_on("anomaly/e2e-bad/verdict", count=1)
    assert [v["seq"] for v in verdicts] == [6]
    text = metrics_once(svc.http.port, "anomalyd_readings_total", outcome="normal")
    assert metric(text, "anomalyd_dead_letters_total", reason="not_json") >= 1
    assert metric(text, "anomalyd_dead_letters_total", reason="non_numeric_feature") >= 1
    assert metric(text, "anomalyd_readings_total", outcome="normal") >= 1


def test_late_readings_follow_the_configured_policy_live(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
    trained_model_dir: Path,
) -> None:
    """The daemon's own pipeline gets ``[readings]``: under "drop" an hour-old reading is
    dead-lettered as late, and the device's next on-time one is judged."""
    settings = make_settings(broker, trained_model_dir).model_copy(
        update={"readings": ReadingsConfig(late_policy="drop")})
    start_daemon(settings=settings)
    col = collector_for(broker, ["anomaly/#"])
    pub = publisher_for(broker)
    now = time.time()
    pub.send("sensors/e2e-late/readings", {**NORMAL, "seq": 1, "timestamp": now})
    pub.send("sensors/e2e-late/readings", {**NORMAL, "seq": 2, "timestamp": now - 3600})
    pub.send("sensors/e2e-late/readings", {**NORMAL, "seq": 3, "timestamp": now + 1})
    verdicts = col.json_on("anomaly/e2e-late/verdict", count=2)
    assert [v["seq"] for v in verdicts] == [1, 3]
    (dead,) = col.json_on("anomaly/dead-letter", count=1)
    assert dead["reason"] == "late" and orjson.loads(dead["payload"])["seq"] == 2


def test_batch_message_gets_one_batch_verdict(
    broker: Broker,
    start_daemon: Any,
    trained_model_dir: Path,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    start_daemon(broker, _alert_at_once(make_settings(broker, trained_model_dir)))
    col = collector_for(broker, ["anomaly/e2e-batch/#"])
    pub = publisher_for(broker)
    readings = [NORMAL, ANOMALOUS, {**NORMAL, "pressure": None}, NORMAL]
    pub.send("sensors/e2e-batch/readings", {"readings": readings, "model_name": "ensemble"})
    (verdict,) = col.json_on("anomaly/e2e-batch/verdict")
    assert verdict["total_samples"] == 3
    assert verdict["rejected"] == 1
    assert verdict["anomalies_detected"] == 1
    assert verdict["anomaly_rate"] == pytest.approx(1 / 3)
    flags = {p["index"]: p["is_anomaly"] for p in verdict["predictions"]}
    assert flags == {0: False, 1: True, 3: False}
    alerts = col.json_on("anomaly/e2e-batch/alert")
    assert alerts[0]["index"] == 1


def test_http_endpoints_report_health_readiness_models_and_masked_info(
    broker: Broker,
    start_daemon: Any,
    trained_model_dir: Path,
    publisher_for: Any,
    collector_for: Any,
) -> None:
    settings = make_settings(broker, trained_model_dir)
    settings = settings.model_copy(
        update={
            "mqtt": settings.mqtt.model_copy(
                update={"username": "someone", "password": SecretStr("s3cret-value")}
            )
        }
    )
    svc = start_daemon(broker, settings)
    port = svc.http.port
    status, health = http_get(port, "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["models_loaded"] == 4 and health["preprocessor_loaded"] is True
    status, ready = http_get(port, "/ready")
    assert status == 200 and ready["ready"] is True
    status, models = http_get(port, "/models")
    assert status == 200
    assert {m["name"] for m in models["models"]} == {
        "isolation_forest",
        "lof",
        "autoencoder",
        "ensemble",
    }
    assert models["features"][:2] == ["temperature", "vibration"]
    status, info = http_get(port, "/info")
    assert status == 200
    assert info["config"]["mqtt"]["password"] == "********"
    assert "s3cret-value" not in json.dumps(info)
    col = collector_for(broker, ["anomaly/e2e-http/verdict"])
    publisher_for(broker).send("sensors/e2e-http/readings", NORMAL)
    col.json_on("anomaly/e2e-http/verdict")
    status, _ = http_get(port, "/metrics")
    assert status == 200
    text = metrics_once(port, "anomalyd_batch_size_count", detector="ensemble")
    assert metric(text, "anomalyd_broker_connected") == 1
    assert metric(text, "anomalyd_messages_received_total") >= 1
    assert metric(text, "anomalyd_batch_size_count", detector="ensemble") >= 1
    assert "anomalyd_end_to_end_seconds_bucket" in text
    assert "s3cret-value" not in text


def test_ready_is_503_once_stopping(broker: Broker, start_daemon: Any) -> None:
    svc = start_daemon(broker)
    svc.request_stop()
    status, body = http_get(svc.http.port, "/ready")
    assert status == 503 and body["stopping"] is True


def test_restarted_daemon_judges_what_was_published_while_it_was_down(
    broker: Broker,
    start_daemon: Any,
    trained_model_dir: Path,
    collector_for: Any,
    publisher_for: Any,
) -> None:
    settings = make_settings(broker, trained_model_dir)
    first = start_daemon(broker, settings)
    assert first.shutdown() is True
    col = collector_for(broker, ["anomaly/e2e-restart/verdict"])
    pub = publisher_for(broker)
    for seq in range(25):
        pub.send("sensors/e2e-restart/readings", {**NORMAL, "seq": seq})
    start_daemon(broker, settings)  # same client id: the broker kept the session
    verdicts = col.json_on("anomaly/e2e-restart/verdict", count=25)
    assert sorted({v["seq"] for v in verdicts}) == list(range(25))


def _daemon_env(b: Broker, model_dir: Path, http_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MQTT_HOST=b.host,
        MQTT_PORT=str(b.port),
        MODEL_DIR=str(model_dir),
        HEALTH_PORT=str(http_port),
        MQTT_CLIENT_ID=f"anomalyd-sub-{http_port}",
        LOG_LEVEL="INFO",
        STATE_DIR=tempfile.mkdtemp(prefix="anomalyd-state-"),
    )
    return env


def test_sigterm_drains_and_exits_zero(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any
) -> None:
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run"],
        cwd=REPO,
        env=_daemon_env(broker, trained_model_dir, http_port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", http_port, timeout=30)
        deadline = time.monotonic() + 30
        while http_get(http_port, "/ready")[0] != 200:
            assert time.monotonic() < deadline, "daemon never became ready"
            time.sleep(0.1)
        col = collector_for(broker, ["anomaly/e2e-term/verdict", "anomaly/status"])
        pub = publisher_for(broker)
        for seq in range(200):
            pub.client.publish(
                "sensors/e2e-term/readings", orjson.dumps({**NORMAL, "seq": seq}), qos=1
            )
        col.json_on("anomaly/e2e-term/verdict", count=1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr[-2000:]
    assert '"stopped"' in stderr or "stopped" in stderr
    assert col.wait_for(lambda t, p: t == "anomaly/status" and p == b"offline")


def test_missing_models_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    env = dict(os.environ, MODEL_DIR=str(tmp_path / "nothing-here"))
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "anomalyd train" in res.stderr


def test_an_unwritable_state_dir_exits_2_before_connecting(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """Per-device state that cannot be saved would be lost at the next restart: refuse to
    start, naming the setting. (A directory below a file: unwritable even for root.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = dict(os.environ, MODEL_DIR=str(trained_model_dir), MQTT_PORT=str(free_port()),
               HEALTH_PORT=str(free_port()), STATE_DIR=str(blocker / "state"))
    res = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"state.dir {blocker / 'state'} is not writable" in res.stderr
    assert "STATE_DIR" in res.stderr and "cannot reach broker" not in res.stderr
    # STATE_DIR naming the file itself said "is not writable (File exists)"
    res = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO,
                         env={**env, "STATE_DIR": str(blocker)}, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"state.dir {blocker} is a file, not a directory: set [state] dir" in res.stderr



def test_a_full_state_disk_exits_2_before_connecting(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """The start's check created an empty file, which a full disk still allows, so the
    daemon started and lost its state at the first save: it now writes a block. A tmpfs
    of 16 KB filled to the last byte (mounting needs root: skipped without it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        (disk / "state").mkdir()
        with contextlib.suppress(OSError), (disk / "filler").open("wb", buffering=0) as fh:
            while fh.write(bytes(512)):
                pass
        env = dict(os.environ, MODEL_DIR=str(trained_model_dir), MQTT_PORT=str(free_port()),
                   HEALTH_PORT=str(free_port()), STATE_DIR=str(disk / "state"))
        res = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, res.stderr[-2000:]
        assert (f"state.dir {disk / 'state'} is not writable (No space left on device)"
                in res.stderr)
        assert "cannot reach broker" not in res.stderr
        assert list((disk / "state").iterdir()) == []  # the probe is gone
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_port_that_takes_the_connection_but_never_answers_is_said_to(
    start_daemon: Any, trained_model_dir: Path
) -> None:
    """Something on the broker's port that accepts connections and says nothing (another
    service, a proxy holding them): paho gives up after keepalive_s, and the error said
    the broker "closed the connection ... without answering CONNECT", blaming a refused
    Last Will or login. It now says nothing answered, and asks what listens there."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        mqtt = MqttConfig(host="127.0.0.1", port=port, keepalive_s=5, connect_timeout_s=8,
                          client_id=f"silent-{free_port()}")
        settings = Settings(mqtt=mqtt, http=HttpConfig(port=0),
                            model=ModelConfig(dir=trained_model_dir))
        with pytest.raises(BrokerError) as unanswered:
            start_daemon(settings=settings)
    said = str(unanswered.value)
    assert f"no answer to CONNECT from broker at 127.0.0.1:{port} within 8s" in said
    assert f"is an MQTT broker listening on {port}?" in said
    assert "closed the connection" not in said

def test_unreachable_broker_exits_3_with_a_clear_message(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    env = dict(
        os.environ,
        MODEL_DIR=str(trained_model_dir),
        MQTT_PORT=str(free_port()),
        HEALTH_PORT=str(free_port()),
        STATE_DIR=str(tmp_path / "state"),  # not the repository's state/
    )
    cfg = REPO / "tests" / "data" / "short-connect-timeout.toml"
    res = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 3, res.stderr[-2000:]
    assert "cannot reach broker" in res.stderr


@pytest.mark.parametrize("expiry", [0, 3600])
def test_a_session_the_broker_ends_at_each_disconnect_is_warned_of(
    broker: Broker, start_daemon: Any, trained_model_dir: Path,
    capsys: pytest.CaptureFixture[str], expiry: int,
) -> None:
    """MQTT 5 ``session_expiry_s = 0`` ("never expires" in other tools) ends the session at
    every disconnect: readings published during a restart are lost. A tester found no word
    of it anywhere."""
    start_daemon(broker, make_settings(broker, trained_model_dir, session_expiry_s=expiry))
    warned = "mqtt_session_not_kept" in capsys.readouterr().out
    assert warned is (expiry == 0)


def test_an_idle_daemon_reports_no_unacknowledged_input(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any
) -> None:
    """``anomalyd_unacked_inputs`` was set after each batch, before that batch's readings
    were acknowledged, so an idle daemon kept reporting the last batch's count (a tester
    saw 1 while ``/info`` said 0). It is read at each scrape now."""
    svc = start_daemon(broker)
    col = collector_for(broker, ["anomaly/+/verdict"])
    publisher_for(broker).send("sensors/e2e-idle/readings", {**NORMAL, "seq": 1})
    col.json_on("anomaly/e2e-idle/verdict", count=1)
    deadline = time.monotonic() + 10
    while http_get(svc.http.port, "/info")[1]["unacked_inputs"]:  # the ack goes out
        assert time.monotonic() < deadline
        time.sleep(0.05)
    text = metrics_once(svc.http.port, "anomalyd_readings_total", outcome="normal")
    assert metric(text, "anomalyd_unacked_inputs") == 0
    assert metric(text, "anomalyd_readings_total", outcome="normal") == 1


def test_the_log_says_what_was_judged_not_each_batch(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At INFO the first batch is said at once (a ``scored`` line: the daemon is judging)
    and then at most once a minute; the per-batch line is DEBUG (a tester's log was 662
    ``batch`` lines of 670)."""
    start_daemon(broker)
    col = collector_for(broker, ["anomaly/+/verdict"])
    pub = publisher_for(broker)
    for seq in range(5):
        pub.send("sensors/e2e-log/readings", {**NORMAL, "seq": seq})
        col.json_on("anomaly/e2e-log/verdict", count=seq + 1)
    deadline = time.monotonic() + 10
    said = ""
    while "scored" not in said:  # said after the batch's outputs, at the scorer's next pass
        assert time.monotonic() < deadline, said
        said += capsys.readouterr().out
        time.sleep(0.05)
    lines = [ln for ln in said.splitlines() if " scored " in ln or '"scored"' in ln]
    assert len(lines) == 1 and "readings=1" in lines[0], lines  # the first batch, once
    batch_lines = [ln for ln in said.splitlines() if "] batch " in ln]
    assert batch_lines and all("[debug" in ln for ln in batch_lines), batch_lines


def test_a_gateway_time_field_the_daemon_does_not_read_is_logged_and_counted_once(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
) -> None:
    """{"ts": ..., ...} from a gateway was stamped on receipt in silence: the readings are
    judged as before, and the field is named once per device (log and counter)."""
    import structlog

    col = collector_for(broker, ["anomaly/+/verdict"])
    with structlog.testing.capture_logs() as logs:
        svc = start_daemon(broker)
        pub = publisher_for(broker)
        for seq in (1, 2):
            pub.send("sensors/gw-ts/readings", {**NORMAL, "seq": seq, "ts": 1796650000 + seq})
        pub.send("sensors/gw-ok/readings", {**NORMAL, "seq": 3, "timestamp": 1796650003})
        col.wait_for(lambda t, p: True, count=3)
    (said,) = [e for e in logs if e.get("event") == "time_field_not_read"]
    assert said["device_id"] == "gw-ts" and said["field"] == "ts"
    assert "from 'timestamp' only (ISO 8601, or epoch seconds)" in said["note"]
    assert svc.metrics.registry.get_sample_value(
        "anomalyd_unread_time_fields_total", {"field": "ts"}) == 1
