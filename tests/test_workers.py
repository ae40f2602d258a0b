"""WORKERS=N: N processes on one subscription; every reading is judged exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon import partition, state
from tests.broker import REPO, Broker, free_port, free_ports, wait_for_port
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING
from tests.faults import metric, worker_pid

pytestmark = pytest.mark.integration


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return metric(r.read().decode(), name)


@contextmanager
def workers(broker: Broker, model_dir: Path, tmp_path: Path, dispatch: str,
            client_id: str, base: int, extra: str = "",
            ctrl_c: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """WORKERS=2 under the supervisor, with ``dispatch`` (and ``extra`` configuration);
    stopped with SIGTERM, or with ``ctrl_c`` as a terminal's Ctrl-C stops it (SIGINT to
    its whole process group); either must end in exit 0. Their log is ``<tmp>/workers.log``."""
    config = tmp_path / f"{dispatch}.toml"
    config.write_text(f'[service]\ndispatch = "{dispatch}"\n{extra}')
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(model_dir), HEALTH_PORT=str(base), WORKERS="2",
               MQTT_CLIENT_ID=client_id,
               STATE_DIR=str(tmp_path / "state"))  # not the repository's state/
    with (tmp_path / "workers.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(config), "run"],
            cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        for port in (base, base + 1):
            wait_for_port("127.0.0.1", port, timeout=60)
        _until_ready(base, base + 1)
        yield proc
    finally:
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, _log(tmp_path)[-2000:]


def _log(tmp_path: Path) -> str:
    return (tmp_path / "workers.log").read_text(errors="replace")


def _events(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    """The log's lines for ``event`` (the JSON log format, the default). A line cut off
    by a worker's SIGKILL, and the next line glued to it, are not JSON: passed over."""
    found = []
    for line in _log(tmp_path).splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


def _until_ready(*ports: int) -> None:
    deadline = time.monotonic() + 60
    while not all(_ready(port) for port in ports):
        assert time.monotonic() < deadline, "workers never became ready"
        time.sleep(0.1)


