"""Raw MQTT payload bytes -> validated readings, or rejections with a reason.

This is the one place where untrusted bytes enter the daemon. It is pure (no I/O, no clock,
no logging; the receipt time is passed in) and `Decoder.decode` never raises: every problem
becomes a `Rejection` with a stable snake_case `reason` and a short `detail` (both from
``daemon.rejections``). Strict JSON parsing is ``daemon.json_guard``'s, topic matching
``daemon.topics``'s.

Decisions worth knowing:
- One problem is reported per reading: the first found, in this order: features (schema
  order), then timestamp, seq, operational_state, model_name.
- A JSON ``null`` for an optional meta field means "absent"; for a feature it is rejected.
- Epoch timestamps must lie in [2000-01-01, 2200-01-01) UTC. Millisecond epochs fall above
  that range and are rejected (the detail says they look like milliseconds) rather than
  guessed at; a device sending 1970-ish values has no clock set.
- In the nested form the inner object wins over the outer one for features and meta alike.
- Batch entries inherit only ``model_name`` from the batch.
- Duplicate keys are reported only for keys this module reads (features, meta fields,
  ``sensor_data``, ``readings``), in the objects it reads them from.
- The time is read from ``timestamp`` only. A reading without one that carries its time
  under another usual name (``ts``, ``time``, ``Zeit``, ...: ``TIME_FIELDS``) is stamped
  on receipt like any other, and told once per device to an ``UnreadTimeFields`` given to
  the decoder (which logs and counts: the decoder itself does neither).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from daemon import json_guard
from daemon.errors import ConfigError
from daemon.rejections import (
    MAX_ABS_VALUE,
    MAX_STATE_LEN,
    REASONS,
    Rejection,
    dup_detail,
    entry_fails,
    feature_problem,
    missing_hint,
    show,
)
from daemon.topics import TopicMatcher

__all__ = ["MAX_ABS_VALUE", "REASONS", "Decoded", "Decoder", "Reading", "Rejection"]

_MIN_EPOCH = 946_684_800.0  # 2000-01-01T00:00:00Z
_MAX_EPOCH = 7_258_118_400.0  # 2200-01-01T00:00:00Z
_MAX_SEQ = 2**63
_MAX_TIMESTAMP_LEN = 64
_NESTED = "sensor_data"
_BATCH = "readings"
#: Payload fields that are never features.
META_FIELDS = ("timestamp", "seq", "operational_state", "model_name")
#: Payload fields that can never be a feature's name.
RESERVED_FIELDS = frozenset((*META_FIELDS, _NESTED, _BATCH))

_NUMBER_TYPES = frozenset((float, int))
#: Names gateways give a reading's time that are not read as one (``timestamp`` is).
TIME_FIELDS = frozenset(("ts", "time", "Time", "TIME", "datetime", "DateTime", "Datetime",
                         "date_time", "Zeit", "Timestamp", "TimeStamp", "TIMESTAMP", "time_stamp",
                         "@timestamp"))


class UnreadTimeFields:
    """Tells ``say(device, field)`` once per device that its readings carry their time
    under a name that is not read (``ts``, ``time``, ...). The decoder looks at a device's
    first reading without a ``timestamp`` only (a gateway names its fields the same way
    every time) and then remembers the device in ``seen``, for at most ``limit`` devices:
    a set that cannot grow without end. One object outlives model reloads."""

    def __init__(self, say: Callable[[str, str], None], limit: int = 100_000) -> None:
        self.seen: set[str] = set()
        self._say = say
        self._limit = limit

    def look(self, device_id: str, source: Mapping[str, object], names: frozenset[str]) -> None:
        if len(self.seen) >= self._limit:
            return
        self.seen.add(device_id)
        if not source.keys().isdisjoint(names):
            self._say(device_id, min(names.intersection(source)))


@dataclass(slots=True)
class Reading:
    """One validated reading. Treat as immutable: not frozen only because a frozen
    dataclass costs ~5x more to construct (``object.__setattr__`` per field), and a batch
    message makes thousands per second."""

    device_id: str
    values: tuple[float, ...]  # in the schema's feature order
    model_name: str | None  # from the payload (None = default detector)
    seq: int | None  # device sequence number, echoed back
    timestamp: float  # epoch seconds: the payload's, else received_at
    operational_state: str | None
    key: str  # idempotency key
    index: int | None  # position in a batch message, None for single


@dataclass(frozen=True, slots=True)
class Decoded:
    device_id: str | None  # None when the topic itself was bad
    readings: tuple[Reading, ...]
    rejections: tuple[Rejection, ...]
    is_batch: bool
    model_name: str | None  # the message-level model_name (a batch's, or a single reading's)


class Decoder:
    """Validates payloads against one feature schema; set-up work happens here, once."""

    def __init__(
        self,
        features: Sequence[str],
        model_names: Collection[str],
        *,
        subscription: str = "sensors/+/readings",
        max_payload_bytes: int = 65536,
        max_batch_readings: int = 1000,
        device_id_pattern: str = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}",
        unread_time: UnreadTimeFields | None = None,
    ) -> None:
        self._features = tuple(features)
        if not self._features or len(set(self._features)) != len(self._features):
            raise ConfigError("features must be a non-empty list of distinct names")
        reserved = set(self._features) & RESERVED_FIELDS
        if reserved:
            raise ConfigError(f"feature names clash with payload fields: {sorted(reserved)}")
        if max_payload_bytes < 1 or max_batch_readings < 1:
            raise ConfigError("max_payload_bytes and max_batch_readings must be positive")
        self._models = frozenset(model_names)
        self._max_payload = max_payload_bytes
        self._max_batch = max_batch_readings
        self._subscription = subscription
        self.topics = TopicMatcher(subscription, device_id_pattern)
        self._keyset = frozenset((*self._features, *META_FIELDS, _NESTED, _BATCH))
        self.unread_time = unread_time
        self._time_names = TIME_FIELDS.difference(self._features)
        # itemgetter of one name returns the value itself, not a 1-tuple
        get_all = (
            itemgetter(*self._features)
            if len(self._features) > 1
            else _one_feature(self._features[0])
        )
        self._get_features: Callable[[Mapping[str, object]], tuple[Any, ...]] = get_all

    def device_id(self, topic: str) -> str | None:
        """The device id in `topic`, or None if the topic does not fit the subscription."""
        return self.topics.device_id(topic)

    def decode(self, topic: str, payload: bytes, received_at: float) -> Decoded:
        """Turn one MQTT message into readings and rejections. Never raises."""
        device_id = self.device_id(topic)
        if device_id is None:
            candidate = self.topics.id_level(topic)
            detail = (f"topic {show(topic)} does not match {self._subscription!r}"
                      if candidate is None else
                      f"device id {show(candidate)} does not match limits.device_id_pattern "
                      f"{self.topics.id_pattern!r}")
            return Decoded(None, (), (Rejection("bad_device_id", detail),), False, None)
        size = len(payload)
        if size > self._max_payload:
            detail = f"payload is {size} bytes; the limit is {self._max_payload}"
            return _message_fails(device_id, "payload_too_large", detail)
        try:
            doc, dups = json_guard.parse(payload, self._keyset)
        except json_guard.RefusedError as refused:
            return _message_fails(device_id, refused.reason, refused.detail)
        if type(doc) is not dict:
            detail = f"top level is {show(doc)}" + (
                f'; send several readings as {{"{_BATCH}": [...]}}' if type(doc) is list else "")
            return _message_fails(device_id, "not_object", detail)
        if _BATCH in doc:
            return self._decode_batch(device_id, doc, payload, received_at, dups)
        result = self._decode_entry(device_id, doc, None, None, payload, None, received_at, dups)
        if isinstance(result, Reading):
            return Decoded(device_id, (result,), (), False, result.model_name)
        return Decoded(device_id, (), (result,), False, None)

    def _decode_batch(
        self,
        device_id: str,
        doc: dict[str, object],
        payload: bytes,
        received_at: float,
        dups: dict[int, tuple[str, ...]],
    ) -> Decoded:
        duplicated = [k for k in dups.get(id(doc), ()) if k in (_BATCH, "model_name")]
        if duplicated:
            return _message_fails(device_id, "duplicate_key", dup_detail(duplicated[0]), True)
        entries = doc[_BATCH]
        if type(entries) is not list or not entries:
            detail = f"'readings' must be a non-empty array, got {show(entries)}"
            return _message_fails(device_id, "bad_batch", detail, True)
        if len(entries) > self._max_batch:
            detail = f"batch has {len(entries)} readings; the limit is {self._max_batch}"
            return _message_fails(device_id, "batch_too_large", detail, True)
        batch_model = doc.get("model_name")
        if batch_model is not None and not (
            type(batch_model) is str and batch_model in self._models
        ):
            detail = f"batch model_name {show(batch_model)} is not a loaded model"
            return _message_fails(device_id, "unknown_model", detail, True)

        digest = hashlib.sha256(payload).hexdigest()[:16]
        checked = None if dups else self._batch_features(entries)
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        for index, entry in enumerate(entries):
            if type(entry) is not dict:
                detail = f"readings[{index}] is {show(entry)}, not an object"
                rejections.append(Rejection("not_object", detail, index))
                continue
            result = self._decode_entry(
                device_id,
                entry,
                index,
                batch_model,
                payload,
                digest,
                received_at,
                dups,
                None if checked is None else checked[index],
            )
            if isinstance(result, Reading):
                readings.append(result)
            else:
                rejections.append(result)
        return Decoded(device_id, tuple(readings), tuple(rejections), True, batch_model)

    def _batch_features(self, entries: list[object]) -> list[tuple[float, ...]] | None:
        """Every entry's feature values, checked for the whole batch at once, or None.

        The usual batch (flat objects, every feature a number within range) is checked in
        a few C-level passes instead of per value. None for anything else: each entry is
        then checked on its own, which finds and words its first problem.
        """
        try:
            if any(_NESTED in e for e in entries):  # type: ignore[operator]
                return None
            rows = list(map(self._get_features, entries))  # type: ignore[arg-type]
        except (KeyError, TypeError):  # a feature missing, an entry that is not an object
            return None
        kinds = set(map(type, chain.from_iterable(rows)))
        if not kinds <= _NUMBER_TYPES:
            return None
        matrix = np.array(rows, dtype=np.float64)
        if not np.all(np.abs(matrix) <= MAX_ABS_VALUE):
            return None
        if int in kinds:
            return list(map(tuple, matrix.tolist()))
        return rows

    def _decode_entry(
        self,
        device_id: str,
        outer: dict[str, object],
        index: int | None,
        default_model: str | None,
        payload: bytes,
        digest: str | None,
        received_at: float,
        dups: dict[int, tuple[str, ...]],
        values: tuple[float, ...] | None = None,
    ) -> Reading | Rejection:
        """One reading; ``values`` if its features were already checked (a batch)."""
        source = outer
        inner = outer.get(_NESTED)
        if inner is not None or _NESTED in outer:
            if type(inner) is not dict:
                detail = f"'sensor_data' is {show(inner)}, not an object"
                return entry_fails("not_object", detail, index)
            source = outer | inner
        if dups:
            duplicated = dups.get(id(outer), ()) + dups.get(id(inner), ())
            if duplicated:
                return entry_fails("duplicate_key", dup_detail(duplicated[0]), index)

        if values is None:
            # The usual case in C-level steps: every feature present, a number, in range.
            # Anything else takes the loop that finds and words the first problem.
            try:
                found = self._get_features(source)
            except KeyError:
                return self._feature_rejection(source, index)
            kinds = set(map(type, found))
            if (
                not kinds <= _NUMBER_TYPES
                or min(found) < -MAX_ABS_VALUE
                or max(found) > MAX_ABS_VALUE
            ):
                return self._feature_rejection(source, index)
            values = tuple(map(float, found)) if int in kinds else found
        get = source.get
        timestamp = get("timestamp")
        if timestamp is None:
            timestamp = received_at
            unread = self.unread_time
            if unread is not None and device_id not in unread.seen:
                unread.look(device_id, source, self._time_names)
        elif not (type(timestamp) is float and _MIN_EPOCH <= timestamp < _MAX_EPOCH):
            parsed = parse_timestamp(timestamp)
            if isinstance(parsed, str):
                return entry_fails("bad_timestamp", f"timestamp {parsed}", index)
            timestamp = parsed

        seq = get("seq")
        if seq is not None and not (type(seq) is int and 0 <= seq < _MAX_SEQ):
            detail = f"seq must be an integer in [0, 2**63), got {show(seq)}"
            return entry_fails("bad_seq", detail, index)

        state = get("operational_state")
        if state is not None and not (type(state) is str and len(state) <= MAX_STATE_LEN):
            detail = (
                f"operational_state must be a string of at most {MAX_STATE_LEN}"
                f" characters, got {show(state)}"
            )
            return entry_fails("bad_operational_state", detail, index)

        model = get("model_name")
        if model is None:
            model = default_model
        elif not (type(model) is str and model in self._models):
            detail = f"model_name {show(model)} is not a loaded model"
            return entry_fails("unknown_model", detail, index)

        if seq is not None:
            key = f"{device_id}:{seq}"
        elif digest is None:
            key = f"{device_id}:{hashlib.sha256(payload).hexdigest()[:16]}"
        else:
            key = f"{device_id}:{digest}#{index}"
        return Reading(device_id, values, model, seq, timestamp, state, key, index)

    def _feature_rejection(self, source: dict[str, object], index: int | None) -> Rejection:
        """The first feature (schema order) that is missing, not a number or out of range."""
        for name in self._features:
            value = source.get(name)
            if not (
                (type(value) is float or type(value) is int)
                and -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE
            ):
                present = name in source
                reason, problem = feature_problem(value, present)
                hint = "" if present else missing_hint(name, source)
                return entry_fails(reason, f"feature {name!r} {problem}{hint}", index)
        raise AssertionError("_feature_rejection called for valid features")


def _one_feature(name: str) -> Callable[[Mapping[str, object]], tuple[Any, ...]]:
    def get(source: Mapping[str, object]) -> tuple[Any, ...]:
        return (source[name],)

    return get


def _message_fails(device_id: str, reason: str, detail: str, is_batch: bool = False) -> Decoded:
    return Decoded(device_id, (), (Rejection(reason, detail),), is_batch, None)


def parse_timestamp(raw: object) -> float | str:
    """Epoch seconds, or a description of what is wrong (no exceptions on bad input)."""
    if type(raw) is str:
        if len(raw) > _MAX_TIMESTAMP_LEN:
            return f"is a string of {len(raw)} characters, too long for ISO 8601"
        try:
            moment = datetime.fromisoformat(raw)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            seconds = moment.timestamp()
        except (ValueError, OverflowError):
            return f"{show(raw)} is not an ISO 8601 date-time"
    elif type(raw) is int or type(raw) is float:
        seconds = raw
    else:
        return f"must be an ISO 8601 string or epoch seconds, got {show(raw)}"
    if _MIN_EPOCH <= seconds < _MAX_EPOCH:
        return float(seconds)
    if _MIN_EPOCH * 1000 <= seconds < _MAX_EPOCH * 1000:
        return f"{show(raw)} looks like milliseconds; send epoch seconds"
    return f"{show(raw)} is outside 2000-01-01..2200-01-01 UTC"


