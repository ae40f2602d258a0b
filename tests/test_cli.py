"""The command line: clear messages and exit codes, offline scoring, the simulator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.cli import main
from tests.broker import REPO, Broker
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL


def anomalyd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_config_prints_the_effective_configuration_with_secrets_masked(
    trained_model_dir: Path,
) -> None:
    res = anomalyd(
        "check-config",
        env={"MQTT_PASSWORD": "pw-123456", "MQTT_USERNAME": "u", "MQTT_PORT": "1999",
             "MODEL_DIR": str(trained_model_dir)},
    )
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    assert cfg["mqtt"]["port"] == 1999
    assert cfg["mqtt"]["password"] == "********"
    assert "pw-123456" not in res.stdout + res.stderr


def test_check_config_refuses_what_run_would_refuse_before_connecting(
    tmp_path: Path, trained_model_dir: Path
) -> None:
    """A tester found check-config saying "valid" where run then stopped with exit 2: a
    model.dir without a model set, a token file that is not there, an unknown default
    detector."""
    ok = {"MODEL_DIR": str(trained_model_dir)}
    res = anomalyd("check-config", env=ok)
    assert res.returncode == 0 and "loads (isolation_forest" in res.stderr, res.stderr
    for env, said in (
        ({"MODEL_DIR": str(tmp_path / "none")}, "no manifest"),
        # (each names the file it could not read: which one of several secrets' mounts?)
        ({**ok, "HEALTH_TOKEN_FILE": str(tmp_path / "missing")},
         f"http.token_file (HEALTH_TOKEN_FILE) {tmp_path / 'missing'}: No such file"),
        ({**ok, "MQTT_USERNAME": "u", "MQTT_PASSWORD_FILE": str(tmp_path / "missing")},
         f"mqtt.password_file (MQTT_PASSWORD_FILE) {tmp_path / 'missing'}: No such file"),
        # (said "valid" while run stopped at once: "mqtt.tls.ca_file ...: No such file")
        ({**ok, "MQTT_TLS": "true", "MQTT_CA_FILE": str(tmp_path / "missing.crt")},
         f"mqtt.tls.ca_file {tmp_path / 'missing.crt'}"),
    ):
        res = anomalyd("check-config", env=env)
        assert res.returncode == 2 and said in res.stderr, (env, res.stderr)
        assert "configuration is valid" not in res.stderr and "Traceback" not in res.stderr
    forest = tmp_path / "forest.toml"
    forest.write_text('[model]\ndefault_detector = "forest"\n')
    res = anomalyd("--config", str(forest), "check-config", env=ok)
    assert res.returncode == 2 and "no detector 'forest'" in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another user: needs root")
def test_model_files_of_another_owner_are_refused_with_what_to_change(
    tmp_path: Path, trained_model_dir: Path
) -> None:
    """A model set that may not be trusted as it stands (another owner, writable by
    others) says what to change; the hint to train a model set anew, printed for every
    model error before, does not apply and is not given. A missing set still gets it."""
    models = Path(shutil.copytree(trained_model_dir, tmp_path / "models"))
    os.chown(models / "manifest.json", 12345, -1)  # (the tests run as root)
    res = anomalyd("check-config", env={"MODEL_DIR": str(models)})
    assert res.returncode == 2 and "owned by uid 12345" in res.stderr, res.stderr
    assert f"run chown {os.geteuid()}" in res.stderr and "hint" not in res.stderr
    res = anomalyd("check-config", env={"MODEL_DIR": str(tmp_path / "none")})
    assert res.returncode == 2 and "hint: train a model set" in res.stderr, res.stderr


def test_check_config_rejects_a_typo_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[batch]\nmax_batch_sise = 10\n")
    res = anomalyd("--config", str(bad), "check-config")
    assert res.returncode == 2
    assert "batch.max_batch_sise" in res.stderr


def test_a_misspelt_variable_is_pointed_out(trained_model_dir: Path) -> None:
    """A misspelt key in the file is an error naming it; a misspelt variable
    (MQTT_PASWORD, HEALTH_TOKEN_FILES) was ignored without a word: the daemon ran with no
    password, or no token."""
    res = anomalyd("check-config", env={"MODEL_DIR": str(trained_model_dir),
                                        "MQTT_PASWORD": "pw-123456", "HEALTH_TOKEN_FILES": "/t"})
    assert res.returncode == 0, res.stderr
    assert ("note: HEALTH_TOKEN_FILES, MQTT_PASWORD are not read by anomalyd: a misspelling? "
            "Its variables are MQTT_HOST, MQTT_PORT") in res.stderr
    assert "pw-123456" not in res.stdout + res.stderr
    res = anomalyd("check-config", env={"MODEL_DIR": str(trained_model_dir)})
    assert "not read by anomalyd" not in res.stderr


def test_a_configuration_file_that_cannot_be_read_exits_2_naming_it(tmp_path: Path) -> None:
    """An operator's shell reading the service's root-only /etc/anomalyd/anomalyd.toml
    (`anomalyd --config ... devices`), or --config naming a directory, ended in a
    PermissionError (IsADirectoryError) traceback and exit 1. (The tests run as root: a
    directory stands for the file this user may not read.)"""
    res = anomalyd("--config", str(tmp_path), "check-config")
    assert res.returncode == 2, res.stderr
    assert f"cannot read configuration file {tmp_path}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_training_the_autoencoder_without_tensorflow_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """`anomalyd train` in the serving image (no TensorFlow: `docker compose exec anomalyd
    anomalyd train ...` to retrain, then reload) fitted the forest, then ended in a
    ModuleNotFoundError traceback with exit 1. (TensorFlow is installed here: a None in
    sys.modules makes it missing to the import system.)"""
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    out = tmp_path / "models"
    assert main(["train", "--out", str(out), "--rows", "2000"]) == 2
    err = capsys.readouterr().err
    assert "training the autoencoder needs TensorFlow, which is not installed here" in err
    assert "--detectors isolation_forest" in err and "fitting" not in err
    assert not out.exists()


def test_evaluate_without_tensorflow_is_refused_unless_it_trains_nothing(
    tmp_path: Path, trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """evaluate's per-device variant trains a model set per run: without TensorFlow it
    ended in a ModuleNotFoundError traceback (exit 1) once the first forest was fitted;
    with --models and --no-per-device it trains nothing and needs none."""
    runs = tmp_path / "runs"
    runs.mkdir()
    rows = [",".join(f"{v:.3f}" for v in (NORMAL["temperature"] + i % 7 * 0.1,
                                           NORMAL["vibration"], NORMAL["pressure"],
                                           NORMAL["flow_rate"], NORMAL["current"],
                                           NORMAL["duty_cycle"])) + f",{int(i >= 560)}"
            for i in range(600)]
    (runs / "run.csv").write_text("temperature,vibration,pressure,flow_rate,current,"
                                  "duty_cycle,anomaly\n" + "\n".join(rows) + "\n")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    assert main(["evaluate", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "training the autoencoder needs TensorFlow" in err and "--no-per-device" in err
    assert "training on" not in err
    assert main(["evaluate", str(runs), "--models", str(trained_model_dir),
                 "--no-per-device"]) == 0
    assert "needs TensorFlow" not in capsys.readouterr().err


def test_bad_arguments_exit_2() -> None:
    res = anomalyd("train", "--rows", "many")
    assert res.returncode == 2
    assert "argument --rows: not an integer: 'many'" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--rows", "3"], "--rows: must be at least 50, got 3"),
        (["train", "--window", "0"], "--window: must be at least 1, got 0"),
        (["train", "--quantile", "2"], "--quantile: must be in [0.5, 1), got 2.0"),
        (["evaluate", "runs", "--warmup", "-5"], "--warmup: must be at least 50, got -5"),
        (["evaluate", "runs", "--window", "0"], "--window: must be at least 1, got 0"),
        (["evaluate", "runs", "--quantile", "0.2"], "--quantile: must be in [0.5, 1)"),
        (["evaluate", "runs", "--threshold-margin", "0.5"],
         "--threshold-margin: must be a number from 1 to 100, got '0.5'"),
    ],
)
def test_nonsense_numbers_are_refused_before_any_work(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_train_refuses_to_replace_a_model_set_without_force(trained_model_dir: Path) -> None:
    res = anomalyd("train", "--out", str(trained_model_dir))
    assert res.returncode == 2
    assert "--force" in res.stderr


def test_train_refuses_an_out_that_is_not_a_model_directory_before_any_work(
    tmp_path: Path,
) -> None:
    """A first-time user's `train --out` wrote a model set into the daemon's state
    directory: a directory holding other files, or the configured state.dir even when
    empty, is refused before training; a README (models/ has one) is no obstacle."""
    state = tmp_path / "state"
    (state / "x").mkdir(parents=True)
    (state / "x" / "devices.json").write_text("{}")
    env = {"STATE_DIR": str(state / "x")}
    res = anomalyd("train", "--out", str(state / "x"), env=env)
    assert res.returncode == 2
    assert "is the daemon's state directory (state.dir" in res.stderr
    res = anomalyd("train", "--out", str(state / "x"), env={"STATE_DIR": str(tmp_path / "s")})
    assert res.returncode == 2
    assert "is not empty and holds no model set (devices.json)" in res.stderr
    assert "training into" not in res.stderr
    empty_state = tmp_path / "empty-state"
    empty_state.mkdir()
    res = anomalyd("train", "--out", str(empty_state), env={"STATE_DIR": str(empty_state)})
    assert res.returncode == 2 and "state.dir" in res.stderr
    assert list(empty_state.iterdir()) == []
    res = anomalyd("train", "--out", str(empty_state / "models"),
                   env={"STATE_DIR": str(empty_state)})  # a new folder inside it
    assert res.returncode == 2 and "is inside the daemon's state directory" in res.stderr
    assert list(empty_state.iterdir()) == []
    from daemon.training.train import out_problem

    readme = tmp_path / "models"
    readme.mkdir()
    (readme / "README.md").write_text("model sets live here")
    (readme / "lost+found").mkdir()  # a volume's root
    assert out_problem(readme, state, force=False) is None
    assert out_problem(tmp_path / "new", state, force=False) is None


def test_train_refuses_an_unknown_detector_before_any_work(tmp_path: Path) -> None:
    res = anomalyd("train", "--detectors", "lof,svm", "--out", str(tmp_path / "m"))
    assert res.returncode == 2
    assert "--detectors" in res.stderr and "svm" in res.stderr
    assert "training into" not in res.stderr and not (tmp_path / "m").exists()


def test_train_on_a_broken_csv_names_the_problem(tmp_path: Path) -> None:
    data = tmp_path / "broken.csv"
    data.write_text("temperature;vibration\n45.1;2.8\n45.2;oops\n")
    res = anomalyd("train", "--data", str(data), "--out", str(tmp_path / "m"))
    assert res.returncode == 2
    assert "vibration" in res.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_train_skip_bad_rows_trains_on_the_rest_and_records_it(tmp_path: Path) -> None:
    """Sensor dropouts in an export: refused with every bad row counted, then, with
    --skip-bad-rows, trained on the others; the manifest says rows were left out."""
    lines = ["temperature;vibration"] + [f"{45 + i % 7 * 0.1:.1f};{2.8 + i % 5 * 0.05:.2f}"
                                         for i in range(120)]
    lines[10], lines[50] = "45.0;", "nan;2.9"
    data = tmp_path / "gaps.csv"
    data.write_text("\n".join(lines) + "\n")
    refused = anomalyd("train", "--data", str(data), "--out", str(tmp_path / "m"))
    assert refused.returncode == 2
    assert "2 of 120 rows cannot be used: line 11: column 'vibration'" in refused.stderr
    res = anomalyd("train", "--data", str(data), "--out", str(tmp_path / "m"),
                   "--skip-bad-rows", "--detectors", "isolation_forest")
    assert res.returncode == 0, res.stderr
    assert "gaps.csv: left out 2 bad rows: line 11: column 'vibration': not a number" in (
        res.stderr
    )
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["training"]["source"] == "csv gaps.csv (2 bad rows left out)"
    assert manifest["training"]["rows"] == 118
    # no labelled rows: only the false-alarm rate is printed, and why
    assert "isolation_forest  threshold=" in res.stderr and "far=" in res.stderr
    assert "precision=" not in res.stderr and "no labelled anomalies to validate on" in res.stderr


def test_score_a_csv_offline_writes_one_verdict_per_row(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "stream.csv"
    cols = list(NORMAL)
    rows = [NORMAL, ANOMALOUS, NORMAL]
    data.write_text(
        ";".join(["seq", *cols])
        + "\n"
        + "\n".join(";".join([str(i), *(str(r[c]) for c in cols)]) for i, r in enumerate(rows))
        + "\n"
    )
    out = tmp_path / "verdicts.jsonl"
    res = anomalyd("score", str(data), "--out", str(out), env={"MODEL_DIR": str(trained_model_dir)})
    assert res.returncode == 0, res.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["is_anomaly"] for v in verdicts] == [False, True, False]
    assert [v["seq"] for v in verdicts] == [0, 1, 2]
    assert "vibration" in verdicts[1]["explanation"]
    assert "3 readings: 1 anomalies, 0 rejected" in res.stderr


def test_score_reports_its_running_counts_while_it_works(
    trained_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long backtest shows progress: the running counts after each chunk once the
    reporting interval has passed (set to 0 here, so every chunk reports)."""
    import io

    from daemon import offline
    from daemon.config import Settings
    from daemon.models import load_bundle

    monkeypatch.setattr(offline, "PROGRESS_SECONDS", 0.0)
    cols = list(NORMAL)
    rows = [ANOMALOUS if i % 100 == 0 else NORMAL for i in range(offline.CHUNK * 2 + 10)]
    data = tmp_path / "long.csv"
    data.write_text(";".join(cols) + "\n"
                    + "\n".join(";".join(str(r[c]) for c in cols) for r in rows) + "\n")
    said: list[str] = []
    counts = offline.score_file(data, io.BytesIO(), Settings(), load_bundle(trained_model_dir),
                                device="p", detector=None, progress=said.append)
    assert counts["readings"] == len(rows)
    done = [int(m.split()[1]) for m in said]
    assert done == [offline.CHUNK, offline.CHUNK * 2, len(rows)], said
    assert said[-1] == (f"scored {len(rows)} readings so far: {counts['anomalies']} anomalies, "
                        "0 rejected")
    assert counts["anomalies"] >= 9  # the anomalous rows are found


