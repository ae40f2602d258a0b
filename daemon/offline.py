"""``anomalyd score``: offline backtesting through the same pipeline as the live daemon.

Each row of a CSV (or each line of a JSON-lines file, or of a ``mosquitto_sub -v``
capture: ``<topic> <payload>``, whose topic names the device) becomes the payload the
device would have published, and goes through the same decoder and pipeline, so a backtest gives the
verdicts the daemon would have published for the same stream: each device starts with no
saved state, warms up over its first ``[baseline] warmup_readings`` rows and keeps its own
feature window, exactly as in the daemon.

A JSON line that is one of the daemon's dead-letter records (``daemon.payloads``: a
subscriber's copy of ``anomaly/dead-letter``) stands for the payload it carries, so what
the daemon refused (late readings under ``late_policy = "drop"``, a model name not loaded
then, a schema changed since) can be judged once the cause is dealt with. Of a batch
message only the refused entries are judged again: the others had their verdicts. A
``result_too_large`` record (a result the broker could not take) carries no reading and
is skipped.

A CSV is read by training's reader and its columns told apart as training tells them
(``daemon.training.datasets``): its time column gives each reading its ``timestamp``, read
as the decoder reads a payload's (epoch milliseconds are given as seconds); its device
column (``device_id``, ``device``, ``asset``, ``asset_id``) each reading's device; the
label columns (``anomaly``, ``label``, ...) are left out. A column the model set has as a
feature is a feature whatever its name.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import time
from collections.abc import Callable, Collection, Iterator
from itertools import chain
from pathlib import Path
from typing import IO, Any

import orjson

from daemon.config import Settings
from daemon.errors import TrainingError
from daemon.models import ModelBundle
from daemon.oversize import RESULT_TOO_LARGE
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder, UnreadTimeFields, parse_timestamp
from daemon.topics import TopicMatcher
from daemon.training.datasets import (
    LABEL_COLUMNS,
    LOOK_ROWS,
    device_column,
    epoch_scale,
    is_time_column,
    number,
    open_table,
)

CHUNK = 512
#: The device of records that name none (``score --device``'s default).
DEFAULT_DEVICE = "offline"
#: At most this often ``score_file`` reports its running counts.
PROGRESS_SECONDS = 2.0


#: The keys that make a JSON line a dead-letter record (``Payloads.dead_letter``).
_DEAD_LETTER_KEYS = frozenset(("reason", "topic", "rejections", "payload", "payload_encoding"))


class Counts(dict[str, int]):
    """``score_file``'s counts (readings, anomalies, rejected; ``filling``: anomalies on
    a partial window, which feed no alert; the alert messages by state: raised, escalated,
    resolved), and why the first rejected message was refused ("reason: detail"), None
    when none was."""

    first_rejection: str | None = None


def detector_problem(bundle: ModelBundle, detector: str | None, settings: Settings) -> str | None:
    """What is wrong with the detector a backtest would judge with (``--model``, else the
    configuration's ``model.default_detector``, else the model set's own), or None."""
    chosen = detector or settings.model.default_detector or bundle.default_detector
    if chosen in bundle.detector_names:
        return None
    where = "--model" if detector else "model.default_detector"
    return (f"{where}: no detector {chosen!r} in the model set "
            f"{bundle.version}; it has {', '.join(bundle.detector_names)}")


def _rows(path: Path, features: Collection[str], note: Callable[[str], None] | None = None,
          device: str | None = None, topics: TopicMatcher | None = None,
          unnamed: str | None = None) -> Iterator[tuple[str | None, bytes]]:
    """(device id or None, payload bytes) for each record of the input file; ``features``
    are the model set's, never taken for a CSV's time or label column. ``note`` hears
    what was made of the file's columns where a person should know, and, if ``unnamed``
    (the device of lines that name none) is given, that JSON lines name no device.
    ``topics`` reads the device from a ``mosquitto_sub -v`` line's topic."""
    kind = _input_kind(path)
    if kind != "csv":
        yield from _json_lines(path, topics if kind == "topic_json" else None, note, unnamed)
        return
    with open_table(path) as table:
        header, rows = table.header, table.rows
        first = list(itertools.islice(rows, LOOK_ROWS))
        if not first:
            return
        body = [row for _, row in first]
        device_col = device_column(header, features, device)
        time_col, dropped = _special_columns(header, body, features, device_col)
        scale = None
        if time_col is not None:
            scale = epoch_scale([row[time_col].strip() for row in body if len(row) > time_col])
            cell = body[0][time_col].strip() if len(body[0]) > time_col else ""
            if scale is None and isinstance(parse_timestamp(_cell(cell)), str):
                if note is not None:
                    note(f"column {header[time_col]!r} holds times the daemon cannot read "
                         f"(e.g. {cell!r}; it reads ISO 8601 or epoch seconds): left out, "
                         "each reading is stamped with the time it is scored")
                dropped.add(time_col)
                time_col = None
        comma = table.decimal_comma
        for _, row in chain(first, rows):
            payload: dict[str, Any] = {}
            named: str | None = None  # the row's device
            for i, (name, cell) in enumerate(zip(header, row, strict=False)):
                if i == device_col:
                    named = cell.strip()
                elif i == time_col:
                    value = _cell(cell, comma)
                    if scale == 1000.0 and isinstance(value, (int, float)):
                        value = value / 1000.0  # epoch milliseconds: the decoder reads seconds
                    payload["timestamp"] = value
                elif i not in dropped:
                    payload[name] = _cell(cell, comma)
            yield named, orjson.dumps(payload)


