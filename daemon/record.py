"""``anomalyd record``: collect the devices' readings from the broker into CSV files to
train on, for plants whose sensor data lives on MQTT rather than in a historian.

Each device's readings go to ``<out>/<device>.csv``: a ``timestamp`` column (ISO 8601, the
reading's own or its arrival time), then one column per feature, in arrival order; that
is what ``anomalyd train --data <out>`` reads (one file per device, each windowed on its
own). Payloads go through the daemon's own decoder, so what is recorded is what the
daemon would judge, and everything else is counted by the reason the daemon would give
it. The features are ``--features`` or, if not given, the numeric fields of the first
reading that has any (said at once, so a wrong guess can be stopped).

Rows are kept in memory for at most ``FLUSH_S`` seconds and then appended to their files
(opened and closed each time: thousands of devices would exhaust the open-file limit).
A file that exists already is appended to if its header is the same, and refused
otherwise, so a recording can be resumed but never mixed with another schema.

With MQTT 5 the recorder's session is kept by the broker for ``SESSION_S`` after its link
drops, so a short outage of the link costs nothing: the readings published meanwhile are
delivered when it comes back (as many as the broker queues for one client). The session
is dropped when the recording ends. A broker restart without persistence, or MQTT 3.1.1,
loses them, and the recorder says so.
"""

from __future__ import annotations

import csv
import queue
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import paho.mqtt.client as paho

from daemon.config import Settings
from daemon.errors import AnomalydError, ConfigError
from daemon.models import ENSEMBLE
from daemon.readings import RESERVED_FIELDS, Decoded, Decoder
from daemon.repeats import SeqWindow
from daemon.tool_client import RESUMED, connect_tool_client, end_session
from daemon.topics import TopicMatcher
from daemon.training.train import ALL_MEMBERS

#: Seconds between writing the buffered rows out (and printing the progress line).
FLUSH_S = 5.0
#: Messages kept while waiting for the first reading that tells the features.
PENDING_MAX = 10_000
#: How long the broker keeps the recorder's session after its link drops (MQTT 5).
SESSION_S = 600
#: Every detector name a payload may ask for: recording ignores the choice.
MODEL_NAMES = (ENSEMBLE, *ALL_MEMBERS)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RecordError(AnomalydError):
    """A recording cannot go on (a file of another schema in the way, a full disk)."""


#: The most features taken from a first reading; --features names more.
MAX_INFERRED = 64
#: A name taken from a payload for the CSV's header: printable, not too long, and not
#: starting as a spreadsheet formula does (= + - @), since the files are opened in them.
_INFERABLE = re.compile(r"[^=+\-@\s][^\x00-\x1f\x7f]{0,99}")


def infer_features(payload: bytes) -> tuple[str, ...] | None:
    """The numeric fields of the first reading in ``payload`` (a flat reading, its
    ``sensor_data``, or the first entry of a batch), in the payload's order, leaving out
    names a reading's own fields use and names unfit for a CSV header (``_INFERABLE``),
    at most ``MAX_INFERRED``; None if it has none or is not a JSON object."""
    try:
        doc: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("readings"), list) and doc["readings"]:
        doc = doc["readings"][0]
    if isinstance(doc, dict) and isinstance(doc.get("sensor_data"), dict):
        doc = doc["sensor_data"]
    if not isinstance(doc, dict):
        return None
    names = tuple(k for k, v in doc.items()
                  if type(v) in (int, float) and _INFERABLE.fullmatch(k)
                  and k not in RESERVED_FIELDS)
    return names[:MAX_INFERRED] or None


def file_name(device_id: str) -> str:
    """A file name for ``device_id``: itself where it is a plain name, else with every other
    character percent-encoded (ids may contain ``:``; a configured pattern may allow more)."""
    if _SAFE_NAME.fullmatch(device_id):
        return f"{device_id}.csv"
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in device_id) + ".csv"


