"""Device dispatch: which worker owns a device, and moving saved state when the layout
changes (another number of workers, one after several, device dispatch after shared,
shared after either)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from daemon import state
from daemon.acks import AckSequencer, Inbound
from daemon.config import AlertConfig, TopicsConfig
from daemon.models import ModelBundle
from daemon.partition import TopicOwnership, owner, split
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from daemon.topics import TopicMatcher
from tests.broker import REPO
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING

ALERTS = AlertConfig(raise_after=1, window=1, resolve_after=2)
PATTERN = "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


def pipeline(bundle: ModelBundle) -> Pipeline:
    return Pipeline(bundle, Decoder(bundle.features, bundle.detector_names), TopicsConfig(),
                    ALERTS, warmup=4)


def feed(p: Pipeline, device: str, *readings: dict[str, Any]) -> list[dict[str, Any]]:
    """The alert messages the readings caused."""
    msgs = [RawMessage(f"sensors/{device}/readings", orjson.dumps(r), 0.0) for r in readings]
    outputs, _ = p.process(msgs, 1000.0)
    return [orjson.loads(o.payload) for outs in outputs for o in outs if o.kind == "alert"]


def normal(i: int) -> dict[str, Any]:
    rng = np.random.default_rng(i)
    return {k: v * (1 + 0.01 * float(rng.normal())) for k, v in NORMAL_READING.items()}


def test_each_topic_has_exactly_one_owner_the_same_in_every_process() -> None:
    matcher = TopicMatcher("sensors/+/readings", PATTERN)
    workers = [TopicOwnership(matcher, i, 3) for i in range(3)]
    topics = [f"sensors/pump-{i}/readings" for i in range(300)]
    topics += ["sensors/bad id/readings", "other/pump-1/x"]  # no valid device: still one owner
    for topic in topics:
        assert sum(w.owns(topic) for w in workers) == 1
    shares = [sum(w.owns(t) for t in topics[:300]) for w in workers]
    assert min(shares) > 60  # spread, not all on one worker
    with pytest.raises(ValueError, match="worker index"):
        TopicOwnership(matcher, 3, 3)


def test_owners_are_the_same_in_every_process() -> None:
    """Workers are separate processes: Python's hash() of a string differs between them
    (PYTHONHASHSEED), the owner must not."""
    code = "from daemon.partition import owner; print([owner(f'pump-{i}', 5) for i in range(40)])"
    seen = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        seen.add(out.strip())
    assert seen == {str([owner(f"pump-{i}", 5) for i in range(40)])}


def test_a_message_passed_over_is_acknowledged_in_its_turn() -> None:
    sent: list[int] = []
    done: list[int] = []
    acks = AckSequencer(sent.append, lambda m: done.append(m.mid))
    mine, others = Inbound(1, 1, "t", b"", 0.0, 0.0), Inbound(2, 1, "t", b"", 0.0, 0.0)
    acks.register(mine)
    acks.register(others)
    acks.pass_over(others)
    assert sent == []  # it waits for the earlier message, as MQTT requires
    acks.release(mine)
    assert sent == [1, 2]
    assert done == [1]  # the passed-over message is no finished reading of ours


def two_workers_files(bundle: ModelBundle, directory: Path) -> dict[str, str]:
    """Two files as shared dispatch leaves them: both workers hold p-1 (each its own view),
    each holds other devices too; p-1's alert is raised in the newer file only."""
    older, newer = pipeline(bundle), pipeline(bundle)
    devices = [f"d-{i}" for i in range(6)]
    for i, dev in enumerate(devices):
        feed(older if i % 2 else newer, dev, *(normal(j) for j in range(5)))
    feed(older, "p-1", *(normal(j) for j in range(5)))
    feed(newer, "p-1", *(normal(j) for j in range(5)))
    (raised,) = feed(newer, "p-1", ANOMALOUS_READING)
    assert raised["state"] == "raised"
    state.save(directory / "devices-1.json", older.fleet.snapshot())
    os.utime(directory / "devices-1.json", (1_000_000, 1_000_000))
    state.save(directory / "devices-0.json", newer.fleet.snapshot())
    return {dev: "older" if i % 2 else "newer" for i, dev in enumerate(devices)}


def restored(bundle: ModelBundle, path: Path) -> Pipeline:
    snapshot = state.load(path)
    assert snapshot is not None
    p = pipeline(bundle)
    _, _, problems = p.fleet.restore(snapshot)
    assert problems == []
    return p