def _json_lines(path: Path, topics: TopicMatcher | None, note: Callable[[str], None] | None,
                unnamed: str | None) -> Iterator[tuple[str | None, bytes]]:
    """The records of a JSON-lines file: one payload per line, or with ``topics`` a
    ``mosquitto_sub -v`` capture (``<topic> <payload>``; lines of other topics, such as
    the daemon's results, are skipped, and said to be)."""
    say = note or (lambda _: None)
    skipped: list[str] = []
    with path.open("rb") as fh:
        for line in fh:
            raw = line.strip()
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a byte-order mark
            if not raw:
                continue
            topic_device = None
            if topics is not None:
                topic, raw = _split_topic(raw)
                # a topic of the subscription with an id the pattern refuses is
                # dead-lettered (bad_device_id), as the daemon does
                topic_device = topics.id_level(topic)
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None  # refused by the decoder, with the reason
            if isinstance(obj, dict) and obj.get("reason") == RESULT_TOO_LARGE:
                continue  # about a result the broker could not take: no reading
            device = obj.get("device_id") if isinstance(obj, dict) else None
            if isinstance(obj, dict) and obj.keys() >= _DEAD_LETTER_KEYS:
                raw = _refused_payload(obj)
            elif topics is not None:
                if topic_device is None:
                    skipped.append(topic)
                    continue
                device = topic_device
            if not isinstance(device, str):
                device = None
                if unnamed is not None:
                    say(_unnamed_warning(path, unnamed))
                    unnamed = None  # said once
            yield device, raw
    if skipped:
        say(f"skipped {len(skipped)} lines whose topic is not one of the subscription's "
            f"(mqtt.subscription; e.g. {skipped[0]!r}): not readings")


def _unread_time_warning(
    path: Path, progress: Callable[[str], None] | None
) -> Callable[[str, str], None]:
    """What ``score`` says of readings whose time is under a name that is not read (once
    for each such name): the daemon logs the same of a device (``time_field_not_read``)."""
    named: set[str] = set()

    def say(device: str, field: str) -> None:
        if progress is None or field in named:
            return
        named.add(field)
        progress(f"warning: readings of {path} (device {device!r} first) carry their time "
                 f"as {field!r}, which is not read: they are stamped as they are scored, "
                 "as the daemon stamps such readings on receipt. Name the field "
                 "'timestamp' (ISO 8601, or epoch seconds) to judge them by their time")

    return say


def _unnamed_warning(path: Path, device: str) -> str:
    return (f"warning: the lines of {path} name no device (no device_id field, no topic): "
            f"all are judged as one device, {device!r}, sharing one feature window and "
            "baseline. Keep several devices apart with a device_id field in each line, or "
            "capture with mosquitto_sub -v (each line then starts with its topic)")


def _split_topic(line: bytes) -> tuple[str, bytes]:
    """A ``mosquitto_sub -v`` line's topic and payload (separated by a space; a topic may
    hold spaces, a JSON payload starts with ``{``)."""
    at = line.find(b" {")
    if at < 0:
        at = line.find(b" ")
    if at < 0:
        return line.decode("utf-8", "replace"), b""
    return line[:at].decode("utf-8", "replace"), line[at + 1:].lstrip()


def check_input(path: Path, device: str | None = None) -> None:
    """Raise TrainingError if ``path`` cannot be read as a CSV or JSON-lines file, or has
    no column ``device`` (what a bad file is, before ``score``'s ``--out`` is opened and
    emptied); a bad row further on is found while scoring."""
    if _input_kind(path) == "csv":
        with open_table(path) as table:
            next(table.rows, None)
            device_column(table.header, (), device)
    elif device is not None:
        raise TrainingError(f"{path}: --device-column is for a CSV file; in JSON lines each "
                            "reading's topic or device_id names its device")