class Recording:
    """Validated readings buffered per device, then appended to ``<out>/<device>.csv``.

    Pure apart from :meth:`flush`, which writes. Touched by one thread.
    """

    def __init__(self, out: Path, features: Sequence[str], devices: Sequence[str] | None,
                 decoder: Decoder, limit: int | None = None) -> None:
        self.out = out
        self.features = tuple(features)
        self.header = ["timestamp", *self.features]
        self.devices = None if devices is None else frozenset(devices)
        self.decoder = decoder
        self.limit = limit  # the most readings recorded (the rest of a batch is left out)
        self._rows: dict[str, list[list[object]]] = {}
        self._checked: set[str] = set()  # devices whose file header was checked
        self.per_device: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._first_detail: dict[str, str] = {}  # per reason, what the first one said
        self.other_devices = 0
        self._recorded = 0
        self._seqs: dict[str, SeqWindow] = {}  # each device's recent seq values

    @property
    def recorded(self) -> int:
        return self._recorded

    def add(self, topic: str, payload: bytes, received_wall: float) -> None:
        device_id = self.decoder.device_id(topic)
        if self.devices is not None and device_id not in self.devices:
            self.other_devices += 1
            return
        decoded: Decoded = self.decoder.decode(topic, payload, received_wall)
        for rejection in decoded.rejections:
            self.rejected[rejection.reason] += 1
            self._first_detail.setdefault(rejection.reason, rejection.detail)
        if decoded.device_id is None or not decoded.readings:
            return
        readings = decoded.readings
        window = self._seqs.setdefault(decoded.device_id, SeqWindow())
        fresh = [r for r in readings if r.seq is None or not window.seen(r.seq)]
        if len(fresh) < len(readings):  # a redelivery or a resend: recorded once
            self.rejected["repeat"] += len(readings) - len(fresh)
            readings = tuple(fresh)
        if self.limit is not None:
            readings = readings[: max(0, self.limit - self._recorded)]
            if not readings:
                return
        rows = self._rows.setdefault(decoded.device_id, [])
        for r in readings:
            stamp = datetime.fromtimestamp(r.timestamp, UTC).isoformat(timespec="milliseconds")
            rows.append([stamp.replace("+00:00", "Z"), *r.values])
        self.per_device[decoded.device_id] += len(readings)
        self._recorded += len(readings)

    def flush(self) -> None:
        """Append every buffered row to its device's file. RecordError if a file of
        another header is in the way or cannot be written."""
        for device_id, rows in self._rows.items():
            if not rows:
                continue
            path = self.out / file_name(device_id)
            new = device_id not in self._checked and self._check_header(path, device_id)
            try:
                with path.open("a", newline="", encoding="utf-8") as fh:
                    writer = csv.writer(fh)
                    if new:
                        writer.writerow(self.header)
                    writer.writerows(rows)
            except OSError as exc:
                raise RecordError(f"cannot write {path}: {exc.strerror or exc}") from exc
            self._checked.add(device_id)
            rows.clear()

    def _check_header(self, path: Path, device_id: str) -> bool:
        """True if the file is new (a header is due); RecordError if it has another one."""
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                first = next(csv.reader(fh), None)
        except FileNotFoundError:
            return True
        except (OSError, UnicodeDecodeError) as exc:
            raise RecordError(f"cannot read {path}: {exc}") from exc
        if first is None:
            return True
        if first != self.header:
            raise RecordError(
                f"{path} (device {device_id!r}) has the columns {first}, not {self.header}: "
                "record into another folder, or pass --features to match it")
        return False

    def progress(self, left_s: float | None) -> str:
        text = f"recorded {self.recorded:,} readings of {len(self.per_device)} devices"
        if self.rejected:
            # what the most common refusal says (a --features name no reading has)
            counts = [f"{n} {reason}" for reason, n in self.rejected.most_common()]
            first = self._first_detail.get(self.rejected.most_common(1)[0][0])
            if first:
                counts[0] += f": {first}"
            text += f"; not recorded: {sum(self.rejected.values()):,} ({', '.join(counts)})"
        if self.other_devices:
            text += f"; {self.other_devices:,} of other devices ignored"
        if left_s is not None:
            text += f"; {_clock(left_s)} left"
        return text


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def record(
    settings: Settings, out: Path, *, duration_s: float | None, max_readings: int | None,
    devices: Sequence[str] | None, features: Sequence[str] | None,
    say: Callable[[str], None],
) -> int:
    """Record until ``duration_s`` has passed, ``max_readings`` are recorded, or SIGINT /
    SIGTERM; returns how many readings were recorded. BrokerError if the broker cannot be
    reached, RecordError if the files cannot be written."""
    out.mkdir(parents=True, exist_ok=True)
    inbox: queue.SimpleQueue[tuple[str, bytes, float]] = queue.SimpleQueue()
    stop = threading.Event()

    retained = [0]  # copies skipped (counted on the network thread)

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:  # the broker's stored copy of an old reading, sent as we subscribed
            retained[0] += 1
            return
        inbox.put((msg.topic, bytes(msg.payload), time.time()))

    def with_retained(text: str) -> str:
        n = retained[0]
        return text + (f"; {n:,} retained {'copy' if n == 1 else 'copies'} of old readings "
                       "skipped" if n else "")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    subscription = settings.mqtt.subscription
    if subscription.startswith("$share/"):  # the recorder hears everything itself
        subscription = subscription.split("/", 2)[2]
    links: queue.SimpleQueue[tuple[bool, str]] = queue.SimpleQueue()  # connection made/lost
    client = connect_tool_client(settings.mqtt, record_client_id(),
                                 subscriptions=[(subscription, 1)],
                                 on_link=lambda up, why: links.put((up, why)),
                                 session_expiry_s=SESSION_S)
    client.on_message = on_message
    client.loop_start()
    # SIGTERM and Ctrl-C end the recording with what arrived written (main thread only:
    # Python delivers signals there)
    handlers = threading.current_thread() is threading.main_thread()
    if handlers:
        previous = signal.signal(signal.SIGTERM, on_signal), signal.signal(signal.SIGINT, on_signal)
    say(f"recording {subscription} on {settings.mqtt.host}:{settings.mqtt.port} into {out}"
        + (f" for {_clock(duration_s)}" if duration_s else " until Ctrl-C")
        + (f", at most {max_readings:,} readings" if max_readings else ""))
    rec: Recording | None = None
    if features is not None:
        rec = _recording(settings, out, features, devices, subscription, max_readings)
        say(f"features: {', '.join(features)}")
    # until the features are known (the newest PENDING_MAX)
    pending: deque[tuple[str, bytes, float]] = deque(maxlen=PENDING_MAX)
    topics = TopicMatcher(subscription, settings.limits.device_id_pattern)
    start = time.monotonic()
    next_flush = start + FLUSH_S
    connections = 0
    try:
        while not stop.is_set():
            now = time.monotonic()
            while not links.empty():
                up, why = links.get()
                connections += up
                if up and connections > 1 and why == RESUMED:
                    say("reconnected to the broker, which kept the recording's session: "
                        "readings published while the link was down follow (as many as "
                        "the broker queues for a client; Mosquitto: max_queued_messages)")
                elif up and connections > 1:
                    say("reconnected to the broker: readings published while the link was "
                        "down were not recorded")
                elif not up:
                    say(f"{why}; reconnecting")
            if duration_s is not None and now - start >= duration_s:
                break
            if rec is not None and max_readings is not None and rec.recorded >= max_readings:
                break
            try:
                item = inbox.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                if rec is None:
                    pending.append(item)
                    wanted = devices is None or topics.device_id(item[0]) in devices
                    guessed = infer_features(item[1]) if wanted else None
                    if guessed is not None:
                        rec = _recording(settings, out, guessed, devices, subscription,
                                         max_readings)
                        say(f"features (the numeric fields of the first reading, from "
                            f"{item[0]}): {', '.join(guessed)}; stop and pass --features "
                            "if these are not the ones to train on")
                        for topic, payload, wall in pending:
                            rec.add(topic, payload, wall)
                        pending.clear()
                else:
                    rec.add(*item)
            if now >= next_flush:
                next_flush = now + FLUSH_S
                if rec is not None:
                    rec.flush()
                    left = None if duration_s is None else duration_s - (now - start)
                    say(with_retained(rec.progress(left)))
                else:
                    say(with_retained(f"waiting for a reading with numeric fields "
                                      f"({len(pending)} messages without any so far)"))
    finally:
        if handlers:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
        client.loop_stop()
        end_session(client, settings.mqtt)
    if rec is None:
        say("nothing recorded: no reading with numeric fields arrived")
        return 0
    while max_readings is None:  # what arrived before the stop (the broker has let it go)
        try:
            rec.add(*inbox.get_nowait())
        except queue.Empty:
            break
    rec.flush()
    say(with_retained(rec.progress(None)))
    for device_id, n in sorted(rec.per_device.items()):
        say(f"  {out / file_name(device_id)}: {n:,} readings")
    if rec.recorded:
        say(f"train on them with: anomalyd train --data {out} --window 10")
    return rec.recorded


def record_client_id() -> str:
    """A client id of its own for each recording (a kept session is found by it)."""
    return f"anomalyd-record-{time.time_ns() % 10**9}"


def _recording(settings: Settings, out: Path, features: Sequence[str],
               devices: Sequence[str] | None, subscription: str,
               limit: int | None) -> Recording:
    lim = settings.limits
    try:
        decoder = Decoder(features, MODEL_NAMES, subscription=subscription,
                          max_payload_bytes=lim.max_payload_bytes,
                          max_batch_readings=lim.max_batch_readings,
                          device_id_pattern=lim.device_id_pattern)
    except ConfigError as exc:
        raise ConfigError(f"cannot record these features: {exc}") from exc
    return Recording(out, features, devices, decoder, limit)

