"""``anomalyd score``: offline backtesting through the same pipeline as the live daemon.

Each row of a CSV (or each line of a JSON-lines file) becomes the payload the device would
have published, and goes through the same decoder and pipeline, so a backtest gives the
verdicts the daemon would have published for the same stream: each device starts with no
saved state, warms up over its first ``[baseline] warmup_readings`` rows and keeps its own
feature window, exactly as in the daemon.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from daemon.config import Settings
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder

CHUNK = 512
#: At most this often ``score_file`` reports its running counts.
PROGRESS_SECONDS = 2.0


def _rows(path: Path) -> Iterator[tuple[str | None, bytes]]:
    """(device id or None, payload bytes) for each record of the input file."""
    with path.open("r", encoding="utf-8", newline="") as fh:
        head = fh.readline()
        fh.seek(0)
        if head.lstrip().startswith("{"):
            for line in fh:
                if line.strip():
                    raw = line.strip().encode()
                    try:
                        obj = orjson.loads(raw)
                        device = obj.get("device_id") if isinstance(obj, dict) else None
                    except orjson.JSONDecodeError:
                        device = None
                    yield (device if isinstance(device, str) else None), raw
            return
        delimiter = ";" if head.count(";") > head.count(",") else ","
        for rec in csv.DictReader(fh, delimiter=delimiter):
            body: dict[str, Any] = {}
            device = rec.pop("device_id", None)
            for k, v in rec.items():
                if k is None or v is None:
                    continue
                body[k] = _cell(v)
            yield device, orjson.dumps(body)


def _cell(text: str) -> int | float | str:
    """A CSV cell as the JSON value a device would have sent: int, float or string."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def score_file(
    path: Path, out: IO[bytes], settings: Settings, bundle: ModelBundle, *,
    device: str, detector: str | None, progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Score the file's rows in chunks through the daemon's pipeline; ``progress`` hears
    the running counts at most every ``PROGRESS_SECONDS``."""
    decoder = Decoder(
        bundle.features, bundle.detector_names, subscription="offline/+",
        max_payload_bytes=settings.limits.max_payload_bytes,
        max_batch_readings=settings.limits.max_batch_readings,
        device_id_pattern=settings.limits.device_id_pattern,
    )
    pipeline = Pipeline(bundle, decoder, settings.topics, settings.alerts,
                        detector or settings.model.default_detector,
                        settings.limits.max_payload_bytes,
                        warmup=settings.baseline.warmup_readings,
                        threshold_margin=settings.baseline.threshold_margin,
                        readings=settings.readings)
    counts = {"readings": 0, "anomalies": 0, "rejected": 0}
    chunk: list[RawMessage] = []
    last_said = time.monotonic()

    def flush() -> None:
        outputs, stats = pipeline.process(chunk, time.time())
        counts["readings"] += stats.readings
        counts["anomalies"] += stats.anomalies
        counts["rejected"] += stats.rejected
        for outs in outputs:
            for o in outs:
                if o.kind in ("verdict", "dead_letter"):
                    out.write(o.payload + b"\n")
        chunk.clear()
        nonlocal last_said
        if progress is not None and time.monotonic() - last_said >= PROGRESS_SECONDS:
            last_said = time.monotonic()
            progress(f"scored {counts['readings']} readings so far: {counts['anomalies']} "
                     f"anomalies, {counts['rejected']} rejected")

    for dev, payload in _rows(path):
        chunk.append(RawMessage(f"offline/{dev or device}", payload, time.time()))
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    return counts
