"""CSV files as plants export them, read alike by training and ``anomalyd score``
(``daemon.training.datasets.open_table``): each case either read as meant or refused with
a message that says what the file is and what to do."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import orjson
import pytest

from daemon.errors import TrainingError
from daemon.offline import _rows
from daemon.training.datasets import load_csv
from daemon.training.train import train_csv


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def payloads(path: Path, features: tuple[str, ...] = ()) -> list[tuple[str | None, dict]]:
    return [(device, orjson.loads(raw)) for device, raw in _rows(path, features)]


def test_an_epoch_time_column_is_a_time_not_a_feature(tmp_path: Path) -> None:
    ms = write(tmp_path / "ms.csv", "ts2,temp\n1795853700000,45.3\n1795853701000,45.4\n")
    assert load_csv(ms).features == ("temp",)  # by its values: milliseconds, rising
    # ... and the backtest stamps each reading with it, in the seconds the daemon reads
    assert payloads(ms) == [(None, {"timestamp": 1795853700.0, "temp": 45.3}),
                            (None, {"timestamp": 1795853701.0, "temp": 45.4})]
    named = write(tmp_path / "named.csv", "Zeit;temp\n28.11.2026 10:15:00;45,3\n")
    assert load_csv(named).features == ("temp",)  # by its name
    # times the decoder cannot read are left out of the backtest's readings, saying so
    said: list[str] = []
    assert [orjson.loads(raw) for _, raw in _rows(named, (), said.append)] == [{"temp": 45.3}]
    assert said and "column 'Zeit' holds times the daemon cannot read" in said[0]
    # a counter that is not a clock (too small, or falling) stays a feature
    counter = write(tmp_path / "counter.csv", "t,runs\n1,2000000000\n2,1999999999\n")
    assert load_csv(counter).features == ("t", "runs")
    # a data frame's row number is no reading either
    frame = write(tmp_path / "frame.csv", "Unnamed: 0,temp\n0,45.3\n1,45.4\n")
    assert load_csv(frame).features == ("temp",)


def test_a_device_column_splits_the_rows_into_devices_windowed_each_on_its_own(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    rows = {d: rng.normal(loc, 1.0, size=(120, 2)) for d, loc in (("p1", 40), ("p2", 70))}
    lines = ["device_id,temp,flow"]
    for i in range(120):  # interleaved, as a historian exports a fleet
        lines += [f"{d},{float(rows[d][i][0])!r},{float(rows[d][i][1])!r}" for d in ("p1", "p2")]
    mixed = write(tmp_path / "fleet.csv", "\n".join(lines) + "\n")
    data = load_csv(mixed)
    assert data.features == ("temp", "flow")
    assert data.devices is not None and data.devices[:3] == ("p1", "p2", "p1")

    folder = tmp_path / "fleet"
    folder.mkdir()
    for d in ("p1", "p2"):  # the same readings, one file per device
        body = "\n".join(f"{float(a)!r},{float(b)!r}" for a, b in rows[d])
        write(folder / f"{d}.csv", f"temp,flow\n{body}\n")
    said: list[str] = []
    one = train_csv(mixed, tmp_path / "m1", window=5, detectors=["isolation_forest"],
                    progress=said.append)
    two = train_csv(folder, tmp_path / "m2", window=5, detectors=["isolation_forest"])
    # the model's inputs are the same windows: no window spans the two pumps
    assert one["training"]["fingerprint"] == two["training"]["fingerprint"]
    assert any("2 device(s) in its device column" in line for line in said)
    assert [d for d, _ in payloads(mixed)][:2] == ["p1", "p2"]


def test_a_device_column_of_another_name_is_named_with_device_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plant's export calls its device column ``Anlage``: training refuses the text
    column and says to give ``--device-column`` (before, its hint was to train on the
    numbers alone, one window across both pumps); with it, train, score and evaluate split
    the rows by device as for ``device_id``."""
    from daemon.cli import main
    from daemon.offline import check_input

    rng = np.random.default_rng(0)
    rows = {d: rng.normal(loc, 1.0, size=(60, 2)) for d, loc in (("p1", 40), ("p2", 70))}
    body = "\n".join(f"{d};{float(rows[d][i][0])!r};{float(rows[d][i][1])!r}"
                     for i in range(60) for d in ("p1", "p2"))
    anlage = write(tmp_path / "anlage.csv", f"Anlage;temp;flow\n{body}\n")
    device_id = write(tmp_path / "device_id.csv", f"device_id;temp;flow\n{body}\n")
    with pytest.raises(TrainingError, match=r"give --device-column 'Anlage'"):
        load_csv(anlage)
    with pytest.raises(TrainingError, match=r"--device-column 'Pumpe': no such column"):
        load_csv(anlage, device="Pumpe")
    named = load_csv(anlage, device="anlage")  # any case, where only one column fits
    assert named.devices == load_csv(device_id).devices and named.features == ("temp", "flow")
    assert list(_rows(anlage, (), device="Anlage")) == list(_rows(device_id, ()))
    with pytest.raises(TrainingError, match=r"--device-column 'Pumpe': no such column"):
        check_input(anlage, "Pumpe")  # before score's --out is opened

    train = ["train", "--window", "5", "--detectors", "isolation_forest"]
    assert main([*train, "--data", str(anlage), "--out", str(tmp_path / "m1"),
                 "--device-column", "Anlage"]) == 0
    assert main([*train, "--data", str(device_id), "--out", str(tmp_path / "m2")]) == 0
    fingerprints = [json.loads((tmp_path / m / "manifest.json").read_text())["training"][
        "fingerprint"] for m in ("m1", "m2")]
    assert fingerprints[0] == fingerprints[1]  # the same windows, device by device
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "m1"))
    out = tmp_path / "verdicts.jsonl"
    assert main(["score", str(anlage), "--device-column", "Anlage", "--out", str(out)]) == 0
    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [v["device_id"] for v in verdicts[:4]] == ["p1", "p2", "p1", "p2"]


