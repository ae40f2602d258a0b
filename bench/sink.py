"""The sink process: timestamp every verdict (or echoed reading) as it arrives.

Writes ``--out`` (.npz: seq, t) when it has seen ``--expect`` distinct seqs, when nothing
arrived for ``--idle`` seconds after the first message, or after ``--max-time``.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--filter", action="append", required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--idle", type=float, default=5.0)
    p.add_argument("--max-time", type=float, default=180.0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ready", type=Path, required=True)
    args = p.parse_args()

    seqs: list[int] = []
    times: list[float] = []
    other = [0]
    seen: set[int] = set()
    done = threading.Event()
    last = [time.monotonic()]

    def on_message(c: Any, u: Any, msg: Any) -> None:
        t = time.monotonic()
        last[0] = t
        found = seqs_in(orjson.loads(msg.payload))
        if not found:
            other[0] += 1  # dead letters, status
        for s in found:
            seqs.append(s)
            times.append(t)
            seen.add(s)
        if len(seen) >= args.expect:
            done.set()

    client = connect(args.port, f"bench-sink-{time.monotonic_ns()}", subscribe=args.filter)
    client.on_message = on_message
    args.ready.write_text("ok")
    start = time.monotonic()
    while not done.wait(0.1):
        now = time.monotonic()
        if now - start > args.max_time or (seqs and now - last[0] > args.idle):
            break
    client.disconnect()
    client.loop_stop()
    np.savez(args.out, seq=np.array(seqs, dtype=np.int64), t=np.array(times))
    Path(str(args.out) + ".json").write_text(json.dumps({"other_messages": other[0]}))


if __name__ == "__main__":
    main()