@pytest.mark.parametrize("workers", [1, 3])
def test_shared_files_are_re_cut_so_each_device_lives_with_its_owner(
    model_bundle: ModelBundle, tmp_path: Path, workers: int
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    two_workers_files(model_bundle, directory)
    state.repartition(directory, workers, "device")
    names = ["devices.json"] if workers == 1 else [f"devices-{i}.json" for i in range(workers)]
    expected_retired = {"devices-0.json", "devices-1.json"} - set(names)
    assert sorted(p.name for p in directory.glob("devices*.json")) == sorted(names)
    assert {p.name.removesuffix(".retired") for p in directory.glob("*.retired")} \
        == expected_retired
    everyone = {f"d-{i}" for i in range(6)} | {"p-1"}
    seen: set[str] = set()
    for i, name in enumerate(names):
        p = restored(model_bundle, directory / name)
        held = set(p.fleet.devices.devices)
        assert set(p.fleet.alert_states.devices) == held
        assert all(owner(dev, workers) == i for dev in held)
        assert not held & seen
        seen |= held
        if owner("p-1", workers) == i:
            # the newer file's view of p-1 won: its raised alert resolves here
            (resolved,) = feed(p, "p-1", normal(10), normal(11))
            assert resolved["state"] == "resolved"
    assert seen == everyone
    # the same layout again: nothing to do, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("devices*.json")}
    state.repartition(directory, workers, "device")
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("devices*.json")} == before


def test_shared_dispatch_and_a_first_single_daemon_leave_the_files_alone(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    two_workers_files(model_bundle, directory)
    before = {p.name: p.read_bytes() for p in directory.glob("devices*.json")}
    state.repartition(directory, 2, "shared")
    assert {p.name: p.read_bytes() for p in directory.glob("devices*.json")} == before
    single = tmp_path / "single"
    single.mkdir()
    p = pipeline(model_bundle)
    feed(p, "p-9", *(normal(j) for j in range(5)))
    state.save(single / "devices.json", p.fleet.snapshot())
    body = (single / "devices.json").read_bytes()
    state.repartition(single, 1, "device")  # state from before layouts were recorded
    assert (single / "devices.json").read_bytes() == body
    assert orjson.loads((single / "layout.json").read_bytes()) == {
        "workers": 1, "dispatch": "single"}


@pytest.mark.parametrize("before", ["single", "device"])
def test_coming_to_shared_dispatch_every_worker_starts_from_every_device(
    model_bundle: ModelBundle, tmp_path: Path, before: str
) -> None:
    """Under a shared subscription any worker may get any device's next reading: each
    needs the device's window, baseline and alert state, and its raised alert resolves
    on whichever worker sees the device back to normal."""
    directory = tmp_path / "state"
    directory.mkdir()
    two_workers_files(model_bundle, directory)
    state.repartition(directory, 1 if before == "single" else 2, "device")
    written = {p.name for p in directory.glob("devices*.json")}
    state.repartition(directory, 2, "shared")
    names = ["devices-0.json", "devices-1.json"]
    assert sorted(p.name for p in directory.glob("devices*.json")) == names
    assert {p.name.removesuffix(".retired") for p in directory.glob("*.retired")} \
        >= written - set(names)
    assert orjson.loads((directory / "layout.json").read_bytes()) == {
        "workers": 2, "dispatch": "shared"}
    everyone = {f"d-{i}" for i in range(6)} | {"p-1"}
    for name in names:
        p = restored(model_bundle, directory / name)
        assert set(p.fleet.devices.devices) == everyone
        assert set(p.fleet.alert_states.devices) == everyone
        (resolved,) = feed(p, "p-1", normal(10), normal(11))
        assert resolved["state"] == "resolved"
    # the same layout again: each worker's own view is left alone
    before_again = {p.name: p.read_bytes() for p in directory.glob("devices*.json")}
    state.repartition(directory, 2, "shared")
    assert {p.name: p.read_bytes() for p in directory.glob("devices*.json")} == before_again


def test_a_file_for_another_schema_gives_its_alert_states_but_not_its_baselines(
    model_bundle: ModelBundle, tmp_path: Path
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    two_workers_files(model_bundle, directory)
    older = orjson.loads((directory / "devices-1.json").read_bytes())
    older["schema"]["window"] = 99  # saved under another model
    (directory / "devices-1.json").write_bytes(orjson.dumps(older))
    os.utime(directory / "devices-1.json", (1_000_000, 1_000_000))
    (directory / "devices-5.json").write_bytes(b"{not json")
    notes: list[str] = []
    sources = [("devices-0.json", state.load(directory / "devices-0.json")),
               ("devices-1.json", older)]
    parts = split([(n, s) for n, s in sources if s is not None], 2, notes.append)
    assert len(notes) == 1 and "devices-1.json" in notes[0]
    held = set(parts[0]["devices"]["devices"]) | set(parts[1]["devices"]["devices"])
    alerted = set(parts[0]["alerts"]["devices"]) | set(parts[1]["alerts"]["devices"])
    assert "d-1" not in held  # only the older file had it, for another schema
    assert "d-1" in alerted  # its alert state still applies
    state.repartition(directory, 2, "device")
    assert (directory / "devices-5.json.unreadable").exists()
    assert not (directory / "devices-5.json").exists()