def _input_kind(path: Path) -> str:
    """``json``: the file's first text is a JSON object; ``topic_json``: its first line
    is a topic and a JSON object (``mosquitto_sub -v``); else ``csv`` (whose reader says
    what is wrong with a file that is none of them)."""
    try:
        with path.open("rb") as fh:
            start = fh.readline(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
            while not start and fh.peek(1):  # blank lines before the first record
                start = fh.readline(1 << 16).strip()
    except OSError:
        return "csv"  # open_table names the problem
    if start.startswith(b"{"):
        return "json"
    line = start.rstrip()
    at = line.find(b" {")
    return "topic_json" if at > 0 and line.endswith(b"}") else "csv"


def _special_columns(
    header: list[str], body: list[list[str]], features: Collection[str], device_col: int | None
) -> tuple[int | None, set[int]]:
    """A CSV's time column (the one named ``timestamp``, else the first, as training
    decides: ``daemon.training.datasets``), and the other time and label columns, which
    are not part of a reading; a column named as a model feature is neither."""
    times = [i for i, name in enumerate(header) if i != device_col
             and name not in features and is_time_column(name, body, i)]
    time_col = next((i for i in times if header[i] == "timestamp"), times[0] if times else None)
    labels = {i for i, name in enumerate(header)
              if name.lower() in LABEL_COLUMNS and name not in features}
    return time_col, (set(times) | labels) - {time_col}


def _refused_payload(record: dict[str, Any]) -> bytes:
    """What a dead-letter record refused: its payload, and of a batch message only the
    entries named in its rejections (one refused as a whole goes again whole). A payload
    that cannot be read back goes as it is: the backtest refuses it again, with the reason."""
    text = record["payload"]
    if not isinstance(text, str):
        return orjson.dumps(text)
    if record["payload_encoding"] == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return text.encode()
    payload = text.encode()
    rejections = record["rejections"]
    if not isinstance(rejections, list):
        return payload
    indexes = [r.get("index") if isinstance(r, dict) else None for r in rejections]
    entry_indexes = [i for i in indexes if type(i) is int]
    if not indexes or len(entry_indexes) < len(indexes):  # refused as a whole
        return payload
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload
    entries = doc.get("readings") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return payload
    refused = sorted({i for i in entry_indexes if 0 <= i < len(entries)})
    return orjson.dumps({**doc, "readings": [entries[i] for i in refused]})


def _cell(text: str, decimal_comma: bool = False) -> int | float | str:
    """A CSV cell as the JSON value a device would have sent: int, float or string."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return number(text, decimal_comma)
    except ValueError:
        return text


def score_file(
    path: Path, out: IO[bytes], settings: Settings, bundle: ModelBundle, *,
    device: str | None, detector: str | None, progress: Callable[[str], None] | None = None,
    alerts: IO[bytes] | None = None, device_column: str | None = None,
) -> Counts:
    """Score the file's rows in chunks through the daemon's pipeline: verdicts and dead
    letters to ``out``, alert messages to ``alerts`` (each as the daemon would publish
    it); ``progress`` hears the running counts at most every ``PROGRESS_SECONDS``, and a
    warning if JSON lines name no device: they are ``device``'s, ``DEFAULT_DEVICE``'s
    if that is None. A ``mosquitto_sub -v`` line's topic names its device, read with
    the configured ``mqtt.subscription`` as the daemon reads it."""
    decoder = Decoder(
        bundle.features, bundle.detector_names, subscription="offline/+",
        max_payload_bytes=settings.limits.max_payload_bytes,
        max_batch_readings=settings.limits.max_batch_readings,
        device_id_pattern=settings.limits.device_id_pattern,
        unread_time=UnreadTimeFields(_unread_time_warning(path, progress)),
    )
    pipeline = Pipeline(bundle, decoder, settings.topics, settings.alerts,
                        detector or settings.model.default_detector,
                        settings.limits.max_payload_bytes,
                        warmup=settings.baseline.warmup_readings,
                        threshold_margin=settings.baseline.threshold_margin,
                        readings=settings.readings)
    counts = Counts(readings=0, anomalies=0, rejected=0, filling=0, raised=0, escalated=0,
                    resolved=0)
    chunk: list[RawMessage] = []
    last_said = time.monotonic()

    def flush() -> None:
        outputs, stats = pipeline.process(chunk, time.time())
        counts["readings"] += stats.readings
        counts["anomalies"] += stats.anomalies
        counts["filling"] += stats.filling
        counts["rejected"] += stats.rejected
        for outs in outputs:
            for o in outs:
                if o.kind in ("verdict", "dead_letter"):
                    out.write(o.payload + b"\n")
                if o.kind == "alert":
                    state = orjson.loads(o.payload)["state"]
                    if state in counts:
                        counts[state] += 1
                    if alerts is not None:
                        alerts.write(o.payload + b"\n")
                elif o.kind == "dead_letter" and counts.first_rejection is None:
                    record = orjson.loads(o.payload)
                    counts.first_rejection = f"{record['reason']}: {record['detail']}"
        chunk.clear()
        nonlocal last_said
        if progress is not None and time.monotonic() - last_said >= PROGRESS_SECONDS:
            last_said = time.monotonic()
            progress(f"scored {counts['readings']} readings so far: {counts['anomalies']} "
                     f"anomalies, {counts['rejected']} rejected")

    topics = TopicMatcher(settings.mqtt.subscription, settings.limits.device_id_pattern)
    unnamed = DEFAULT_DEVICE if device is None else None
    for dev, payload in _rows(path, bundle.features, progress, device_column, topics, unnamed):
        chunk.append(RawMessage(f"offline/{dev or device or DEFAULT_DEVICE}", payload,
                                time.time()))
        if len(chunk) >= CHUNK:
            flush()
    if chunk:
        flush()
    return counts
