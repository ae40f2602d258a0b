"""``anomalyd simulate``: publish realistic pump readings for N devices, with faults.

For demos and load. Each device is a stateful synthetic pump (``daemon.training.synthetic``);
a reading names any fault injected into it as ``injected_fault`` (not a feature: the daemon
ignores it), so a watcher can compare verdicts with the truth.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import orjson

from daemon.config import Settings
from daemon.errors import ModelLoadError
from daemon.models import read_manifest
from daemon.tool_client import connect_tool_client
from daemon.training.synthetic import FEATURES, PumpStream


def _topic(settings: Settings, device: str) -> str:
    sub = settings.mqtt.subscription
    if sub.startswith("$share/"):
        sub = sub.split("/", 2)[2]
    return sub.replace("+", device, 1).replace("/#", "")


def feature_mismatch(settings: Settings) -> str | None:
    """Why the configured model set (``model.dir``) would dead-letter every simulated
    reading, or None: it reads features the pumps do not send. Nothing is said when there
    is no readable model set there (the daemon says why it cannot start)."""
    model_dir = settings.model.dir
    try:
        wanted = [str(name) for name in read_manifest(model_dir)["features"]]
    except ModelLoadError:
        return None
    missing = [name for name in wanted if name not in FEATURES]
    if not missing:
        return None
    return (f"the model set in {model_dir} reads {', '.join(wanted)}; the simulator sends "
            f"{', '.join(FEATURES)}, so the daemon would dead-letter every reading "
            f"(missing_feature: {', '.join(missing)}). Simulate against a model set trained "
            "on the pump features (anomalyd train --out DIR, then MODEL_DIR=DIR), or pass "
            "--send-anyway")


def simulate(
    settings: Settings, *, devices: int, rate: float, duration: float, fault_rate: float,
    batch: int, seed: int | None, qos: int, send_anyway: bool = False,
) -> int:
    if devices < 1 or rate <= 0:
        print("error: --devices must be >= 1 and --rate > 0", file=sys.stderr)
        return 2
    mismatch = None if send_anyway else feature_mismatch(settings)
    if mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return 2
    rng = random.Random(seed)
    streams = [
        PumpStream(f"pump-{i + 1:03d}", seed=rng.randrange(2**31), fault_rate=fault_rate)
        for i in range(devices)
    ]
    cfg = settings.mqtt
    client = connect_tool_client(cfg, f"anomalyd-sim-{rng.randrange(10**6)}", max_inflight=200)
    client.loop_start()
    interval = 1.0 / rate
    seqs = [0] * devices
    sent = faults = 0
    started = last_report = time.monotonic()
    next_tick = started
    print(f"simulating {devices} devices at {rate:g} readings/s each "
          f"-> {cfg.host}:{cfg.port} {_topic(settings, '<device>')}", file=sys.stderr)
    try:
        while duration <= 0 or time.monotonic() - started < duration:
            for i, stream in enumerate(streams):
                entries: list[dict[str, Any]] = []
                for _ in range(max(1, batch)):
                    values, state, fault = stream.next()
                    seqs[i] += 1
                    entry: dict[str, Any] = dict(values)
                    entry.update(seq=seqs[i], timestamp=time.time(), operational_state=state)
                    if fault:
                        entry["injected_fault"] = fault
                        faults += 1
                    entries.append(entry)
                body = {"readings": entries} if batch else entries[0]
                client.publish(_topic(settings, stream.device_id), orjson.dumps(body), qos=qos)
                sent += len(entries)
            next_tick += interval * max(1, batch)
            now = time.monotonic()
            if now - last_report >= 5:
                print(f"  sent {sent} readings ({faults} with an injected fault) "
                      f"in {now - started:.0f}s", file=sys.stderr, flush=True)
                last_report = now
            if next_tick > now:
                time.sleep(next_tick - now)
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    print(f"sent {sent} readings ({faults} with an injected fault)", file=sys.stderr)
    return 0
