"""WORKERS=N: N processes share the subscription; every reading is judged exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.broker import REPO, Broker, free_port, wait_for_port
from tests.conftest_models import NORMAL_READING

pytestmark = pytest.mark.integration


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def test_two_workers_share_the_readings_and_judge_each_once(
    broker: Broker, trained_model_dir: Path, collector_for: Any, publisher_for: Any,
    tmp_path: Path,
) -> None:
    base = free_port()  # worker i listens on base + i
    env = dict(os.environ, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               MODEL_DIR=str(trained_model_dir), HEALTH_PORT=str(base), WORKERS="2",
               MQTT_CLIENT_ID=f"anomalyd-w-{base}",
               STATE_DIR=str(tmp_path / "state"))  # not the repository's state/
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for port in (base, base + 1):
            wait_for_port("127.0.0.1", port, timeout=60)
        deadline = time.monotonic() + 60
        while not (_ready(base) and _ready(base + 1)):
            assert time.monotonic() < deadline, "workers never became ready"
            time.sleep(0.1)
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
        counts = []
        for port in (base, base + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            line = next(x for x in text.splitlines()
                        if x.startswith("anomalyd_messages_received_total "))
            counts.append(float(line.split()[1]))
        assert sum(counts) == n
        assert min(counts) > 0  # both workers took a share
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
