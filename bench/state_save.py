"""What saving the per-device state costs at fleet scale, and what verdicts wait for it.

Builds the daemon's pipeline with per-device baselines, warms up ``--devices`` devices
(each fed ``--warmup`` + 5 readings, so every one has a fitted baseline: the largest state
a device keeps), then times, ``--reps`` times each:

* ``snapshot``: ``Fleet.snapshot()``, which runs on the scoring thread (verdicts wait);
* ``write``: ``state.save()`` of that snapshot (serialise, write, fsync, rename);
* ``restore``: ``state.load()`` and ``Fleet.restore()`` of the written file (start-up).

Prints medians, and the file's size. Where ``daemon.state.StateWriter`` exists, it also
saves as the daemon does (the snapshot, then the encoding in slices between readings
scored one at a time, the file written by a thread) and reports the longest wait between
two readings, against the same number scored with no save. Before it, verdicts waited
``snapshot`` + ``write``.

    .venv/bin/python -m bench.state_save --models /tmp/bench-models [--devices 10000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from bench.pipeline import build_pipeline
from daemon import state
from daemon.config import load_settings
from daemon.pipeline import Pipeline, RawMessage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=40,
                   help="warm-up readings per device (the arrays kept do not depend on it)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()

    pipeline = build_pipeline(args.models, args.warmup, args.devices)
    # the daemon's own interpreter switch interval (Service.run), which decides how long
    # the scoring thread may wait for the lock while the writer thread holds it
    settings = load_settings(Path(__file__).resolve().parent.parent / "config" / "anomalyd.toml")
    sys.setswitchinterval(settings.service.gil_switch_interval_ms / 1000.0)
    bundle = pipeline.bundle
    rng = np.random.default_rng(0)
    n = len(bundle.features)
    # readings near the training data's mean, a tenth of its spread apart (the model's
    # first inputs are the raw features' means whatever the window)
    center, spread = bundle.mean[:n], bundle.std[:n] * 0.1
    per_device = args.warmup + 5
    t0 = time.perf_counter()
    for start in range(0, args.devices, 100):
        msgs = []
        for d in range(start, min(start + 100, args.devices)):
            rows = center + spread * rng.normal(0.0, 1.0, (per_device, n))
            body = {"readings": [dict(zip(bundle.features, r.tolist(), strict=True))
                                 for r in rows]}
            msgs.append(RawMessage(f"sensors/dev-{d:05d}/readings", orjson.dumps(body),
                                   time.time()))
        pipeline.process(msgs, time.time())
        if (start // 100) % 10 == 9 or start + 100 >= args.devices:
            print(f"\rwarming up devices: {min(start + 100, args.devices):,}/{args.devices:,}",
              end="", file=sys.stderr, flush=True)
    print(f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    fitted = sum(1 for s in pipeline.devices.devices.values() if s.center is not None)

    snaps, writes, restores, stalls, quiet = [], [], [], [], []
    background = hasattr(state, "StateWriter")
    single = [RawMessage(f"sensors/dev-{d:05d}/readings",
                         orjson.dumps(dict(zip(bundle.features, center.tolist(), strict=True))),
                         time.time()) for d in range(args.devices)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "devices.json"
        for _ in range(args.reps):
            t = time.perf_counter()
            snap = pipeline.fleet.snapshot()
            snaps.append(time.perf_counter() - t)
            t = time.perf_counter()
            state.save(path, snap)
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = state.load(path)
            assert loaded is not None
            pipeline.fleet.restore(loaded)
            restores.append(time.perf_counter() - t)
            del loaded, snap  # ~10^6 lists the collector would otherwise keep walking
            if background:
                stall, scored = _scoring_while_saved(pipeline, single, path)
                stalls.append(stall)
                quiet.append(_scoring_alone(pipeline, single, scored))
        size = path.stat().st_size
    ms = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms"  # noqa: E731
    print(f"{args.devices:,} devices ({fitted:,} with a fitted baseline), state file "
          f"{size / 1e6:.1f} MB; medians of {args.reps}: snapshot {ms(snaps)}, "
          f"write {ms(writes)}, restore {ms(restores)}")
    if background:
        print(f"saved as the daemon does (snapshot, encoding in slices between readings "
              f"scored one at a time, written by a thread): longest wait between two "
              f"readings {ms(stalls)}; the same number of readings without a save: "
              f"{ms(quiet)} (medians of {args.reps})")


def _scoring_while_saved(
    pipeline: Pipeline, single: list[RawMessage], path: Path
) -> tuple[float, int]:
    """Save as the daemon's scoring loop does (take a snapshot, then score and encode a
    slice in turn until the writer thread has written the file) with one reading per
    turn: the longest time between two readings (the snapshot's own time included), and
    how many were scored meanwhile."""
    writer = state.StateWriter(path, lambda exc: sys.exit(f"state write failed: {exc!r}"))
    last = time.perf_counter()
    writer.submit(pipeline.fleet.snapshot())
    longest, n = 0.0, 0
    while not writer.idle:
        pipeline.process([single[n % len(single)]], time.time())
        writer.step()
        now = time.perf_counter()
        longest, last, n = max(longest, now - last), now, n + 1
    writer.close()
    print(f"  while saved: {n:,} readings scored, longest wait {longest * 1000:.0f} ms",
          file=sys.stderr)
    return longest, n


def _scoring_alone(pipeline: Pipeline, single: list[RawMessage], n: int) -> float:
    """The longest wait between two of ``n`` readings scored with no save going on (the
    collector's pauses and the machine's noise: what a save's figure is compared with)."""
    last = time.perf_counter()
    longest = 0.0
    for i in range(n):
        pipeline.process([single[i % len(single)]], time.time())
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    print(f"  no save: {n:,} readings scored, longest wait {longest * 1000:.0f} ms",
          file=sys.stderr)
    return longest


if __name__ == "__main__":
    main()
