"""In-process cost of the daemon's core per reading: ``Pipeline.process`` without MQTT.

Decoding, scoring, per-device state, alerts and payload building for the bench's own
readings (``bench.run``'s 40 synthetic pumps), in batch-100 messages handed over ~6,000
readings at a time (the batch size the live daemon reaches in the batch-100 phase), or in
single-reading messages. Prints microseconds per reading (median of repeats) and, with
``--profile``, the top of a cProfile listing: the figure to look at before and after a
change to the per-reading path, without the noise of a broker and load generators.

    .venv/bin/python -m bench.pipeline --models /tmp/bench-models [--single] [--profile]
        [--warmup N]   # with per-device baselines (each device's first run warms up)
        [--instructions]  # instructions per reading under valgrind's callgrind instead

``--instructions`` counts machine instructions rather than seconds (about 4 minutes):
the same tree gives the same count whatever else the machine is doing, so two trees can
be compared on a noisy 2-core machine where the timings of small changes drown in noise.
It runs this module twice under ``valgrind --tool=callgrind`` (numpy's BLAS held to one
thread, whose spinning would otherwise count), with the warm-up batch only and with three
more, and divides the difference by the readings of those three.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.loadgen import payloads
from bench.run import write_rows
from daemon.config import load_settings
from daemon.models import load_bundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder

READINGS = 6000
DEVICES = 40
COUNTED_REPS = 3  # batches counted by --instructions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--single", action="store_true", help="single-reading messages")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--warmup", type=int, default=None,
                   help="per-device baselines with this warm-up (default: the repository "
                        "configuration's, 0 = off)")
    p.add_argument("--late-after", type=float, default=None,
                   help="readings.late_after_s (default: the repository configuration's; "
                        "0 = no lateness check)")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions per reading under valgrind instead of timing")
    p.add_argument("--silent", action="store_true", help=argparse.SUPPRESS)  # --instructions'
    args = p.parse_args()
    if args.instructions:
        instructions(args)
        return

    pipeline = build_pipeline(args.models, args.warmup, late_after_s=args.late_after)
    with tempfile.TemporaryDirectory() as tmp:
        write_rows(Path(tmp) / "rows.json", DEVICES)
        spec = json.loads((Path(tmp) / "rows.json").read_text())
    per_msg = 1 if args.single else 100
    now = time.time()

    def messages(rep: int) -> list[RawMessage]:
        """The bench's readings with ``seq`` values no earlier run used: a reading whose
        seq its device sent before is a repeat, judged without updating any state. Each
        device numbers its own readings one by one, as a real one does (between runs its
        count jumps ahead)."""
        base = rep * READINGS
        return [
            RawMessage(f"sensors/p-{i % DEVICES:03d}/readings",
                       payloads(spec["streams"][i % DEVICES], spec["features"],
                                base + (i // DEVICES) * per_msg, per_msg,
                                (i // DEVICES) * per_msg), now)
            for i in range(READINGS // per_msg)
        ]

    # --instructions compares runs of 0 and COUNTED_REPS batches: both build the same
    # messages, so that the difference is the scoring alone
    n_runs = COUNTED_REPS + 1 if args.silent else args.reps + 1 + args.profile
    runs = [messages(rep) for rep in range(n_runs)]

    def run(batch: list[RawMessage]) -> None:
        # one hand-over per ~6,000 readings, like the live daemon's batches in that phase
        pipeline.process(batch, time.time())

    run(runs[0])  # warm caches and per-device state
    if args.silent:  # counted from outside (--instructions)
        for rep in range(1, args.reps + 1):
            run(runs[rep])
        return
    times = []
    for rep in range(1, args.reps + 1):
        t0 = time.perf_counter()
        run(runs[rep])
        times.append(time.perf_counter() - t0)
    us = float(np.median(times)) / READINGS * 1e6
    kind = "single-reading" if args.single else "batch-100"
    print(f"{kind} messages: {us:.2f} µs per reading in-process "
          f"({1e6 / us:,.0f} readings/s on one core; median of {args.reps})")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, runs[-1])
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def build_pipeline(
    models: Path, warmup: int | None, max_devices: int | None = None,
    late_after_s: float | None = None,
) -> Pipeline:
    """The daemon's core as the repository's configuration builds it, with ``warmup`` and
    ``late_after_s`` (None: the configuration's) and at least ``max_devices`` devices
    allowed."""
    settings = load_settings(Path(__file__).resolve().parent.parent / "config" / "anomalyd.toml")
    if late_after_s is not None:
        readings = settings.readings.model_copy(update={"late_after_s": late_after_s})
        settings = settings.model_copy(update={"readings": readings})
    bundle = load_bundle(models)
    lim = settings.limits
    decoder = Decoder(bundle.features, bundle.detector_names, subscription="sensors/+/readings",
                      max_payload_bytes=lim.max_payload_bytes,
                      max_batch_readings=lim.max_batch_readings,
                      device_id_pattern=lim.device_id_pattern)
    pipeline = Pipeline(bundle, decoder, settings.topics, settings.alerts,
                        settings.model.default_detector, lim.max_payload_bytes,
                        warmup=settings.baseline.warmup_readings if warmup is None else warmup,
                        max_devices=max(max_devices or 0, lim.max_devices),
                        threshold_margin=settings.baseline.threshold_margin,
                        readings=settings.readings)
    return pipeline


def instructions(args: argparse.Namespace) -> None:
    """Instructions per reading: callgrind's totals with and without the counted batches."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    base = [sys.executable, "-m", "bench.pipeline", "--models", str(args.models), "--silent"]
    base += ["--single"] if args.single else []
    base += [] if args.warmup is None else ["--warmup", str(args.warmup)]
    base += [] if args.late_after is None else ["--late-after", str(args.late_after)]
    totals = []
    for reps in (0, COUNTED_REPS):
        print(f"callgrind: warm-up batch + {reps} counted ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *base,
             "--reps", str(reps)], env=env, capture_output=True, text=True, check=False)
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or found is None:
            sys.exit(f"valgrind failed (exit {done.returncode}): {done.stderr[-2000:]}")
        totals.append(int(found.group(1).replace(",", "")))
    per = (totals[1] - totals[0]) / (COUNTED_REPS * READINGS)
    kind = "single-reading" if args.single else "batch-100"
    print(f"{kind} messages: {per:,.0f} instructions per reading in-process "
          f"(callgrind; {COUNTED_REPS} x {READINGS} readings)")


if __name__ == "__main__":
    main()