def test_shared_dispatch_spreads_the_readings_and_judges_each_once(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    base = free_ports(2)  # worker i listens on base + i
    with workers(broker, trained_model_dir, tmp_path, "shared", f"anomalyd-w-{base}", base):
        col = collector_for(broker, ["anomaly/+/verdict"])
        pub = publisher_for(broker)
        n = 400
        for seq in range(n):
            pub.client.publish(f"sensors/w-{seq % 8}/readings",
                               orjson.dumps({**NORMAL_READING, "seq": seq}), qos=1)
        got = col.wait_for(lambda t, p: t.startswith("anomaly/w-"), count=n, timeout=60)
        seqs = sorted(orjson.loads(p)["seq"] for _, p in got)
        assert seqs == list(range(n))  # every reading once, none twice
        time.sleep(0.5)
        assert len([1 for t, *_ in col.messages if t.startswith("anomaly/w-")]) == n
        counts = [_metric(port, "anomalyd_messages_received_total") for port in (base, base + 1)]
        assert sum(counts) == n
        assert min(counts) > 0  # both workers took a share


def test_device_dispatch_keeps_each_device_on_one_worker_after_a_shared_session(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """The default. The same client ids ran with shared dispatch first: their persistent
    sessions still hold the shared subscription, which must be dropped, or readings
    would arrive twice.

    The daemon subscribes its filter first and only then drops the stale one (the other
    order would lose what arrives in between), so a reading published in that instant
    may reach a worker twice, which at-least-once allows (a repeat, or another worker's
    reading passed over). A first round of readings lets the switch settle; the counts
    are checked on the second."""
    base, cid = free_ports(2), f"anomalyd-d-{free_port()}"
    with workers(broker, trained_model_dir, tmp_path, "shared", cid, base):
        pass
    with workers(broker, trained_model_dir, tmp_path, "device", cid, base):
        col = collector_for(broker, ["anomaly/+/verdict"])
        pub = publisher_for(broker)
        n, devices = 400, 8
        first = [f"sensors/d-{k}/readings" for k in range(devices)]
        for k, topic in enumerate(first):
            pub.client.publish(topic, orjson.dumps({**NORMAL_READING, "seq": k}), qos=1)
        col.wait_for(lambda t, p: t.startswith("anomaly/d-"), count=devices, timeout=60)
        time.sleep(1.0)
        ports = (base, base + 1)
        before = [(_metric(port, "anomalyd_messages_received_total"),
                   _metric(port, "anomalyd_messages_for_other_workers_total")) for port in ports]
        with col._cond:  # the collector's network thread appends under it
            col.messages.clear()
        for seq in range(devices, devices + n):
            pub.client.publish(f"sensors/d-{seq % devices}/readings",
                               orjson.dumps({**NORMAL_READING, "seq": seq}), qos=1)
        got = col.wait_for(lambda t, p: t.startswith("anomaly/d-"), count=n, timeout=60)
        assert sorted(orjson.loads(p)["seq"] for _, p in got) == list(range(devices, devices + n))
        time.sleep(1.0)
        assert len([1 for t, *_ in col.messages if t.startswith("anomaly/d-")]) == n
        n += devices  # every reading of both rounds, for the last seq each device sent
        held: dict[str, int] = {}
        for i, port in enumerate((base, base + 1)):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/devices", timeout=5) as r:
                listed = orjson.loads(r.read())["devices"]
            for d in listed:
                assert d["device_id"] not in held, "a device judged by both workers"
                held[d["device_id"]] = i
                # every one of its readings went to this worker: the highest seq it sent
                k = int(d["device_id"].split("-")[1])
                assert d["last_seq"] == max(range(k, n, devices))
            own = _metric(port, "anomalyd_messages_received_total") - before[i][0]
            others = _metric(port, "anomalyd_messages_for_other_workers_total") - before[i][1]
            second = n - devices  # the second round's readings
            assert own == sum(second // devices for dev, w in held.items() if w == i)
            assert own + others == second  # each worker heard every reading, once
        assert set(held) == {f"d-{k}" for k in range(devices)}
        assert set(held.values()) == {0, 1}
    # the sessions the workers keep, recorded for the next change of layout
    recorded = orjson.loads((tmp_path / "state" / "sessions.json").read_bytes())
    assert recorded["sessions"] == {f"{cid}-{i}": "sensors/+/readings" for i in range(2)}


def test_devices_gone_quiet_are_announced_once_each_with_two_workers(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """Only the owner judges a device, so only the owner announces it: one "reporting"
    and one "quiet" per device, not one per worker."""
    base = free_ports(2)
    devices = [f"q-{base}-{k}" for k in range(6)]
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-q-{base}", base,
                 "[alerts]\nquiet_after_s = 1.0\n"):
        col = collector_for(broker, ["anomaly/+/presence"])
        pub = publisher_for(broker)
        for seq, dev in enumerate(devices):
            pub.client.publish(f"sensors/{dev}/readings",
                               orjson.dumps({**NORMAL_READING, "seq": seq}), qos=1)
        col.wait_for(lambda t, p: t.split("/")[1] in devices, count=2 * len(devices),
                     timeout=30)
        time.sleep(2.5)  # long enough for a second announcement, if there were one
        ours = [(t, orjson.loads(p)) for t, p, *_ in col.messages if t.split("/")[1] in devices]
        for dev in devices:
            states = [m["state"] for t, m in ours if t == f"anomaly/{dev}/presence"]
            assert states == ["reporting", "quiet"], (dev, states)


def test_a_worker_killed_is_started_again_and_judges_its_devices(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """As the kernel's OOM killer would: SIGKILL one worker. The supervisor starts it
    again, and its devices' readings, held by its persistent session meanwhile, are
    judged."""
    base = free_ports(2)
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-k-{base}",
                 base) as supervisor:
        col = collector_for(broker, ["anomaly/+/verdict"])
        pub = publisher_for(broker)
        killed = worker_pid(supervisor.pid, 1)
        os.kill(killed, signal.SIGKILL)
        devices = [f"k-{base}-{k}" for k in range(8)]
        for seq, dev in enumerate(devices):  # some are worker 1's: it is down
            pub.client.publish(f"sensors/{dev}/readings",
                               orjson.dumps({**NORMAL_READING, "seq": seq}), qos=1)
        got = col.wait_for(lambda t, p: t.split("/")[1] in devices, count=len(devices),
                           timeout=60)
        assert sorted(orjson.loads(p)["seq"] for _, p in got) == list(range(len(devices)))
        _until_ready(base, base + 1)
        assert worker_pid(supervisor.pid, 1) != killed
    exits = _events(tmp_path, "worker_exited")
    assert [(e["worker"], e["exit_code"]) for e in exits] == [(1, 128 + signal.SIGKILL)]
    assert [e["worker"] for e in _events(tmp_path, "worker_restarted")] == [1]


def test_ctrl_c_stops_each_worker_gracefully_once(
    broker: Broker, trained_model_dir: Path, tmp_path: Path,
) -> None:
    """A terminal sends SIGINT to the whole process group; the workers must hear it once,
    from the supervisor (a second signal would force their stop)."""
    base = free_ports(2)
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-c-{base}", base,
                 ctrl_c=True):
        pass
    signals = _events(tmp_path, "signal")
    assert sorted((e["signal"], e["action"]) for e in signals) == [
        ("SIGINT", "graceful stop")] * 2  # one per worker, none forced
    assert sorted(e["worker"] for e in signals) == [0, 1]  # each line says whose it is


# -- device commands from a shell that does not say WORKERS=2 ---------------------------


def _owned_by(worker: int, prefix: str) -> str:
    """A device id that worker ``worker`` of 2 owns under device dispatch."""
    return next(dev for dev in (f"{prefix}-{k}" for k in range(100))
                if partition.owner(dev, 2) == worker)


def _cli(
    tmp_path: Path, base: int, *args: str, workers: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``anomalyd --config <the workers' config> ARGS`` as an operator's shell runs it: the
    same configuration file and state directory, but no WORKERS unless given (without it
    the configuration says one process)."""
    env = {k: v for k, v in os.environ.items() if k != "WORKERS"}
    env.update(HEALTH_PORT=str(base), STATE_DIR=str(tmp_path / "state"))
    if workers is not None:
        env["WORKERS"] = workers
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(tmp_path / "device.toml"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _held(port: int, dev: str) -> dict[str, Any] | None:
    """What the worker on ``port`` holds of ``dev`` (None: it does not know it)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/devices/{dev}", timeout=10) as r:
            return dict(orjson.loads(r.read()))
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        return None


def test_a_silence_from_a_shell_without_workers_reaches_the_owner_only(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """The tester's page during a silence: with WORKERS=2 in the service's environment
    only, ``anomalyd silence`` from a shell asked worker 0, which does not own the device;
    its owner then raised an alert. The command must find the running layout
    (layout.json), silence the owner, and leave nothing on the other worker."""
    base = free_ports(2)
    dev = _owned_by(1, f"pump-D-{base}")
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-s-{base}", base):
        res = _cli(tmp_path, base, "silence", dev, "--for", "1h")
        assert res.returncode == 0, res.stderr
        owner = _held(base + 1, dev)
        assert owner is not None and owner["alert"]["silenced_until"] is not None
        assert _held(base, dev) is None  # no stray silence on worker 0
        assert "runs 2 workers with device dispatch (layout.json)" in res.stderr
        assert "WORKERS is not set here" in res.stderr
        assert f"worker 1, which owns it, has not seen device '{dev}' yet" in res.stderr
        assert f"{dev} on worker 1: alerts silenced until " in res.stdout
        # with WORKERS=2 here too: a device no worker has seen yet, silenced on its owner
        # only (not on every worker)
        other = _owned_by(1, f"pump-E-{base}")
        res = _cli(tmp_path, base, "silence", other, "--for", "1h", workers="2")
        assert res.returncode == 0, res.stderr
        assert _held(base, other) is None
        held = _held(base + 1, other)
        assert held is not None and held["alert"]["silenced_until"] is not None
        assert "layout.json" not in res.stderr  # nothing to say: the layouts agree

        col = collector_for(broker, [f"anomaly/{dev}/#"])
        pub = publisher_for(broker)
        pub.send(f"sensors/{dev}/readings", {**NORMAL_READING, "seq": 0})
        for seq in range(1, 4):  # the default rule raises on 3 anomalous of the last 5
            pub.send(f"sensors/{dev}/readings", {**ANOMALOUS_READING, "seq": seq})
        verdicts = col.json_on(f"anomaly/{dev}/verdict", count=4, timeout=30)
        assert [v["is_anomaly"] for v in verdicts] == [False, True, True, True]
        assert all("silenced_until" in v for v in verdicts)
        # the verdicts are out, so the batch that judged them has set the alert state
        owner = _held(base + 1, dev)
        assert owner is not None and owner["alert"]["active"] is False
        assert not [t for t, *_ in col.messages if t == f"anomaly/{dev}/alert"]

        res = _cli(tmp_path, base, "devices", dev)
        assert res.returncode == 0, res.stderr
        shown = orjson.loads(res.stdout)
        assert shown["worker"] == 1 and shown["alert"]["silenced_until"] is not None


def test_a_stray_entry_from_an_older_mistake_is_not_listed_and_a_silence_drops_it(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """A silence sent to worker 0 for worker 1's device is refused now (409 naming the
    owner: set there it would silence nothing). One an older version took (what the
    command line did before it read layout.json) is in worker 0's saved state: while
    worker 1 raises the device's alert, ``devices`` shows the owner's entry only, once,
    and names the stray; ``ack`` reaches the owner; the next ``silence`` of the device
    drops the stray."""
    base = free_ports(2)
    dev = _owned_by(1, f"pump-S-{base}")
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-t-{base}", base):
        req = urllib.request.Request(f"http://127.0.0.1:{base}/devices/{dev}/silence/3600",
                                     method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert refused.value.code == 409
        assert orjson.loads(refused.value.read())["owner"] == 1
    # the stray as an older version left it: in worker 0's saved alert states
    saved = state.state_file(tmp_path / "state", 0)
    snapshot = state.load(saved) or {}
    alerts = snapshot.setdefault("alerts", {})
    alerts.setdefault("silences", {})[dev] = time.time() + 3600
    state.save(saved, snapshot)
    with workers(broker, trained_model_dir, tmp_path, "device", f"anomalyd-t-{base}", base):
        assert _held(base, dev) is not None  # worker 0 holds the stray again
        col = collector_for(broker, [f"anomaly/{dev}/alert"])
        pub = publisher_for(broker)
        for seq in range(3):
            pub.send(f"sensors/{dev}/readings", {**ANOMALOUS_READING, "seq": seq})
        (raised,) = col.json_on(f"anomaly/{dev}/alert", count=1, timeout=30)
        assert raised["state"] == "raised"

        res = _cli(tmp_path, base, "devices")
        assert res.returncode == 0, res.stderr
        rows = [ln for ln in res.stdout.splitlines() if ln.startswith(dev)]
        assert len(rows) == 1 and rows[0].startswith(f"{dev} (worker 1)"), res.stdout
        assert f"{raised['severity']} since" in rows[0]
        assert "worker 0 also holds a silence until" in res.stderr
        res = _cli(tmp_path, base, "devices", "--json")
        listed = [d for d in orjson.loads(res.stdout) if d["device_id"] == dev]
        assert [(d["worker"], d["alert"]["active"]) for d in listed] == [(1, True)]

        res = _cli(tmp_path, base, "ack", dev, "--by", "tester")
        assert res.returncode == 0, res.stderr
        assert f"{dev} on worker 1: {raised['severity']} alert acknowledged by tester" in res.stdout

        res = _cli(tmp_path, base, "silence", dev, "--for", "30m")
        assert res.returncode == 0, res.stderr
        assert f"dropped the stray entry worker 0 held for '{dev}'" in res.stderr
        assert _held(base, dev) is None
        owner = _held(base + 1, dev)
        assert owner is not None and owner["alert"]["silenced_until"] is not None


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"  # an unreaped zombie has ended


def test_workers_whose_supervisor_was_killed_stop_and_let_the_next_start_in(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    """The OOM killer takes the supervisor alone (SIGKILL): its workers ran on for ever,
    keeping their client ids, ports and the state directory's lock, inherited from it,
    so every next start was refused as "in use by another anomalyd" naming the dead
    pid. Each worker now sees its supervisor gone (within a second) and stops
    gracefully; the next start comes in and judges what was published meanwhile."""
    base, cid = free_ports(2), f"anomalyd-o-{free_port()}"
    config = tmp_path / "device.toml"
    config.write_text('[service]\ndispatch = "device"\n')
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(trained_model_dir), HEALTH_PORT=str(base), WORKERS="2",
               MQTT_CLIENT_ID=cid, STATE_DIR=str(tmp_path / "state"))
    with (tmp_path / "workers.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config),
                                 "run"], cwd=REPO, env=env, stdout=log, stderr=log,
                                start_new_session=True)
    pids: list[int] = []
    try:
        _until_ready(base, base + 1)
        pids = [worker_pid(proc.pid, i) for i in range(2)]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers still running: " + _log(tmp_path)[-2000:]
            time.sleep(0.1)
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert sorted(e["worker"] for e in _events(tmp_path, "supervisor_gone")) == [0, 1]
    assert len(_events(tmp_path, "stopped")) == 2  # each gracefully
    pub = publisher_for(broker)
    devices = [f"o-{base}-{k}" for k in range(6)]
    for seq, dev in enumerate(devices):  # no one reads them now: the sessions keep them
        pub.client.publish(f"sensors/{dev}/readings",
                           orjson.dumps({**NORMAL_READING, "seq": seq}), qos=1).wait_for_publish(5)
    col = collector_for(broker, ["anomaly/+/verdict"])
    with workers(broker, trained_model_dir, tmp_path, "device", cid, base):
        got = col.wait_for(lambda t, p: t.split("/")[1] in devices, count=len(devices),
                           timeout=60)
        assert sorted(orjson.loads(p)["seq"] for _, p in got) == list(range(len(devices)))


def test_a_workers_port_in_use_refuses_the_start_before_anything_changes(
    broker: Broker, trained_model_dir: Path, tmp_path: Path
) -> None:
    """Worker 1's port taken by something else: the supervisor re-cut the state files and
    handed the broker sessions over to two workers, started them, and only then worker 1
    failed on its port and every worker stopped (exit 2): the next start, with the port
    mended or WORKERS changed back, handed everything over again. Now nothing changes."""
    import socket

    base = free_ports(2)
    state_dir = tmp_path / "state"
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(trained_model_dir), HEALTH_PORT=str(base), WORKERS="2",
               MQTT_CLIENT_ID=f"port-taken-{base}", STATE_DIR=str(state_dir))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        res = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"cannot serve HTTP on 127.0.0.1:{base + 1}: Address already in use" in res.stderr
    assert "workers_started" not in res.stderr
    assert [p.name for p in state_dir.iterdir()] == []  # no layout, no sessions handed over