def test_score_replays_dead_letters_with_only_the_refused_entries(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """A subscriber's copy of the dead-letter topic, given to ``score``: each record's
    payload is judged again, a batch message's refused entries only; a record about a
    result too large for the broker is skipped."""
    import io

    from daemon import offline, oversize
    from daemon.config import ReadingsConfig, Settings, TopicsConfig
    from daemon.models import load_bundle
    from daemon.pipeline import Pipeline, RawMessage
    from daemon.readings import Decoder

    bundle = load_bundle(trained_model_dir)
    live = Pipeline(bundle, Decoder(bundle.features, bundle.detector_names), TopicsConfig(),
                    Settings().alerts, readings=ReadingsConfig(late_policy="drop"))
    t = 1_700_000_000.0  # received 10 s after, as live readings are
    batch = {"readings": [{**NORMAL, "timestamp": t + 1, "seq": 2},
                          {**ANOMALOUS, "timestamp": t - 3600, "seq": 3},
                          {**NORMAL, "timestamp": t + 2, "seq": 4, "pressure": "high"}]}
    sent = [{**NORMAL, "timestamp": t, "seq": 1}, {**ANOMALOUS, "timestamp": t - 7200, "seq": 0},
            batch]
    outputs, _ = live.process([RawMessage("sensors/p-9/readings", orjson.dumps(m), t + 10)
                               for m in sent] + [RawMessage("sensors/p-9/readings",
                                                            b"{not json", t + 10)], t + 11)
    dead = [o.payload for outs in outputs for o in outs if o.kind == "dead_letter"]
    assert [sorted(r["reason"] for r in orjson.loads(d)["rejections"]) for d in dead] == [
        ["late"], ["late", "non_numeric_feature"], ["not_json"]]
    # a result the broker could not take is on that topic too: it carries no reading
    verdict = next(o for outs in outputs for o in outs
                   if o.kind == "verdict" and b"predictions" in o.payload)
    (notice,), action = oversize.fit(verdict, 420, TopicsConfig().dead_letter, t + 11)
    assert action == "replaced"
    data = tmp_path / "dead.jsonl"
    data.write_bytes(b"\n".join([*dead[:1], notice.payload, *dead[1:]]) + b"\n")
    out = io.BytesIO()
    counts = offline.score_file(data, out, Settings(), bundle, device="unknown",
                                detector=None)
    replayed = [orjson.loads(line) for line in out.getvalue().splitlines()]
    single, refused_again, judged_batch, still_bad = replayed  # a batch's refusal first
    assert single["device_id"] == "p-9" and single["seq"] == 0 and single["is_anomaly"] is True
    # of the batch, the late entry is judged; the bad one is refused again, for its reason
    assert [p["seq"] for p in judged_batch["predictions"]] == [3]
    assert refused_again["reason"] == "non_numeric_feature"
    assert still_bad["reason"] == "not_json"
    assert counts == {"readings": 2, "anomalies": 2, "rejected": 2, "filling": 0, "raised": 0,
                      "escalated": 0, "resolved": 0}


def test_score_json_lines_dead_letters_bad_lines_and_keeps_going(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "stream.jsonl"
    data.write_text(
        "\n".join(
            [
                orjson.dumps({**NORMAL, "device_id": "p1"}).decode(),
                '{"temperature": "hot"}',
                orjson.dumps(ANOMALOUS).decode(),
            ]
        )
        + "\n"
    )
    res = anomalyd("score", str(data), env={"MODEL_DIR": str(trained_model_dir)})
    assert res.returncode == 0, res.stderr
    out = [json.loads(line) for line in res.stdout.splitlines()]
    assert out[0]["device_id"] == "p1"
    assert out[0]["is_anomaly"] is False
    assert out[1]["reason"] in {"missing_feature", "non_numeric_feature"}
    assert out[2]["is_anomaly"] is True


def test_simulate_publishes_readings_the_daemon_accepts(
    broker: Broker, collector_for: Any, trained_model_dir: Path
) -> None:
    col = collector_for(broker, ["sensors/+/readings"])
    res = anomalyd(
        "simulate",
        "--devices",
        "3",
        "--rate",
        "20",
        "--duration",
        "1.5",
        "--fault-rate",
        "0.2",
        "--seed",
        "7",
        env={"MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port)},
    )
    assert res.returncode == 0, res.stderr
    got = col.wait_for(lambda t, p: True, count=60)
    devices = {t.split("/")[1] for t, _ in got}
    assert devices == {"pump-001", "pump-002", "pump-003"}
    from daemon.models import load_bundle
    from daemon.readings import Decoder

    bundle = load_bundle(trained_model_dir)
    decoder = Decoder(bundle.features, bundle.detector_names)
    decoded = [decoder.decode(t, p, 0.0) for t, p in got]
    assert all(d.readings and not d.rejections for d in decoded)


def test_simulate_refuses_a_model_set_that_reads_other_features(
    tmp_path: Path, broker: Broker, collector_for: Any
) -> None:
    """A model set trained on one's own CSV (Temp_degC, ...): the simulated pumps' readings
    would all be dead-lettered (missing_feature), yet simulate said "sent 12 readings".
    It refuses before connecting, naming both lists; --send-anyway sends."""
    from daemon.training.train import train_csv

    data = tmp_path / "plant.csv"
    data.write_text("Temp_degC,temperature\n" + "".join(
        f"{40 + i % 7 * 0.3:.1f},{45 + i % 5 * 0.2:.1f}\n" for i in range(120)))
    models = tmp_path / "m"
    train_csv(data, models, detectors=["isolation_forest"])
    env = {"MODEL_DIR": str(models), "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port)}
    col = collector_for(broker, ["sensors/+/readings"])
    res = anomalyd("simulate", "--devices", "1", "--rate", "20", "--duration", "1", env=env)
    assert res.returncode == 2
    assert f"the model set in {models} reads Temp_degC, temperature; the simulator sends " \
           "temperature, vibration" in res.stderr
    assert "(missing_feature: Temp_degC)" in res.stderr and "--send-anyway" in res.stderr
    assert "simulating" not in res.stderr
    res = anomalyd("simulate", "--devices", "1", "--rate", "20", "--duration", "1",
                   "--send-anyway", "--seed", "1", env=env)
    assert res.returncode == 0, res.stderr
    assert col.wait_for(lambda t, p: True, count=5)


def test_simulate_without_a_broker_exits_3() -> None:
    from tests.broker import free_port

    res = anomalyd("simulate", "--duration", "1", env={"MQTT_PORT": str(free_port())})
    assert res.returncode == 3
    assert "cannot reach broker" in res.stderr


@pytest.mark.parametrize("args", [["--devices", "0"], ["--rate", "0"]])
def test_simulate_rejects_nonsense(args: list[str]) -> None:
    assert anomalyd("simulate", *args).returncode == 2


def test_a_backtest_uses_the_configured_baseline_margin(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """score must judge as the daemon would: with the configuration's threshold margin."""
    import io

    import numpy as np

    from daemon import offline
    from daemon.config import BaselineConfig, Settings
    from daemon.models import load_bundle

    rng = np.random.default_rng(3)
    cols = list(NORMAL)
    rows = [{c: NORMAL[c] * (1 + 0.01 * rng.normal()) for c in cols} for _ in range(40)]
    rows += [ANOMALOUS] * 10
    data = tmp_path / "run.csv"
    data.write_text(";".join(cols) + "\n"
                    + "\n".join(";".join(str(r[c]) for c in cols) for r in rows) + "\n")
    bundle = load_bundle(trained_model_dir)

    def anomalies(margin: float) -> int:
        s = Settings(baseline=BaselineConfig(warmup_readings=20, threshold_margin=margin))
        return offline.score_file(data, io.BytesIO(), s, bundle, device="p",
                                  detector=None)["anomalies"]

    assert anomalies(1.5) == 10  # the fault, after the warm-up
    assert anomalies(100.0) < anomalies(1.5)


def test_run_with_its_http_port_taken_says_so_and_exits_2(trained_model_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = anomalyd("run", env={"HEALTH_PORT": str(port), "MODEL_DIR": str(trained_model_dir),
                                   "STATE_DIR": str(trained_model_dir.parent / "state-port")})
    assert res.returncode == 2, res.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in res.stderr
    assert "HEALTH_PORT" in res.stderr
    assert "Traceback" not in res.stderr


def test_run_with_a_default_detector_the_model_set_lacks_exits_2(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "detector.toml"
    config.write_text('[model]\ndefault_detector = "forest"\n')
    res = anomalyd("--config", str(config), "run",
                   env={"MODEL_DIR": str(trained_model_dir), "HEALTH_PORT": "0",
                        "STATE_DIR": str(tmp_path / "state")})
    assert res.returncode == 2, res.stderr
    assert "model.default_detector = 'forest' is not in the model set" in res.stderr
    assert "isolation_forest" in res.stderr  # what it has
    assert "Traceback" not in res.stderr


def test_config_may_follow_the_command_too(tmp_path: Path, trained_model_dir: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[batch]\nmax_wait_ms = 7\n")
    for args in (("--config", str(config), "check-config"),
                 ("check-config", "--config", str(config)),
                 ("check-config", "-c", str(config))):
        res = anomalyd(*args, env={"MODEL_DIR": str(trained_model_dir)})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["batch"]["max_wait_ms"] == 7.0


def test_simulate_takes_a_duration_as_record_does() -> None:
    from daemon.cli import build_parser

    assert build_parser().parse_args(["simulate", "--duration", "2m"]).duration == 120.0
    res = anomalyd("simulate", "--duration", "soon")
    assert res.returncode == 2 and "not a duration" in res.stderr
