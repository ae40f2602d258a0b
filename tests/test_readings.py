"""Unit tests for daemon.readings: payload forms, every reason code, keys and topics."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon import json_guard, rejections, topics
from daemon.errors import ConfigError
from daemon.readings import REASONS, Decoded, Decoder, Reading, Rejection, UnreadTimeFields

FEATURES = ("temperature", "pressure", "Volume Flow RateRMS")
TOPIC = "sensors/pump-7/readings"
NOW = 1_715_000_000.0  # 2024-05-06T12:53:20Z


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(FEATURES, {"lof", "iforest"}, max_payload_bytes=4096, max_batch_readings=5)


def features(base: float = 1.0) -> dict[str, Any]:
    return {"temperature": base, "pressure": base + 1, "Volume Flow RateRMS": base + 2}


def decode(decoder: Decoder, doc: Any, topic: str = TOPIC) -> Decoded:
    return decoder.decode(topic, orjson.dumps(doc), NOW)


def only_reading(result: Decoded) -> Reading:
    assert result.rejections == ()
    assert len(result.readings) == 1
    return result.readings[0]


def only_rejection(result: Decoded) -> Rejection:
    assert result.readings == ()
    assert len(result.rejections) == 1
    assert result.rejections[0].reason in REASONS
    return result.rejections[0]


# --- payload forms -------------------------------------------------------------------------


def test_flat_reading_keeps_schema_order_and_meta(decoder: Decoder) -> None:
    doc = {
        "Volume Flow RateRMS": 3.5,
        "pressure": 2,
        "temperature": 45.3,
        "timestamp": 1_715_000_100.5,
        "seq": 17,
        "operational_state": "normal",
        "model_name": "lof",
    }
    result = decode(decoder, doc)
    reading = only_reading(result)
    assert reading == Reading(
        "pump-7", (45.3, 2.0, 3.5), "lof", 17, 1_715_000_100.5, "normal", "pump-7:17", None
    )
    assert all(type(v) is float for v in reading.values)
    assert (result.device_id, result.is_batch, result.model_name) == ("pump-7", False, "lof")


def test_flat_reading_without_meta_uses_receipt_time_and_default_model(decoder: Decoder) -> None:
    reading = only_reading(decode(decoder, features()))
    assert (reading.timestamp, reading.seq, reading.model_name) == (NOW, None, None)
    assert reading.operational_state is None


def test_null_meta_fields_mean_absent(decoder: Decoder) -> None:
    doc = {
        **features(),
        "timestamp": None,
        "seq": None,
        "operational_state": None,
        "model_name": None,
    }
    reading = only_reading(decode(decoder, doc))
    assert (reading.timestamp, reading.seq, reading.model_name) == (NOW, None, None)


def test_unknown_keys_are_ignored(decoder: Decoder) -> None:
    doc = {**features(), "firmware": "1.2", "extra": {"nested": [1, 2, {"x": None}]}}
    assert only_reading(decode(decoder, doc)).values == (1.0, 2.0, 3.0)


def test_nested_reading_takes_meta_from_either_level(decoder: Decoder) -> None:
    doc = {"sensor_data": {**features(), "seq": 4}, "model_name": "iforest", "timestamp": NOW - 5}
    reading = only_reading(decode(decoder, doc))
    assert reading.values == (1.0, 2.0, 3.0)
    assert (reading.seq, reading.model_name, reading.timestamp) == (4, "iforest", NOW - 5)


def test_nested_reading_inner_level_wins(decoder: Decoder) -> None:
    doc = {**features(100.0), "seq": 1, "sensor_data": {**features(), "seq": 2}}
    reading = only_reading(decode(decoder, doc))
    assert reading.values == (1.0, 2.0, 3.0)
    assert reading.seq == 2


def test_nested_features_may_be_split_between_levels(decoder: Decoder) -> None:
    doc = {"temperature": 9.0, "sensor_data": {"pressure": 8.0, "Volume Flow RateRMS": 7.0}}
    assert only_reading(decode(decoder, doc)).values == (9.0, 8.0, 7.0)


def test_batch_decodes_every_entry_with_its_index(decoder: Decoder) -> None:
    doc = {
        "model_name": "lof",
        "readings": [
            {**features(1.0), "seq": 10},
            {"sensor_data": features(2.0), "model_name": "iforest"},
        ],
    }
    result = decode(decoder, doc)
    assert (result.is_batch, result.model_name, result.rejections) == (True, "lof", ())
    first, second = result.readings
    assert (first.index, first.values, first.model_name, first.seq) == (
        0,
        (1.0, 2.0, 3.0),
        "lof",
        10,
    )
    assert (second.index, second.values, second.model_name) == (1, (2.0, 3.0, 4.0), "iforest")


def test_batch_with_one_bad_entry_keeps_the_others(decoder: Decoder) -> None:
    bad = {**features(), "pressure": "high"}
    doc = {"readings": [features(1.0), bad, features(3.0)]}
    result = decode(decoder, doc)
    assert [r.index for r in result.readings] == [0, 2]
    (rejection,) = result.rejections
    assert (rejection.reason, rejection.index) == ("non_numeric_feature", 1)
    assert "readings[1]" in rejection.detail
    assert "'pressure'" in rejection.detail


def test_batch_entry_that_is_not_an_object_is_rejected_alone(decoder: Decoder) -> None:
    result = decode(decoder, {"readings": [features(), 42]})
    assert len(result.readings) == 1
    assert [(r.reason, r.index) for r in result.rejections] == [("not_object", 1)]


def test_feature_names_are_case_sensitive(decoder: Decoder) -> None:
    doc = {**features(), "Temperature": 1.0}
    del doc["temperature"]
    rejection = only_rejection(decode(decoder, doc))
    assert rejection.reason == "missing_feature"
    assert "'temperature'" in rejection.detail


# --- timestamps and seq ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-05-06T12:00:00Z", 1_714_996_800.0),
        ("2024-05-06T14:00:00+02:00", 1_714_996_800.0),
        ("2024-05-06T12:00:00", 1_714_996_800.0),  # naive means UTC
        ("2024-05-06 12:00:00.250", 1_714_996_800.25),
        (1_714_996_800, 1_714_996_800.0),
        (1_714_996_800.75, 1_714_996_800.75),
    ],
)
def test_timestamp_accepts_iso_8601_and_epoch_seconds(
    decoder: Decoder, raw: object, expected: float
) -> None:
    reading = only_reading(decode(decoder, {**features(), "timestamp": raw}))
    assert reading.timestamp == expected
    assert type(reading.timestamp) is float


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("yesterday", "ISO 8601"),
        ("2024-13-01T00:00:00Z", "ISO 8601"),
        ("2024-05-06T12:00:00Z" + " " * 60, "too long"),
        (-1, "outside"),
        (0, "outside"),
        (1_714_996_800_000, "milliseconds"),
        (7_258_118_400, "outside"),  # 2200-01-01
        ("2300-01-01T00:00:00Z", "outside"),
        ("0001-01-01T00:00:00+05:00", "outside"),
        (True, "got true"),
        ([2024], "got an array"),
    ],
)
def test_bad_timestamp_is_rejected(decoder: Decoder, raw: object, hint: str) -> None:
    rejection = only_rejection(decode(decoder, {**features(), "timestamp": raw}))
    assert rejection.reason == "bad_timestamp"
    assert hint in rejection.detail


@pytest.mark.parametrize("seq", [0, 1, 2**63 - 1])
def test_seq_accepts_non_negative_int64(decoder: Decoder, seq: int) -> None:
    assert only_reading(decode(decoder, {**features(), "seq": seq})).seq == seq


@pytest.mark.parametrize(
    "raw", [b"-1", b"true", b"1.0", b'"7"', b"9223372036854775808", b"18446744073709551616"]
)
def test_bad_seq_is_rejected(decoder: Decoder, raw: bytes) -> None:
    payload = orjson.dumps(features())[:-1] + b',"seq":' + raw + b"}"
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "bad_seq"


# --- reason codes, one test each --------------------------------------------------------


def test_bad_device_id_when_topic_does_not_match(decoder: Decoder) -> None:
    result = decoder.decode("other/pump-7/readings", orjson.dumps(features()), NOW)
    assert result.device_id is None
    assert only_rejection(result).reason == "bad_device_id"
    assert only_rejection(result).detail == (
        "topic 'other/pump-7/readings' does not match 'sensors/+/readings'")


def test_bad_device_id_names_the_id_and_the_setting_it_fails(decoder: Decoder) -> None:
    """A topic that fits the subscription with an id the pattern refuses (a historian's
    asset name with a space) names that id and the setting, not only the topic (which is
    an invented one in ``anomalyd score``'s messages)."""
    result = decoder.decode("sensors/Pump 1/readings", orjson.dumps(features()), NOW)
    assert only_rejection(result).reason == "bad_device_id"
    assert only_rejection(result).detail == (
        "device id 'Pump 1' does not match limits.device_id_pattern "
        "'[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}'")


def test_payload_too_large_is_checked_before_parsing(decoder: Decoder) -> None:
    result = decoder.decode(TOPIC, b"\xff" * 4097, NOW)
    rejection = only_rejection(result)
    assert rejection.reason == "payload_too_large"
    assert "4097" in rejection.detail


def test_not_utf8(decoder: Decoder) -> None:
    payload = b'{"temperature": "\xff\xfe", "pressure": 1}'
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "not_utf8"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b'{"temperature": 1,}',
        b'{"temperature": NaN, "pressure": 1, "Volume Flow RateRMS": 1}',
        b'{"temperature": Infinity, "pressure": 1, "Volume Flow RateRMS": 1}',
        b'{"temperature": -Infinity, "pressure": 1, "Volume Flow RateRMS": 1}',
        b'{"temperature": 1e400, "pressure": 1, "Volume Flow RateRMS": 1}',
        b'{"temperature": 1' + b"0" * 400 + b', "pressure": 1, "Volume Flow RateRMS": 1}',
        b'{"temperature": "\\ud800"}',  # lone surrogate escape
        b'\xef\xbb\xbf{"temperature": 1}',  # UTF-8 byte order mark
    ],
)
def test_not_json(decoder: Decoder, payload: bytes) -> None:
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "not_json"


