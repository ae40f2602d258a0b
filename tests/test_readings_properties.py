"""Property tests for daemon.readings: no input makes decode raise or mis-report."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.readings import MAX_ABS_VALUE, REASONS, Decoded, Decoder

FEATURES = ("temperature", "Volume Flow RateRMS", "p")
TOPIC = "sensors/dev-1/readings"
NOW = 1_715_000_000.0
DECODER = Decoder(FEATURES, {"lof"}, max_batch_readings=20)
FEATURE_REASONS = {"non_numeric_feature", "out_of_range"}
META_KEYS = {"timestamp", "seq", "operational_state", "model_name", "sensor_data", "readings"}

quick = settings(max_examples=200, deadline=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
valid_numbers = st.integers(min_value=-(10**15), max_value=10**15) | st.floats(
    min_value=-MAX_ABS_VALUE, max_value=MAX_ABS_VALUE, allow_nan=False
)
keys_we_read = st.sampled_from(sorted({*FEATURES, *META_KEYS}))


def encode(doc: Any) -> bytes:
    """JSON bytes; unlike orjson.dumps this accepts integers beyond 64 bits."""
    return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()


def check_invariants(result: Decoded) -> None:
    assert isinstance(result, Decoded)
    for rejection in result.rejections:
        assert rejection.reason in REASONS
        assert isinstance(rejection.detail, str)
        assert 0 < len(rejection.detail) <= 200
    for reading in result.readings:
        assert len(reading.values) == len(FEATURES)
        assert all(type(v) is float and math.isfinite(v) for v in reading.values)


@quick
@given(topic=st.text(max_size=80), payload=st.binary(max_size=300))
def test_decode_never_raises_on_arbitrary_bytes_and_topics(topic: str, payload: bytes) -> None:
    check_invariants(DECODER.decode(topic, payload, NOW))
    check_invariants(DECODER.decode(TOPIC, payload, NOW))


@quick
@given(doc=json_values, extra=st.dictionaries(keys_we_read, json_values, max_size=4))
def test_decode_never_raises_on_arbitrary_json(doc: Any, extra: dict[str, Any]) -> None:
    check_invariants(DECODER.decode(TOPIC, encode(doc), NOW))
    check_invariants(DECODER.decode(TOPIC, encode(extra), NOW))
    check_invariants(DECODER.decode(TOPIC, encode({"readings": [extra, doc]}), NOW))


@quick
@given(
    values=st.tuples(*[valid_numbers] * len(FEATURES)),
    noise=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in FEATURES), json_scalars, max_size=3
    ),
    nested=st.booleans(),
)
def test_valid_features_round_trip(
    values: tuple[float, ...], noise: dict[str, Any], nested: bool
) -> None:
    noise = {k: v for k, v in noise.items() if k not in META_KEYS}
    body = {**noise, **dict(zip(FEATURES, values, strict=True))}
    doc = {"sensor_data": body} if nested else body
    result = DECODER.decode(TOPIC, encode(doc), NOW)
    assert result.rejections == ()
    (reading,) = result.readings
    assert reading.values == tuple(float(v) for v in values)


@quick
@given(value=json_values)
def test_any_json_value_in_a_feature_slot_is_a_number_or_a_known_rejection(value: Any) -> None:
    doc = {"temperature": value, "Volume Flow RateRMS": 1.0, "p": 2.0}
    result = DECODER.decode(TOPIC, encode(doc), NOW)
    check_invariants(result)
    if result.readings:
        assert type(value) in (int, float)
        assert result.readings[0].values[0] == float(value)
    else:
        (rejection,) = result.rejections
        assert rejection.reason in FEATURE_REASONS
        assert "'temperature'" in rejection.detail
        if rejection.reason == "out_of_range":
            assert type(value) in (int, float) and abs(value) > MAX_ABS_VALUE


@quick
@given(
    key=st.sampled_from([*FEATURES, "seq", "model_name"]),
    first=valid_numbers,
    second=valid_numbers,
    escaped=st.booleans(),
)
def test_a_repeated_key_we_read_is_always_caught(
    key: str, first: float, second: float, escaped: bool
) -> None:
    body = orjson.dumps({name: 1.0 for name in FEATURES})[:-1]
    spelled = orjson.dumps(key)
    if escaped:  # the same key spelled with a \\u escape for its first character
        spelled = b'"\\u%04x' % ord(key[0]) + spelled[2:]
    payload = (
        body
        + b","
        + orjson.dumps(key)
        + b":"
        + orjson.dumps(first)
        + b","
        + spelled
        + b":"
        + orjson.dumps(second)
        + b"}"
    )
    result = DECODER.decode(TOPIC, payload, NOW)
    assert [r.reason for r in result.rejections] == ["duplicate_key"]


entry_values = st.one_of(valid_numbers, json_scalars)
batch_entries = st.lists(
    st.one_of(
        st.fixed_dictionaries({f: valid_numbers for f in FEATURES}),
        st.fixed_dictionaries(
            {f: entry_values for f in FEATURES},
            optional={"seq": st.integers(min_value=-2, max_value=2**64), "extra": json_scalars},
        ),
        st.fixed_dictionaries(
            {"sensor_data": st.fixed_dictionaries({f: valid_numbers for f in FEATURES})}
        ),
        # not "readings": an entry holding it would be a batch when sent alone
        st.dictionaries(keys_we_read.filter(lambda k: k != "readings"), json_scalars, max_size=3),
        json_scalars,
    ),
    min_size=1,
    max_size=20,
)


@quick
@given(entries=batch_entries)
def test_a_batch_judges_each_entry_as_if_it_came_alone(entries: list[Any]) -> None:
    """The batch path checks features for the whole batch at once; this pins that it
    accepts and refuses exactly what the per-reading path does, with the same values."""
    batch = DECODER.decode(TOPIC, encode({"readings": entries}), NOW)
    check_invariants(batch)
    accepted = {r.index: r.values for r in batch.readings}
    refused = {r.index: r.reason for r in batch.rejections}
    assert sorted([*accepted, *refused]) == list(range(len(entries)))
    for i, entry in enumerate(entries):
        alone = DECODER.decode(TOPIC, encode(entry), NOW)
        if alone.readings:
            assert accepted[i] == alone.readings[0].values
        else:
            assert refused[i] == alone.rejections[0].reason
