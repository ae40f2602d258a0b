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