def test_a_column_name_twice_is_refused_by_training_and_scoring(tmp_path: Path) -> None:
    path = write(tmp_path / "twice.csv", "timestamp,temp,temp,flow\n2026-01-01T00:00:00,1,2,3\n")
    for read in (lambda: load_csv(path, features=["temp", "flow"]), lambda: payloads(path)):
        with pytest.raises(TrainingError, match=r"column name\(s\) \['temp'\] appear more "
                                                r"than once"):
            read()


def test_decimal_commas_blank_lines_and_a_delimiter_ending_each_line(tmp_path: Path) -> None:
    text = ('"Druck, bar";"Temperatur, °C";Durchfluss;\r\n"1,5";45,3;-2,25e1;\r\n\r\n'
            '1,6;45,4;120;\r\n\r\n')
    path = write(tmp_path / "de.csv", text)
    data = load_csv(path)
    assert data.features == ("Druck, bar", "Temperatur, °C", "Durchfluss")
    np.testing.assert_array_equal(data.X, [[1.5, 45.3, -22.5], [1.6, 45.4, 120.0]])
    assert payloads(path) == [
        (None, {"Druck, bar": 1.5, "Temperatur, °C": 45.3, "Durchfluss": -22.5}),
        (None, {"Druck, bar": 1.6, "Temperatur, °C": 45.4, "Durchfluss": 120})]
    # with "," as the delimiter a decimal comma cannot be: "45,3" stays two cells
    with pytest.raises(TrainingError, match="3 cells, header has 2"):
        load_csv(write(tmp_path / "en.csv", "a,b\n45,3,1\n"))


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(gzip.compress(b"a,b\n1,2\n")), "is a gzip-compressed file"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(40)), "is an Excel workbook"),
    (lambda p: p.write_bytes("a;Temperatur °C\n1;2\n".encode("cp1252")),
     r"line 1 is not UTF-8 text \(byte 0xb0\): save the file as CSV \(UTF-8\)"),
    (lambda p: p.write_bytes(b"a,b\n1,2\n3,S\xfcd\n"), "line 3 is not UTF-8 text"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
])
def test_a_file_that_is_not_csv_text_says_what_it_is(
    tmp_path: Path, make: object, message: str
) -> None:
    path = tmp_path / "export.csv"
    make(path)  # type: ignore[operator]
    with pytest.raises(TrainingError, match=message):
        load_csv(path)
    with pytest.raises(TrainingError, match=message):
        payloads(path)


def test_values_the_daemon_refuses_are_refused_for_training(tmp_path: Path) -> None:
    path = write(tmp_path / "big.csv", "a,b\n1,2e15\n2,3\n")
    with pytest.raises(TrainingError, match=r"line 2: column 'b': 2e15 is beyond ±1e\+15"):
        load_csv(path)