@pytest.mark.parametrize("depth", [9, 50, 5000])
def test_too_deep(depth: int) -> None:
    decoder = Decoder(FEATURES, set(), max_payload_bytes=1 << 20)
    deep = b'"x"'
    for _ in range(depth - 1):
        deep = b'{"a":' + deep + b"}"
    payload = orjson.dumps(features())[:-1] + b',"extra":' + deep + b"}"
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "too_deep"


def test_nesting_within_the_limit_is_fine(decoder: Decoder) -> None:
    doc = {**features(), "extra": [[[[[[{"x": 1}]]]]]]}  # depth 8 counting the top level
    assert only_reading(decode(decoder, doc)).values == (1.0, 2.0, 3.0)


def test_brackets_inside_strings_do_not_count_as_nesting(decoder: Decoder) -> None:
    doc = {**features(), "operational_state": "[[[[{{{{", "note": "]]]]]]]]]]{{{{{{{{{{{"}
    assert only_reading(decode(decoder, doc)).operational_state == "[[[[{{{{"


@pytest.mark.parametrize("depth", [1, 8, 9, 30])
def test_byte_level_depth_check_agrees_with_the_parsed_one(depth: int) -> None:
    """The pre-parse scan (used when orjson gives up) and the post-parse walk agree."""
    payload = b'["]]]",' * (depth - 1) + b'{"a":"[[[["}' + b"]" * (depth - 1)
    assert json_guard.nesting_exceeds(payload, 8) == (depth > 8)
    assert (json_guard.shape(orjson.loads(payload), 8)[1] > 8) == (depth > 8)


