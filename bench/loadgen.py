"""A load generator process: publish readings at a fixed rate or as fast as allowed.

Every reading carries a ``seq`` unique across the whole run, so the sink can match
verdicts to sends; each device numbers its own readings one by one, as a real one does,
from its own range above ``--seq-base`` (the daemon counts a device's skipped numbers as
readings that never arrived). The send time (``time.monotonic()``, the same clock in
every process on Linux) of reading i is written to ``--out`` as a float64 array, and its
``seq`` to ``--out`` + ``.seq.npy``. Bounded:
``--count`` readings, ``--max-time`` seconds, at most ``--max-unacked`` QoS 1 publishes
awaiting the broker (paho loses publishes past 65,535 unacknowledged).

``--probe K`` instead sends K single readings one at a time, each after the previous one's
reply arrived on ``--reply``, and writes the round-trip times.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench._client import connect, seqs_in


def payloads(stream: list[list[float]], features: list[str], seq: int, batch: int,
             row: int) -> bytes:
    """One message: ``batch`` consecutive readings of one device's stream from ``row``."""
    entries = []
    for k in range(max(1, batch)):
        values = stream[(row + k) % len(stream)]
        entry: dict[str, Any] = dict(zip(features, values, strict=True))
        entry["seq"] = seq + k
        entry["timestamp"] = time.time()
        entries.append(entry)
    return orjson.dumps({"readings": entries} if batch > 1 else entries[0])


def seq_span(count: int, devices: int, batch: int) -> int:
    """How many seq values a publisher of ``count`` readings over ``devices`` devices in
    messages of ``batch`` may use from its ``--seq-base``."""
    batch = max(1, batch)
    return -(-(count // batch) // devices) * batch * devices


def device_id(prefix: str, d: int) -> str:
    """The id of a load publisher's ``d``-th device."""
    return f"{prefix}-{d:03d}"


def device_stream(spec: dict[str, Any], prefix: str, d: int) -> list[list[float]]:
    streams = spec["streams"]
    return list(streams[(int(prefix[1:] or 0) * 10 + d) % len(streams)])


def publish_load(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    client = connect(args.port, f"bench-gen-{args.seq_base}", max_inflight=1000)
    slots = threading.Semaphore(args.max_unacked)
    acked = [0]
    client.on_publish = lambda *a: (slots.release(), acked.__setitem__(0, acked[0] + 1))
    batch = max(1, args.batch)
    n_msgs = args.count // batch
    sends = np.full(n_msgs * batch, np.nan)
    seqs = np.full(n_msgs * batch, -1, dtype=np.int64)
    # each device's own range of seq values: at most seq_span(count, devices, batch) in all
    per_device = -(-n_msgs // args.devices) * batch
    topics = [f"sensors/{device_id(args.prefix, d)}/readings" for d in range(args.devices)]
    streams = [device_stream(spec, args.prefix, d) for d in range(args.devices)]
    # a device's readings follow its own stream in order, continuing from earlier phases
    row0 = args.seq_base // args.devices
    interval = batch / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    deadline = start + args.max_time
    for i in range(n_msgs):
        if interval:
            due = start + i * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        while not slots.acquire(timeout=0.5):
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            break
        d, m = i % args.devices, i // args.devices
        first = args.seq_base + d * per_device + m * batch
        body = payloads(streams[d], spec["features"], first, batch, row0 + m * batch)
        sends[i * batch : (i + 1) * batch] = time.monotonic()
        seqs[i * batch : (i + 1) * batch] = np.arange(first, first + batch)
        client.publish(topics[i % len(topics)], body, qos=1)
    last = time.monotonic()
    sent = int(np.count_nonzero(~np.isnan(sends)))
    while acked[0] * batch < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    np.save(args.out, sends)
    np.save(str(args.out) + ".seq.npy", seqs)
    Path(str(args.out) + ".json").write_text(json.dumps(
        {"sent": sent, "t_first": start, "t_last": last, "acked_messages": acked[0]}
    ))


def probe(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    got = threading.Event()
    want = [-1]

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if want[0] in seqs_in(orjson.loads(msg.payload)):
            got.set()

    client = connect(args.port, f"bench-probe-{args.seq_base}", subscribe=[args.reply])
    client.on_message = on_message
    rtts = []
    deadline = time.monotonic() + args.max_time
    topic = f"sensors/{device_id(args.prefix, 0)}/readings"
    stream = device_stream(spec, args.prefix, 0)
    for i in range(args.probe):
        if time.monotonic() > deadline:
            break
        got.clear()
        want[0] = args.seq_base + i
        body = payloads(stream, spec["features"], want[0], 1, i)
        t0 = time.monotonic()
        client.publish(topic, body, qos=1)
        if got.wait(5.0):
            rtts.append(time.monotonic() - t0)
        time.sleep(args.gap)  # let the daemon go idle again
    client.disconnect()
    client.loop_stop()
    np.save(args.out, np.array(rtts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rows", type=Path, required=True, help="JSON {features, streams}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prefix", default="g0")
    p.add_argument("--seq-base", type=int, default=0)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="readings/s; 0 = flood")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-unacked", type=int, default=2000)
    p.add_argument("--max-time", type=float, default=120.0)
    p.add_argument("--probe", type=int, default=0)
    p.add_argument("--reply", default="anomaly/+/verdict")
    p.add_argument("--gap", type=float, default=0.01)
    args = p.parse_args()
    spec = json.loads(args.rows.read_text())
    if args.probe:
        probe(args, spec)
    else:
        publish_load(args, spec)


if __name__ == "__main__":
    main()
