"""``anomalyd record``: readings from the broker into one CSV per device, which ``anomalyd
train --data FOLDER`` trains on (each file windowed on its own)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemon.errors import TrainingError
from daemon.models import load_bundle
from daemon.readings import Decoder
from daemon.record import MODEL_NAMES, RecordError, Recording, file_name, infer_features, record
from daemon.training.datasets import load_csv
from daemon.training.train import fingerprint, train_csv
from daemon.windows import derived_names, windowed_matrix
from tests.broker import REPO, Broker
from tests.conftest import make_settings
from tests.faults import Proxy


def test_features_are_the_first_readings_numeric_fields_in_its_order() -> None:
    flat = b'{"seq": 3, "b": 1.5, "a": 2, "ok": true, "name": "x", "timestamp": 1.7e9}'
    assert infer_features(flat) == ("b", "a")  # no meta fields, booleans or text
    assert infer_features(b'{"sensor_data": {"t": 1.0}, "model_name": "lof"}') == ("t",)
    assert infer_features(b'{"readings": [{"Flow Rate": 3.0}, {"other": 1.0}]}') \
        == ("Flow Rate",)
    for nothing in (b"not json", b"[1, 2]", b'{"seq": 1}', b'{"readings": []}'):
        assert infer_features(nothing) is None


def test_features_are_never_a_readings_own_fields_nor_unfit_for_a_csv_header() -> None:
    """One hostile first message decides the recording's columns: it must neither stop
    the recording (a feature named like a payload field is refused by the decoder) nor
    put formulas or thousands of columns into the file."""
    assert infer_features(b'{"readings": 1, "sensor_data": 2, "temperature": 3}') == (
        "temperature",)
    assert infer_features(b'{"=HYPERLINK(1)": 1, "@x": 2, "Volume Flow RateRMS": 3}') == (
        "Volume Flow RateRMS",)
    assert infer_features(b'{"a\\nb": 1, "' + b"x" * 101 + b'": 2, "ok": 3}') == ("ok",)
    many = orjson.dumps({f"f{i}": i for i in range(500)})
    assert infer_features(many) == tuple(f"f{i}" for i in range(64))
    # and what it infers, the decoder accepts
    Decoder(infer_features(b'{"readings": 1, "t": 2}') or (), set())


def test_file_names_are_the_device_ids_or_encoded() -> None:
    assert file_name("pump-1.a_b") == "pump-1.a_b.csv"
    assert file_name("plant:pump/1") == "plant%3Apump%2F1.csv"
    assert file_name("..") == "%2E%2E.csv"  # never a path of its own


def recording(out: Path, devices: list[str] | None = None) -> Recording:
    features = ("temperature", "Flow Rate")
    return Recording(out, features, devices, Decoder(features, MODEL_NAMES))


def test_valid_readings_are_written_per_device_and_the_rest_counted(tmp_path: Path) -> None:
    rec = recording(tmp_path)
    rec.add("sensors/p-1/readings", b'{"temperature": 20.5, "Flow Rate": 3, "seq": 1}', 1e9)
    rec.add("sensors/p-2/readings",
            b'{"readings": [{"temperature": 21, "Flow Rate": 4, "timestamp": 1.7e9},'
            b' {"temperature": "hot", "Flow Rate": 4}]}', 1e9)
    rec.add("sensors/p-1/readings", b"{oops", 1e9)
    rec.add("sensors/bad id/readings", b'{"temperature": 1, "Flow Rate": 1}', 1e9)
    rec.flush()
    assert dict(rec.per_device) == {"p-1": 1, "p-2": 1}
    assert dict(rec.rejected) == {"non_numeric_feature": 1, "not_json": 1, "bad_device_id": 1}
    assert "not recorded: 3" in rec.progress(None)
    one = (tmp_path / "p-1.csv").read_text().splitlines()
    assert one == ["timestamp,temperature,Flow Rate", "2001-09-09T01:46:40.000Z,20.5,3.0"]
    two = (tmp_path / "p-2.csv").read_text().splitlines()
    assert two[1].startswith("2023-11-14T22:13:20.000Z,21.0,4.0")  # the reading's own time
    # a later flush appends, without a second header; and train reads the files as they are
    rec.add("sensors/p-1/readings", b'{"temperature": 20.7, "Flow Rate": 3.1}', 1e9 + 1)
    rec.flush()
    data = load_csv(tmp_path / "p-1.csv")
    assert data.features == ("temperature", "Flow Rate")
    assert data.X.tolist() == [[20.5, 3.0], [20.7, 3.1]]


def test_the_progress_says_what_the_most_common_refusal_is_about(tmp_path: Path) -> None:
    """A ``--features`` name no reading has (a typo): the progress line names it, not only
    a count of ``missing_feature``."""
    rec = recording(tmp_path)
    for _ in range(3):
        rec.add("sensors/p-1/readings", b'{"temperature": 20.5, "Flow_Rate": 3}', 1e9)
    rec.add("sensors/p-1/readings", b"{oops", 1e9)
    assert ("not recorded: 4 (3 missing_feature: feature 'Flow Rate' is missing (the payload "
            "has 'Flow_Rate': feature names must match exactly), 1 not_json)"
            ) in rec.progress(None)


def test_a_reading_sent_again_with_its_seq_is_recorded_once(tmp_path: Path) -> None:
    """A broker's redelivery after a resumed session, or a device's resend: the same
    ``seq`` of the same device is one reading of the training data, not two."""
    rec = recording(tmp_path)
    one = b'{"temperature": 20.5, "Flow Rate": 3, "seq": 7}'
    rec.add("sensors/p-1/readings", one, 1e9)
    rec.add("sensors/p-1/readings", one, 1e9 + 1)  # redelivered
    rec.add("sensors/p-2/readings", one, 1e9)  # another device's seq 7
    rec.add("sensors/p-1/readings",
            b'{"readings": [{"temperature": 20.6, "Flow Rate": 3, "seq": 7},'
            b' {"temperature": 20.7, "Flow Rate": 3, "seq": 8}]}', 1e9 + 2)
    rec.add("sensors/p-1/readings", b'{"temperature": 20.5, "Flow Rate": 3}', 1e9 + 3)
    rec.add("sensors/p-1/readings", b'{"temperature": 20.5, "Flow Rate": 3}', 1e9 + 4)
    rec.flush()
    assert dict(rec.per_device) == {"p-1": 4, "p-2": 1}  # without seq: kept, both
    assert dict(rec.rejected) == {"repeat": 2}
    assert "not recorded: 2 (2 repeat)" in rec.progress(None)
    assert load_csv(tmp_path / "p-1.csv").X[:, 0].tolist() == [20.5, 20.7, 20.5, 20.5]


def test_a_recording_resumes_a_file_of_the_same_columns_and_refuses_another(
    tmp_path: Path,
) -> None:
    (tmp_path / "p-1.csv").write_text("timestamp,temperature,Flow Rate\nx,1,2\n")
    (tmp_path / "p-2.csv").write_text("timestamp,pressure\nx,1\n")
    rec = recording(tmp_path)
    rec.add("sensors/p-1/readings", b'{"temperature": 20.5, "Flow Rate": 3}', 1e9)
    rec.flush()
    assert (tmp_path / "p-1.csv").read_text().count("timestamp") == 1
    rec.add("sensors/p-2/readings", b'{"temperature": 20.5, "Flow Rate": 3}', 1e9)
    with pytest.raises(RecordError, match=r"p-2\.csv .* has the columns"):
        rec.flush()
    assert (tmp_path / "p-2.csv").read_text() == "timestamp,pressure\nx,1\n"  # untouched


def test_at_most_the_limit_is_recorded_even_from_a_batch(tmp_path: Path) -> None:
    features = ("temperature", "Flow Rate")
    rec = Recording(tmp_path, features, None, Decoder(features, MODEL_NAMES), limit=3)
    batch = orjson.dumps({"readings": [{"temperature": i, "Flow Rate": 1} for i in range(5)]})
    rec.add("sensors/p-1/readings", batch, 1e9)
    rec.add("sensors/p-2/readings", batch, 1e9)
    rec.flush()
    assert rec.recorded == 3 and dict(rec.per_device) == {"p-1": 3}
    assert load_csv(tmp_path / "p-1.csv").X[:, 0].tolist() == [0, 1, 2]
    assert not (tmp_path / "p-2.csv").exists()


def test_only_the_chosen_devices_are_recorded(tmp_path: Path) -> None:
    rec = recording(tmp_path, devices=["p-2"])
    for dev in ("p-1", "p-2", "p-3"):
        rec.add(f"sensors/{dev}/readings", b'{"temperature": 1, "Flow Rate": 2}', 1e9)
    rec.flush()
    assert dict(rec.per_device) == {"p-2": 1} and rec.other_devices == 2
    assert [p.name for p in tmp_path.iterdir()] == ["p-2.csv"]


def two_devices(folder: Path, n: int = 120) -> list[np.ndarray]:
    """Two devices at very different levels, one file each."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    runs = []
    for dev, level in (("a", 10.0), ("b", 100.0)):
        x = level + rng.normal(0, 0.1, (n, 2))
        lines = ["timestamp,t,p"] + [f"2026-01-01T00:00:{i % 60:02d},{r[0]},{r[1]}"
                                     for i, r in enumerate(x)]
        (folder / f"{dev}.csv").write_text("\n".join(lines) + "\n")
        runs.append(x)
    return runs