@pytest.mark.parametrize("tail", [b"", b"\\"])
def test_an_unterminated_string_ends_the_depth_check_where_it_starts(tail: bytes) -> None:
    deep = b"[" * 10 + b"]" * 10  # ten levels, then a string that never closes
    assert json_guard.nesting_exceeds(deep + b',"abc\\"' + tail, 8) is True
    assert json_guard.nesting_exceeds(b"[" * 9 + b'"' + b"]" * 9 + tail, 8) is False


def test_a_hostile_unterminated_string_is_refused_without_hanging() -> None:
    """A hang guard, not a speed target: 1 MB of escaped quotes in an unterminated string
    took the depth check's string-stripping pattern time quadratic in the size (21 s for
    64 KB, so well over an hour here, holding the GIL: every thread of the daemon stood
    still). Now each byte is read once (milliseconds). In a subprocess, so that a hang
    fails the test instead of freezing the run."""
    script = (
        "from daemon.readings import Decoder\n"
        "d = Decoder(('temperature',), set(), max_payload_bytes=1 << 21)\n"
        "p = b'[' * 9 + b'\"' + b'\\\\\"' * 500_000\n"
        "(r,) = d.decode('sensors/x/readings', p, 0.0).rejections\n"
        "print(r.reason)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.stdout.strip() == "not_json", done.stderr


@pytest.mark.parametrize("doc", [[features()], "text", 3, None])
def test_not_object_at_top_level(decoder: Decoder, doc: object) -> None:
    assert only_rejection(decode(decoder, doc)).reason == "not_object"


def test_a_top_level_array_is_pointed_to_the_batch_message(decoder: Decoder) -> None:
    """A gateway's habit: several readings as a bare JSON array."""
    rejection = only_rejection(decode(decoder, [features(), features()]))
    assert rejection.detail == (
        'top level is an array of 2 items; send several readings as {"readings": [...]}')


def test_not_object_for_sensor_data(decoder: Decoder) -> None:
    rejection = only_rejection(decode(decoder, {"sensor_data": [1, 2, 3]}))
    assert rejection.reason == "not_object"
    assert "sensor_data" in rejection.detail


def test_duplicate_feature_key(decoder: Decoder) -> None:
    payload = b'{"temperature": 1, "pressure": 2, "Volume Flow RateRMS": 3, "temperature": 99}'
    rejection = only_rejection(decoder.decode(TOPIC, payload, NOW))
    assert rejection.reason == "duplicate_key"
    assert "'temperature'" in rejection.detail


def test_duplicate_meta_key(decoder: Decoder) -> None:
    payload = b'{"temperature":1,"pressure":2,"Volume Flow RateRMS":3,"seq":1,"seq":2}'
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "duplicate_key"


def test_duplicate_key_spelled_with_an_escape(decoder: Decoder) -> None:
    payload = b'{"temperature":1,"pressure":2,"Volume Flow RateRMS":3,"\\u0074emperature":9}'
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "duplicate_key"


def test_duplicate_key_in_a_batch_entry_costs_only_that_entry(decoder: Decoder) -> None:
    good = orjson.dumps(features())
    bad = b'{"sensor_data":{"temperature":1,"pressure":2,"Volume Flow RateRMS":3,"pressure":5}}'
    payload = b'{"readings":[' + good + b"," + bad + b"," + good + b"]}"
    result = decoder.decode(TOPIC, payload, NOW)
    assert [r.index for r in result.readings] == [0, 2]
    assert [(r.reason, r.index) for r in result.rejections] == [("duplicate_key", 1)]


def test_duplicate_of_an_ignored_key_is_not_an_error(decoder: Decoder) -> None:
    payload = b'{"temperature":1,"pressure":2,"Volume Flow RateRMS":3,"note":"a","note":"b"}'
    assert only_reading(decoder.decode(TOPIC, payload, NOW)).values == (1.0, 2.0, 3.0)


def test_valid_reading_skips_the_slow_duplicate_check(
    decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_path_taken(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads must not run for a valid reading")

    monkeypatch.setattr(json, "loads", slow_path_taken)
    doc = {
        "sensor_data": features(),
        "timestamp": "2024-05-06T12:00:00Z",
        "seq": 3,
        "operational_state": "temperature",
        "model_name": "lof",
    }
    assert only_reading(decode(decoder, doc)).seq == 3
    batch = {"readings": [features(), {**features(), "seq": 1}], "model_name": "lof"}
    assert len(decode(decoder, batch).readings) == 2


@pytest.mark.parametrize("entries", [None, {}, "x", []])
def test_bad_batch(decoder: Decoder, entries: object) -> None:
    result = decode(decoder, {"readings": entries})
    assert result.is_batch
    assert only_rejection(result).reason == "bad_batch"


def test_batch_too_large(decoder: Decoder) -> None:
    result = decode(decoder, {"readings": [features()] * 6})
    assert only_rejection(result).reason == "batch_too_large"


def test_missing_feature(decoder: Decoder) -> None:
    doc = features()
    del doc["Volume Flow RateRMS"]
    rejection = only_rejection(decode(decoder, doc))
    assert rejection.reason == "missing_feature"
    assert rejection.detail == "feature 'Volume Flow RateRMS' is missing"


@pytest.mark.parametrize("sent", ["volume flow raterms", "Volume_Flow_RateRMS",
                                  "VOLUME-FLOW-RATERMS"])
def test_a_missing_feature_sent_under_a_near_name_is_pointed_at(
    decoder: Decoder, sent: str
) -> None:
    """A gateway that changed a name's case or spacing: the dead letter says which key it
    saw (names must still match exactly: two near names could be two sensors)."""
    doc = features()
    doc[sent] = doc.pop("Volume Flow RateRMS")
    rejection = only_rejection(decode(decoder, doc))
    assert rejection.reason == "missing_feature"
    assert rejection.detail == (f"feature 'Volume Flow RateRMS' is missing (the payload has "
                                f"{sent!r}: feature names must match exactly)")
    batch = decode(decoder, {"readings": [features(), doc]})
    (entry,) = batch.rejections
    assert entry.index == 1 and entry.detail.startswith("readings[1]: feature 'Volume Flow")
    assert f"the payload has {sent!r}" in entry.detail


@pytest.mark.parametrize("value", ["45.3", True, False, None, [1.0], {"v": 1.0}])
def test_non_numeric_feature(decoder: Decoder, value: object) -> None:
    rejection = only_rejection(decode(decoder, {**features(), "pressure": value}))
    assert rejection.reason == "non_numeric_feature"
    assert "'pressure'" in rejection.detail


def test_non_finite_feature_is_classified() -> None:
    # JSON cannot carry NaN/Infinity to the validator (those payloads are not_json), so the
    # classification is checked directly.
    assert rejections.feature_problem(float("nan"), True)[0] == "non_finite"
    assert rejections.feature_problem(float("-inf"), True)[0] == "non_finite"


@pytest.mark.parametrize("raw", [b"1e16", b"-1.5e15", b"18446744073709551616", b"1e300"])
def test_out_of_range_feature(decoder: Decoder, raw: bytes) -> None:
    payload = b'{"temperature":' + raw + b',"pressure":1,"Volume Flow RateRMS":1}'
    assert only_rejection(decoder.decode(TOPIC, payload, NOW)).reason == "out_of_range"


def test_feature_at_the_range_limit_is_accepted(decoder: Decoder) -> None:
    doc = {**features(), "temperature": -1e15, "pressure": 10**15}
    assert only_reading(decode(decoder, doc)).values[:2] == (-1e15, 1e15)


@pytest.mark.parametrize("state", ["x" * 65, 3, ["normal"]])
def test_bad_operational_state(decoder: Decoder, state: object) -> None:
    result = decode(decoder, {**features(), "operational_state": state})
    assert only_rejection(result).reason == "bad_operational_state"


@pytest.mark.parametrize("model", ["svm", "LOF", 1, ["lof"]])
def test_unknown_model(decoder: Decoder, model: object) -> None:
    assert only_rejection(decode(decoder, {**features(), "model_name": model})).reason == (
        "unknown_model"
    )


def test_unknown_batch_model_rejects_the_message(decoder: Decoder) -> None:
    result = decode(decoder, {"readings": [features()], "model_name": {"x": 1}})
    assert result.is_batch
    assert only_rejection(result).reason == "unknown_model"


def test_every_reason_code_is_exercised_by_this_file() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    assert all(f'"{reason}"' in source for reason in REASONS)


# --- details --------------------------------------------------------------------------------


def test_detail_quotes_little_of_the_input(decoder: Decoder) -> None:
    long_state = "A" * 10_000
    rejection = only_rejection(decode(decoder, {**features(), "operational_state": long_state}))
    assert rejection.detail.count("A") <= 60
    assert len(rejection.detail) < 200
    bad_topic = "sensors/" + "é\n" * 5000 + "/readings"
    rejection = only_rejection(decoder.decode(bad_topic, b"{}", NOW))
    assert len(rejection.detail) < 200


# --- idempotency keys -----------------------------------------------------------------------


def test_key_uses_seq_when_given(decoder: Decoder) -> None:
    first = only_reading(decode(decoder, {**features(1.0), "seq": 17}))
    resent = only_reading(decode(decoder, {**features(2.0), "seq": 17}))
    assert first.key == resent.key == "pump-7:17"


def test_key_without_seq_is_a_stable_payload_hash(decoder: Decoder) -> None:
    payload = orjson.dumps(features())
    key = only_reading(decoder.decode(TOPIC, payload, NOW)).key
    assert key == "pump-7:" + hashlib.sha256(payload).hexdigest()[:16]
    assert only_reading(decoder.decode(TOPIC, payload, NOW + 60)).key == key
    other = only_reading(decode(decoder, features(5.0))).key
    assert other != key


def test_key_depends_on_the_device(decoder: Decoder) -> None:
    payload = orjson.dumps({**features(), "seq": 1})
    a = only_reading(decoder.decode("sensors/a/readings", payload, NOW)).key
    b = only_reading(decoder.decode("sensors/b/readings", payload, NOW)).key
    assert a != b


def test_batch_keys_are_distinct_per_entry(decoder: Decoder) -> None:
    payload = orjson.dumps({"readings": [features(), features(), {**features(), "seq": 9}]})
    keys = [r.key for r in decoder.decode(TOPIC, payload, NOW).readings]
    digest = hashlib.sha256(payload).hexdigest()[:16]
    assert keys == [f"pump-7:{digest}#0", f"pump-7:{digest}#1", "pump-7:9"]


# --- device ids from topics -----------------------------------------------------------------


def test_device_id_from_the_plus_level(decoder: Decoder) -> None:
    assert decoder.device_id("sensors/pump-7/readings") == "pump-7"
    assert decoder.device_id("sensors/line2:cell_3.a/readings") == "line2:cell_3.a"


def test_device_id_with_shared_subscription_prefix() -> None:
    decoder = Decoder(FEATURES, set(), subscription="$share/g/sensors/+/readings")
    assert decoder.device_id("sensors/pump-7/readings") == "pump-7"
    assert decoder.device_id("$share/g/sensors/pump-7/readings") is None


def test_device_id_with_trailing_hash_and_second_plus() -> None:
    decoder = Decoder(FEATURES, set(), subscription="plant/+/+/data/#")
    assert decoder.device_id("plant/p1/line/data") == "p1"
    assert decoder.device_id("plant/p1/line/data/x/y") == "p1"
    assert decoder.device_id("plant/p1/data") is None


@pytest.mark.parametrize(
    "topic",
    [
        "sensors/pump-7/readings/extra",
        "sensors/pump-7",
        "Sensors/pump-7/readings",
        "sensors//readings",
        "sensors/pump 7/readings",
        "sensors/pump\x007/readings",
        "sensors/+/readings",
        "sensors/#",
        "sensors/$pump/readings",
        "sensors/-pump/readings",
        "sensors/" + "p" * 65 + "/readings",
        "",
    ],
)
def test_device_id_rejects_topics_that_do_not_fit(decoder: Decoder, topic: str) -> None:
    assert decoder.device_id(topic) is None
    result = decoder.decode(topic, orjson.dumps(features()), NOW)
    assert result.device_id is None
    assert only_rejection(result).reason == "bad_device_id"


def test_filter_starting_with_plus_does_not_match_dollar_topics() -> None:
    decoder = Decoder(FEATURES, set(), subscription="+/readings", device_id_pattern=r"[$A-Za-z]+")
    assert decoder.device_id("pump/readings") == "pump"
    assert decoder.device_id("$SYS/readings") is None


def test_topic_cache_stays_bounded(decoder: Decoder) -> None:
    for i in range(topics.TOPIC_CACHE_SIZE + 10):
        decoder.device_id(f"sensors/d{i}/readings")
    assert len(decoder.topics._cache) <= topics.TOPIC_CACHE_SIZE
    assert decoder.device_id("sensors/d1/readings") == "d1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subscription": "sensors/all/readings"}, "level for the device id"),
        ({"subscription": "sensors/a+/readings"}, "misplaced wildcard"),
        ({"subscription": "$share//sensors/+"}, "group name"),
        ({"device_id_pattern": "("}, "does not compile"),
        ({"max_batch_readings": 0}, "positive"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Decoder(FEATURES, set(), **kwargs)


@pytest.mark.parametrize("names", [(), ("a", "a"), ("a", "seq"), ("sensor_data",)])
def test_bad_feature_lists_fail_at_construction(names: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        Decoder(names, set())


def test_slow_path_result_matches_fast_path(decoder: Decoder) -> None:
    """A payload forced through the json-module path decodes to the same reading."""
    doc = {**features(), "seq": 5, "operational_state": "caf\u00e9"}
    fast = only_reading(decode(decoder, doc))
    escaped = json.dumps(doc, ensure_ascii=True).encode()  # contains a backslash escape
    assert b"\\" in escaped
    slow = only_reading(decoder.decode(TOPIC, escaped, NOW))
    assert (slow.values, slow.seq, slow.operational_state) == (fast.values, 5, "caf\u00e9")


def test_a_time_under_another_name_than_timestamp_is_told_once_per_device() -> None:
    """A gateway's {"ts": 1796650000, ...} was stamped on receipt without a word: the
    reading is still accepted (and stamped on receipt), and the field named once per
    device; a device that sends timestamp, or no time at all, is not named."""
    told: list[tuple[str, str]] = []
    dec = Decoder(FEATURES, {"lof"}, unread_time=UnreadTimeFields(
        lambda device, field: told.append((device, field))))
    for device, extra in (("gw-1", {"ts": 1796650000}), ("gw-1", {"ts": 1796650001}),
                          ("gw-2", {"Zeit": "2026-12-07T10:00:00"}), ("gw-3", {}),
                          ("gw-4", {"timestamp": 1796650000, "time": "x"}),
                          ("gw-5", {"datetime": "2026-12-07 10:00"})):
        reading = only_reading(decode(dec, {**features(), **extra},
                                      topic=f"sensors/{device}/readings"))
        assert reading.timestamp == (1796650000.0 if device == "gw-4" else NOW)
    assert told == [("gw-1", "ts"), ("gw-2", "Zeit"), ("gw-5", "datetime")]