def test_a_column_that_never_changes_is_pointed_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    body = "\n".join(f"{float(v)!r},7.5" for v in rng.normal(size=80))
    said: list[str] = []
    train_csv(write(tmp_path / "stuck.csv", f"temp,stuck\n{body}\n"), tmp_path / "m",
              detectors=["isolation_forest"], progress=said.append)
    assert any("['stuck'] never change" in line for line in said), json.dumps(said)


def test_rows_out_of_time_order_are_pointed_out(tmp_path: Path) -> None:
    rows = [f"2026-11-28T10:00:0{s},{s}" for s in (0, 1, 3, 2, 4, 4, 5)]
    path = write(tmp_path / "order.csv", "timestamp,temp\n" + "\n".join(rows) + "\n")
    assert load_csv(path).notes == (
        "column 'timestamp': 1 row(s) go back in time (the first on line 5) and 1 row(s) "
        "repeat the time before them; windows are made in file order, so sort the file by "
        "time (and drop repeated rows) if this is not intended; if it holds several devices' "
        "rows, name the column that tells them apart (--device-column NAME)",)
    ordered = write(tmp_path / "ordered.csv", "ts,temp\n1795853700,1\n1795853701,2\n")
    assert load_csv(ordered).notes == ()


def test_lone_carriage_returns_and_oversized_fields(tmp_path: Path) -> None:
    old_mac = write(tmp_path / "mac.csv", "a;b\r1;2\r3;4\r")
    np.testing.assert_array_equal(load_csv(old_mac).X, [[1, 2], [3, 4]])
    assert payloads(old_mac) == [(None, {"a": 1, "b": 2}), (None, {"a": 3, "b": 4})]
    huge = write(tmp_path / "huge.csv", 'a,b\n1,"' + "x" * 200_000 + '"\n')
    with pytest.raises(TrainingError, match="line 2: field larger than field limit"):
        load_csv(huge)


def test_times_in_a_local_spelling_are_not_suggested_as_the_device_column(
    tmp_path: Path,
) -> None:
    """A historian's export: German dates under a name not known as a time column. They
    were the column suggested for --device-column; now they are said to be times."""
    rows = [f"0{s}.11.2026 08:00:0{s};P-1;{s},5" for s in range(1, 6)]
    path = write(tmp_path / "de.csv", "Zeitstempel;Anlage;Temperatur\n" + "\n".join(rows))
    with pytest.raises(TrainingError) as refused:
        load_csv(path)
    assert ("['Zeitstempel'] hold times in a spelling not read as times (e.g. "
            "'01.11.2026 08:00:01'): name the column timestamp") in str(refused.value)
    assert "give --device-column 'Anlage'" in str(refused.value)
    us = write(tmp_path / "us.csv", "Time Stamp,temp\n" + "\n".join(
        f"11/0{s}/2026 8:00:00 AM,{s}" for s in range(1, 6)))
    with pytest.raises(TrainingError, match=r"not read as times .* Or leave them out") as only:
        load_csv(us)
    assert "--device-column" not in str(only.value)


def test_interleaved_devices_under_a_column_of_another_name_are_hinted_at(
    tmp_path: Path,
) -> None:
    """A numeric device column of a name not known (``Pump_No``) is a feature; the repeated
    times it leaves say how to name it (it was only "sort the file by time")."""
    rows = [f"2026-11-28T10:00:0{s},{d},{s}" for s in range(5) for d in (1, 2)]
    fleet = write(tmp_path / "fleet.csv", "timestamp,Pump_No,temp\n" + "\n".join(rows) + "\n")
    (note,) = load_csv(fleet).notes
    assert note.endswith("name the column that tells them apart (--device-column NAME)")
    assert load_csv(fleet, device="Pump_No").notes == ()


def test_time_order_is_judged_device_by_device(tmp_path: Path) -> None:
    rows = [f"2026-11-28T10:00:0{s},p{d},{s}" for s in range(5) for d in range(3)]
    fleet = write(tmp_path / "fleet.csv", "timestamp,device_id,temp\n" + "\n".join(rows) + "\n")
    assert load_csv(fleet).notes == ()  # sorted by time: each pump's rows in order