def test_training_on_a_folder_windows_each_device_on_its_own(tmp_path: Path) -> None:
    runs = two_devices(tmp_path / "rec")
    manifest = train_csv(tmp_path / "rec", tmp_path / "model", window=5,
                         detectors=["isolation_forest"])
    # the inputs the models were fitted on: each file windowed alone, then joined (a window
    # across the two files would put 10 and 100 in one standard deviation)
    expected = np.concatenate([windowed_matrix(x, 5) for x in runs])
    assert manifest["training"]["rows"] == 240
    inputs = derived_names(["t", "p"], 5)
    assert manifest["training"]["fingerprint"] == fingerprint(expected, inputs)
    assert "2 files" in manifest["training"]["source"]
    assert load_bundle(tmp_path / "model").features == ("t", "p")


def test_a_folder_of_files_with_other_columns_is_refused(tmp_path: Path) -> None:
    two_devices(tmp_path / "rec")
    (tmp_path / "rec" / "c.csv").write_text("timestamp,t,q\n2026-01-01T00:00:00,1,2\n")
    with pytest.raises(TrainingError, match=r"c\.csv: no column\(s\) \['p'\]"):
        train_csv(tmp_path / "rec", tmp_path / "model", detectors=["isolation_forest"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no CSV files"):
        train_csv(tmp_path / "empty", tmp_path / "model", detectors=["isolation_forest"])


@pytest.mark.integration
def test_recording_from_the_broker(broker: Broker, tmp_path: Path, publisher_for: Any,
                                   trained_model_dir: Path) -> None:
    settings = make_settings(broker, trained_model_dir)
    said: list[str] = []
    got: list[int] = []
    out = tmp_path / "rec"
    pub = publisher_for(broker)
    # a device that publishes retained left the broker a copy of an old reading
    pub.client.publish("sensors/rec-0/readings", orjson.dumps(
        {"temperature": 999, "vibration": 9.0, "seq": 999}), qos=1, retain=True).wait_for_publish(5)
    worker = threading.Thread(target=lambda: got.append(record(
        settings, out, duration_s=None, max_readings=30, devices=None, features=None,
        say=said.append)))
    worker.start()
    deadline = time.monotonic() + 10
    while not any(line.startswith("recording") for line in said):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # subscribed
    pub.client.publish("sensors/rec-1/readings", b"{not json", qos=1)
    for i in range(20):
        pub.client.publish(f"sensors/rec-{i % 2}/readings",
                           orjson.dumps({"temperature": 20 + i, "vibration": 1.0, "seq": i}),
                           qos=1)
    pub.client.publish("sensors/rec-0/readings", orjson.dumps(
        {"readings": [{"temperature": 50, "vibration": 2.0}] * 10}), qos=1)
    worker.join(timeout=30)
    assert not worker.is_alive() and got == [30]
    assert any("features (the numeric fields of the first reading" in line
               and "temperature, vibration" in line for line in said)
    assert any("1 not_json" in line for line in said)
    assert any("1 retained copy of old readings skipped" in line for line in said)
    zero = load_csv(out / "rec-0.csv")  # without the old reading
    assert zero.X[:, 0].tolist() == [20, 22, 24, 26, 28, 30, 32, 34, 36, 38] + [50] * 10
    assert load_csv(out / "rec-1.csv").X.shape == (10, 2)


@pytest.mark.integration
def test_the_command_line_records_until_its_duration_and_says_when_nothing_came(
    broker: Broker, tmp_path: Path
) -> None:
    env = {"MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "daemon", "record", str(tmp_path / "rec"),
                           "--duration", "1s"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "nothing recorded: no reading with numeric fields arrived" in done.stderr


@pytest.mark.integration
def test_a_recording_goes_on_after_the_broker_restarts_and_says_what_it_missed(
    fresh_broker: Broker, tmp_path: Path, publisher_for: Any, trained_model_dir: Path,
) -> None:
    """A broker restarted without persistence has lost the recorder's session: the
    subscription is made again on reconnection (it would stop hearing anything
    otherwise), and the recorder says readings may be missing."""
    settings = make_settings(fresh_broker, trained_model_dir)
    said: list[str] = []
    got: list[int] = []
    worker = _recording_in_thread(settings, tmp_path / "rec", 10, said, got)
    _publish_temperatures(publisher_for(fresh_broker).client, range(5))
    time.sleep(1.0)
    fresh_broker.restart()
    _wait_said(said, "reconnected to the broker")
    time.sleep(0.5)  # subscribed again
    _publish_temperatures(publisher_for(fresh_broker).client, range(5, 10))
    worker.join(timeout=30)
    assert not worker.is_alive() and got == [10]
    assert any(line == "connection lost; reconnecting" for line in said)
    assert any("published while the link was down were not recorded" in line for line in said)
    assert load_csv(tmp_path / "rec" / "r-1.csv").X[:, 0].tolist() == list(range(10))


def _recording_in_thread(settings: Any, out: Path, limit: int,
                         said: list[str], got: list[int]) -> threading.Thread:
    """``record`` of ``limit`` temperature readings on a thread, once it has subscribed."""
    worker = threading.Thread(target=lambda: got.append(record(
        settings, out, duration_s=None, max_readings=limit, devices=None,
        features=["temperature"], say=said.append)))
    worker.start()
    _wait_said(said, "features: temperature")
    time.sleep(0.5)  # subscribed
    return worker


def _wait_said(said: list[str], text: str) -> None:
    deadline = time.monotonic() + 30
    while not any(text in line for line in said):
        assert time.monotonic() < deadline, (text, said)
        time.sleep(0.05)


def _publish_temperatures(client: paho.Client, values: range) -> None:
    """Readings of device r-1, each acknowledged by the broker before the next."""
    for i in values:
        info = client.publish("sensors/r-1/readings", orjson.dumps({"temperature": i}), qos=1)
        info.wait_for_publish(5)


@pytest.mark.integration
def test_readings_published_while_the_recorders_link_is_down_are_recorded(
    broker: Broker, tmp_path: Path, publisher_for: Any, trained_model_dir: Path,
) -> None:
    """The broker keeps the recorder's session while its link is cut (MQTT 5), so the
    readings published meanwhile arrive when it reconnects and nothing is missing."""
    proxy = Proxy(broker.host, broker.port)
    try:
        direct = make_settings(broker, trained_model_dir)
        via_proxy = direct.mqtt.model_copy(update={"port": proxy.port})
        settings = direct.model_copy(update={"mqtt": via_proxy})
        said: list[str] = []
        got: list[int] = []
        worker = _recording_in_thread(settings, tmp_path / "rec", 15, said, got)
        pub = publisher_for(broker).client  # straight to the broker, never through the proxy
        _publish_temperatures(pub, range(5))
        time.sleep(1.0)
        proxy.blackhole()  # new connections refused: the recorder stays away
        proxy.reset()  # its link is cut
        _wait_said(said, "connection lost; reconnecting")
        _publish_temperatures(pub, range(5, 10))  # while it is away
        proxy.heal()
        _wait_said(said, "reconnected to the broker")
        _publish_temperatures(pub, range(10, 15))
        worker.join(timeout=30)
        assert not worker.is_alive() and got == [15]
        assert any("which kept the recording's session" in line for line in said), said
        assert not any("were not recorded" in line for line in said)
        assert load_csv(tmp_path / "rec" / "r-1.csv").X[:, 0].tolist() == list(range(15))
    finally:
        proxy.close()


@pytest.mark.integration
def test_a_finished_recording_leaves_no_session_at_the_broker(
    broker: Broker, tmp_path: Path, publisher_for: Any, trained_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Otherwise the broker would queue readings for a recorder that is gone."""
    client_id = f"record-ended-{time.time_ns()}"
    monkeypatch.setattr("daemon.record.record_client_id", lambda: client_id)
    settings = make_settings(broker, trained_model_dir)
    said: list[str] = []
    got: list[int] = []
    worker = _recording_in_thread(settings, tmp_path / "rec", 3, said, got)
    _publish_temperatures(publisher_for(broker).client, range(3))
    worker.join(timeout=30)
    assert not worker.is_alive() and got == [3]

    present: list[bool] = []
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv5)
    probe.on_connect = lambda c, u, flags, reason, props: present.append(
        flags.session_present)
    probe.connect(broker.host, broker.port, 30, clean_start=False)
    probe.loop_start()
    try:
        deadline = time.monotonic() + 10
        while not present:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        probe.loop_stop()
        probe.disconnect()
    assert present == [False]
