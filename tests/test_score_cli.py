"""``anomalyd score FILE``: the CSV's time column, a file nothing of which could be scored,
a reader that stops early, an unknown detector."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from daemon.cli import main
from daemon.models import load_bundle
from tests.broker import REPO
from tests.conftest_models import NORMAL_READING as NORMAL

FEATURES = list(NORMAL)
START = datetime(2020, 3, 9, 10, 14, 33)


def write_csv(path: Path, header: list[str], rows: list[list[object]], sep: str = ";") -> Path:
    path.write_text("\n".join(sep.join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def normal_rows(n: int) -> list[list[object]]:
    return [[round(NORMAL[f] * (1 + 0.001 * (i % 7)), 4) for f in FEATURES] for i in range(n)]


@pytest.fixture
def model_env(trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODEL_DIR", str(trained_model_dir))
    return trained_model_dir


@pytest.mark.parametrize("time_column", ["datetime", "time", "Timestamp", "recorded"])
def test_each_reading_takes_its_time_from_the_csv_time_column_as_training_does(
    model_env: Path, tmp_path: Path, time_column: str
) -> None:
    """SKAB's layout (``;``, a ``datetime`` column, label columns): each verdict's timestamp
    is its row's time, read as the decoder reads one (naive is UTC); ``recorded`` is a time
    column only by its first value being an ISO date, as in training. The label columns are
    not part of the reading: the one row refused shows what was judged."""
    times = [START + timedelta(seconds=i) for i in range(6)]
    rows = [[t.isoformat(sep=" "), *r, 0.0, 0.0]
            for t, r in zip(times, normal_rows(6), strict=True)]
    rows[3][1] = "oops"  # temperature: dead-lettered with its payload
    data = write_csv(tmp_path / "run.csv", [time_column, *FEATURES, "anomaly", "changepoint"],
                     rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--out", str(out)]) == 0
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(records) == len(rows)
    expected = [t.replace(tzinfo=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                for t in times]
    verdicts = [(i, r) for i, r in enumerate(records) if "reason" not in r]
    assert [r["timestamp"] for _, r in verdicts] == [expected[i] for i, _ in verdicts]
    (dead,) = [r for r in records if "reason" in r]
    judged = orjson.loads(dead["payload"])
    assert judged["timestamp"] == times[3].isoformat(sep=" ")
    assert set(judged) == {"timestamp", *FEATURES}  # no time column by name, no labels


def test_a_file_of_which_no_reading_could_be_scored_exits_1_and_says_why(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = write_csv(tmp_path / "wrong.csv", ["a", "b"], [[1, 2]] * 20)
    assert main(["score", str(wrong), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "scored 0 readings: 0 anomalies, 20 rejected" in err
    assert ("error: no reading of " + str(wrong) + " could be scored: the first refused as "
            "missing_feature: feature 'temperature' is missing") in err

    # one reading scored is a backtest: exit 0, the others still counted as rejected
    some = write_csv(tmp_path / "some.csv", FEATURES, [*normal_rows(1), ["x"] * len(FEATURES)])
    assert main(["score", str(some), "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "scored 1 readings: 0 anomalies, 1 rejected" in err and "error" not in err


def test_a_reader_that_stops_early_ends_the_command_quietly(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """``anomalyd score FILE | head -1``: far more output than a pipe holds, the reader
    gone after one line: no traceback, a clean exit."""
    data = write_csv(tmp_path / "long.csv", FEATURES, normal_rows(3000))
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "score", str(data)], cwd=REPO,
        env=dict(os.environ, MODEL_DIR=str(trained_model_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert orjson.loads(first)["device_id"] == "offline"
    assert code in (0, 1), err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_an_unknown_detector_exits_2_naming_the_model_sets_before_touching_out(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_csv(tmp_path / "run.csv", FEATURES, normal_rows(5))
    out = tmp_path / "earlier.jsonl"
    out.write_text("an earlier backtest\n")
    code = main(["score", str(data), "--model", "bogus", "--out", str(out)])
    assert out.read_text() == "an earlier backtest\n"
    assert code == 2
    err = capsys.readouterr().err
    names = load_bundle(model_env).detector_names
    assert "--model: no detector 'bogus' in the model set" in err
    assert f"it has {', '.join(names)}" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--out", "--alerts"])
def test_an_output_naming_the_file_scored_exits_2_and_leaves_it_whole(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """``--out`` (or ``--alerts``) naming the input itself, here by another spelling of
    its path: it was emptied on opening, before it was read (the export gone, and "it holds
    no readings")."""
    data = write_csv(tmp_path / "run.csv", FEATURES, normal_rows(5))
    before = data.read_bytes()
    out = ["--out", str(tmp_path / "v.jsonl")] if flag == "--alerts" else []
    code = main(["score", str(data), *out, flag, str(tmp_path / "." / "run.csv")])
    assert code == 2
    assert data.read_bytes() == before
    assert f"{flag} {tmp_path / '.' / 'run.csv'} is the file being scored" in (
        capsys.readouterr().err)


def test_out_and_alerts_naming_one_file_exit_2_before_touching_it(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_csv(tmp_path / "run.csv", FEATURES, normal_rows(5))
    out = tmp_path / "earlier.jsonl"
    out.write_text("an earlier backtest\n")
    assert main(["score", str(data), "--out", str(out), "--alerts", str(out)]) == 2
    assert out.read_text() == "an earlier backtest\n"
    assert "--out and --alerts name one file" in capsys.readouterr().err


def test_a_file_that_is_not_csv_text_exits_2_saying_so_before_touching_out(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "run.csv"
    data.write_bytes("Temperatur °C;x\n1;2\n".encode("cp1252"))
    out = tmp_path / "earlier.jsonl"
    out.write_text("an earlier backtest\n")
    code = main(["score", str(data), "--out", str(out)])
    assert code == 2
    assert out.read_text() == "an earlier backtest\n"
    err = capsys.readouterr().err
    assert "line 1 is not UTF-8 text" in err and "Traceback" not in err


def test_a_backtest_counts_the_pages_and_writes_the_alerts_the_daemon_would_publish(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run of anomalous readings on one pump raises its alert (k of the last n) and the
    normal ones after resolve it; the other pump pages no one. Before, ``score`` wrote the
    verdicts only: how many pages a week would have brought was nowhere."""
    from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS

    def row(device: str, reading: dict[str, float]) -> list[object]:
        return [device, *(reading[f] for f in FEATURES)]

    rows = [row("p1", NORMAL) for _ in range(5)] + [row("p1", ANOMALOUS) for _ in range(5)]
    rows += [row("p1", NORMAL) for _ in range(15)] + [row("p2", NORMAL) for _ in range(10)]
    data = write_csv(tmp_path / "week.csv", ["device", *FEATURES], rows)
    out, alerts = tmp_path / "verdicts.jsonl", tmp_path / "alerts.jsonl"
    assert main(["score", str(data), "--out", str(out), "--alerts", str(alerts)]) == 0
    messages = [orjson.loads(line) for line in alerts.read_bytes().splitlines()]
    states = [(m["device_id"], m["state"]) for m in messages]
    assert states[0] == ("p1", "raised") and states[-1] == ("p1", "resolved"), states
    assert {d for d, _ in states} == {"p1"}
    raised = sum(1 for _, s in states if s == "raised")
    escalated = sum(1 for _, s in states if s == "escalated")
    err = capsys.readouterr().err
    assert (f"scored 35 readings: 5 anomalies, 0 rejected; alerts (pages): {raised} raised, "
            f"{escalated} escalated, 1 resolved, written to {alerts}") in err
    assert len(out.read_bytes().splitlines()) == 35  # the verdicts, as before


def test_anomalies_on_a_partial_window_are_counted_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a windowed model set a device's first readings are judged on a partial window
    and raise no alert: the summary says how many of the anomalies those were."""
    import numpy as np

    from daemon.training.train import train
    from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS

    rng = np.random.default_rng(0)
    level = np.array([NORMAL[f] for f in FEATURES])
    models = tmp_path / "models"
    train(level * (1 + 0.01 * rng.normal(size=(1500, len(FEATURES)))), FEATURES, models,
          source="test", window=5, detectors=["isolation_forest"])
    monkeypatch.setenv("MODEL_DIR", str(models))
    rows = [[ANOMALOUS[f] for f in FEATURES]] + [
        [round(v, 4) for v in level * (1 + 0.01 * rng.normal(size=len(FEATURES)))]
        for _ in range(20)]
    data = write_csv(tmp_path / "run.csv", FEATURES, rows)
    assert main(["score", str(data), "--out", str(tmp_path / "o.jsonl")]) == 0
    verdicts = [orjson.loads(line) for line in (tmp_path / "o.jsonl").read_bytes().splitlines()]
    filling = [v for v in verdicts if v["is_anomaly"] and v.get("window_filling")]
    assert filling and verdicts[0] in filling
    err = capsys.readouterr().err
    assert f"({len(filling)} on a partial window, which raise no alert)" in err


def _capture(path: Path, devices: list[str], topics: bool) -> Path:
    """What mosquitto_sub -t 'sensors/+/readings' writes (-v: each line's topic first)."""
    lines = []
    for seq in range(5):
        for device in devices:
            payload = orjson.dumps({**NORMAL, "seq": seq}).decode()
            lines.append(f"sensors/{device}/readings {payload}" if topics else payload)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_json_lines_that_name_no_device_are_one_device_and_said_to_be(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mosquitto_sub capture of two devices was scored as one device, "offline", in
    silence. It still is (nothing in the lines tells them apart), with a warning saying
    how to keep them apart; --device (a choice) and device_id fields (names) are not
    warned about."""
    data = _capture(tmp_path / "cap.jsonl", ["p-1", "p-2"], topics=False)
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert (f"warning: the lines of {data} name no device (no device_id field, no topic): "
            "all are judged as one device, 'offline'") in err
    assert "a device_id field in each line" in err and "mosquitto_sub -v" in err
    assert {orjson.loads(line)["device_id"] for line in out.read_bytes().splitlines()} == {
        "offline"}
    assert main(["score", str(data), "--out", str(out), "--device", "p-1"]) == 0
    assert "warning:" not in capsys.readouterr().err
    named = tmp_path / "named.jsonl"
    named.write_bytes(b"".join(orjson.dumps({**NORMAL, "device_id": f"p-{i % 2}"}) + b"\n"
                               for i in range(6)))
    assert main(["score", str(named), "--out", str(out)]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_a_mosquitto_sub_v_capture_takes_each_device_from_its_topic(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mosquitto_sub -v` lines (`<topic> <json>`) were read as a CSV and every row
    refused: each is now its topic's device's reading, read with the configured
    subscription; a line of another topic (a verdict caught by -t '#') is skipped and
    said to be, a device id the pattern refuses is dead-lettered as the daemon does."""
    data = _capture(tmp_path / "cap.txt", ["p-1", "p-2"], topics=True)
    with data.open("a") as fh:
        fh.write('anomaly/p-1/verdict {"is_anomaly": false}\n')
        fh.write(f"sensors/bad id!/readings {orjson.dumps(NORMAL).decode()}\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scored 10 readings: 0 anomalies, 1 rejected" in err
    assert "skipped 1 lines whose topic is not one of the subscription's" in err
    assert "'anomaly/p-1/verdict'" in err and "warning:" not in err
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    verdicts = [r for r in records if "reason" not in r]
    assert sorted((r["device_id"], r["seq"]) for r in verdicts) == sorted(
        (d, s) for d in ("p-1", "p-2") for s in range(5))
    (dead,) = [r for r in records if "reason" in r]
    assert dead["reason"] == "bad_device_id"


def test_json_lines_with_their_time_under_another_name_are_said_to_be_stamped_on_scoring(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon logs a device whose readings carry their time as ``ts`` (not read: the
    readings are stamped on receipt); `score` said nothing and stamped them as it scored
    them. It now warns once for each such name, and not of readings with a
    ``timestamp``."""
    stamps = [START + timedelta(seconds=i) for i in range(6)]
    data = tmp_path / "ts.jsonl"
    data.write_bytes(b"".join(
        orjson.dumps({**NORMAL, "device_id": f"p-{i % 2}", "ts": t.isoformat()}) + b"\n"
        for i, t in enumerate(stamps)))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(data), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert (f"warning: readings of {data} (device 'p-0' first) carry their time as 'ts', "
            "which is not read") in err
    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(verdicts) == 6
    assert all(not v["timestamp"].startswith("2020-") for v in verdicts)  # stamped now
    data.write_bytes(b"".join(
        orjson.dumps({**NORMAL, "device_id": "p-0", "timestamp": t.isoformat()}) + b"\n"
        for t in stamps))
    assert main(["score", str(data), "--out", str(out)]) == 0
    assert "warning:" not in capsys.readouterr().err
