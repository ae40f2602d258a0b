"""Hostile and broken input: every message gets exactly one verdict or one dead letter, all
output is strict JSON, a bad message costs the others nothing, and the daemon stays healthy.

Property tests run the whole message handler (``Pipeline.process``, as the service builds
it, with a real trained model set; no broker). The integration test sends each kind of bad
input through a real Mosquitto to a running daemon.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from daemon.config import HttpConfig, LimitsConfig, ModelConfig, Settings, StateConfig
from daemon.models import ModelBundle
from daemon.pipeline import Outbound, Pipeline, RawMessage
from daemon.service import Service
from tests.broker import Broker
from tests.conftest import make_settings
from tests.conftest_models import NORMAL_READING as NORMAL
from tests.faults import http_get

NOW = 1_790_000_000.0
MAX_BATCH = 10
BODY = orjson.dumps(NORMAL)[1:-1]  # the six features, without the braces
REST = BODY[BODY.index(b'"vibration"') :]  # every feature but temperature

#: One example of each kind of bad input, with the dead-letter reason it must get.
BAD_INPUTS: dict[str, tuple[str, bytes, str]] = {
    "non-JSON": ("dev-1", b"{not json", "not_json"),
    "non-UTF-8": ("dev-1", b'{"temperature": "\xff\xfe"}', "not_utf8"),
    "deeply nested": ("dev-1", b'{"sensor_data":' * 20 + b"{}" + b"}" * 20, "too_deep"),
    "400-digit number": ("dev-1", b'{"temperature": 1' + b"0" * 400 + b"," + REST + b"}",
                         "not_json"),
    "1e400": ("dev-1", b'{"temperature": 1e400,' + REST + b"}", "not_json"),
    "1e300 (a double, out of range)": ("dev-1", orjson.dumps({**NORMAL, "temperature": 1e300}),
                                       "out_of_range"),
    "NaN": ("dev-1", b'{"temperature": NaN,' + REST + b"}", "not_json"),
    "-Infinity": ("dev-1", b'{"temperature": -Infinity,' + REST + b"}", "not_json"),
    "duplicate key": ("dev-1", b'{"temperature": 1,' + BODY + b"}", "duplicate_key"),
    "wrong type": ("dev-1", orjson.dumps({**NORMAL, "vibration": "high"}),
                   "non_numeric_feature"),
    "missing feature": ("dev-1", orjson.dumps({k: v for k, v in NORMAL.items()
                                               if k != "pressure"}), "missing_feature"),
    "oversized payload": ("dev-1", orjson.dumps({**NORMAL, "pad": "x" * 70_000}),
                          "payload_too_large"),
    "oversized batch": ("dev-1", orjson.dumps({"readings": [NORMAL] * (MAX_BATCH + 1)}),
                        "batch_too_large"),
    "top-level array": ("dev-1", b"[1, 2, 3]", "not_object"),
    "device id with a space": ("bad id!", orjson.dumps(NORMAL), "bad_device_id"),
    "device id starting with '-'": ("-dev", orjson.dumps(NORMAL), "bad_device_id"),
    "device id of 100 chars": ("d" * 100, orjson.dumps(NORMAL), "bad_device_id"),
}


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-strict JSON constant {name} in output")


def strict(payload: bytes) -> Any:
    """Parse as strict JSON: NaN, Infinity and -Infinity are errors."""
    return json.loads(payload, parse_constant=_no_constants)


def service_settings(model_dir: Path, state_dir: Path) -> Settings:
    return Settings(
        http=HttpConfig(port=0),
        model=ModelConfig(dir=model_dir),
        limits=LimitsConfig(max_batch_readings=MAX_BATCH),
        state=StateConfig(dir=state_dir),
    )


@pytest.fixture(scope="module")
def pipeline(
    trained_model_dir: Path, model_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """The message handler exactly as the service wires it (no broker is contacted)."""
    svc = Service(service_settings(trained_model_dir, tmp_path_factory.mktemp("state")),
                  model_bundle)
    svc.http.start()
    yield svc.pipeline
    svc.http.stop()


# -- strategies ---------------------------------------------------------------------------

def dumps(value: Any) -> bytes:
    """JSON text of generated data (json, not orjson: it writes integers past 64 bits)."""
    return json.dumps(value).encode()


device_ids = st.sampled_from(["dev-1", "dev-2", "pump.7:a"]) | st.text(max_size=70)
topics = (
    device_ids.map(lambda d: f"sensors/{d}/readings")
    | st.text(max_size=80)
    | st.sampled_from(["", "sensors//readings", "sensors/+/readings", "sensors/#", "/"])
)
json_scalars = (
    st.none() | st.booleans() | st.text(max_size=12)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
feature_values = json_scalars | st.sampled_from([1e15, -1e15, 1e16, 0, -0.0])
readings = st.fixed_dictionaries(
    {}, optional={k: feature_values | st.just(v) for k, v in NORMAL.items()}
    | {"seq": st.integers(-5, 2**64), "timestamp": json_scalars,
       "model_name": st.sampled_from(["ensemble", "lof", "nope"]) | json_scalars},
)
valid_reading_bytes = st.builds(lambda seq: orjson.dumps({**NORMAL, "seq": seq}),
                                st.integers(0, 2**62))
payloads = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([p for _, p, _ in BAD_INPUTS.values()]),
    json_values.map(dumps),
    readings.map(dumps),
    st.lists(readings, min_size=1, max_size=MAX_BATCH + 2).map(
        lambda rs: dumps({"readings": rs})),
    valid_reading_bytes,
    st.builds(lambda head, tail: head + tail, valid_reading_bytes, st.binary(max_size=8)),
)
messages = st.builds(RawMessage, topics, payloads, st.just(NOW - 1.0))


def outputs_by_kind(outs: list[Outbound]) -> dict[str, int]:
    kinds = {"verdict": 0, "alert": 0, "dead_letter": 0}
    for o in outs:
        kinds[o.kind] += 1
    return kinds


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=8))
def test_every_message_gets_one_verdict_or_one_dead_letter_as_strict_json(
    pipeline: Pipeline, batch: list[RawMessage]
) -> None:
    outputs, _ = pipeline.process(batch, NOW)
    assert len(outputs) == len(batch)
    for msg, outs in zip(batch, outputs, strict=True):
        kinds = outputs_by_kind(outs)
        assert kinds["verdict"] <= 1 and kinds["dead_letter"] <= 1, (msg, kinds)
        # A batch message can have both (some entries judged, some refused); a single
        # reading has exactly one of them.
        assert kinds["verdict"] + kinds["dead_letter"] >= 1, msg
        for o in outs:
            body = strict(o.payload)
            assert isinstance(body, dict)
            if o.kind == "dead_letter":
                assert isinstance(body["reason"], str) and body["reason"]
                assert body["topic"] == msg.topic
            else:
                assert body["key"], body  # the idempotency key consumers dedupe on
        if kinds["verdict"] and b'"readings"' not in msg.payload:
            assert kinds["dead_letter"] == 0, (msg, outs)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 2**40), min_size=1, max_size=6, unique=True),
    st.lists(st.tuples(st.integers(0, 6), payloads), min_size=1, max_size=4),
)
def test_a_bad_message_costs_the_others_nothing(
    pipeline: Pipeline, seqs: list[int], bad: list[tuple[int, bytes]]
) -> None:
    """The same good readings, alone or interleaved with refused messages for the same
    device, get the same verdicts (per-device state starts equal in both runs). A message
    with any valid reading is left out: it rightly moves the device's state."""
    topic = "sensors/dev-iso/readings"
    assume(all(not pipeline.decoder.decode(topic, p, NOW).readings for _, p in bad))
    good = [RawMessage("sensors/dev-iso/readings", orjson.dumps({**NORMAL, "seq": s}),
                       NOW - 1.0) for s in seqs]
    mixed = list(good)
    for pos, payload in sorted(bad, reverse=True):
        mixed.insert(min(pos, len(mixed)), RawMessage("sensors/dev-iso/readings", payload,
                                                      NOW - 1.0))
    start = pipeline.fleet.snapshot()
    try:
        alone, _ = pipeline.process(good, NOW)
        pipeline.fleet.restore(start)
        together, _ = pipeline.process(mixed, NOW)
    finally:
        pipeline.fleet.restore(start)
    wanted = {m.payload: outs for m, outs in zip(good, alone, strict=True)}
    # the first message with each good payload (a "bad" one may be drawn equal to it)
    got: dict[bytes, list[Outbound]] = {}
    for m, outs in zip(mixed, together, strict=True):
        got.setdefault(m.payload, outs)
    for payload, outs in wanted.items():
        verdicts = [strict(o.payload) for o in outs if o.kind == "verdict"]
        assert len(verdicts) == 1
        mine = [strict(o.payload) for o in got[payload] if o.kind == "verdict"]
        assert mine == verdicts


def test_each_bad_input_kind_gets_its_reason_in_the_handler(pipeline: Pipeline) -> None:
    batch = [RawMessage(f"sensors/{dev}/readings", p, NOW - 1.0)
             for dev, p, _ in BAD_INPUTS.values()]
    valid = RawMessage("sensors/dev-ok/readings", orjson.dumps({**NORMAL, "seq": 1}), NOW - 1)
    outputs, _ = pipeline.process([*batch, valid], NOW)
    for (kind, (_, _, reason)), outs in zip(BAD_INPUTS.items(), outputs, strict=False):
        assert [strict(o.payload)["reason"] for o in outs] == [reason], kind
    assert [o.kind for o in outputs[-1]] == ["verdict"]


# -- through the broker -------------------------------------------------------------------


@pytest.mark.integration
def test_bad_inputs_through_the_broker_are_dead_lettered_and_the_daemon_stays_healthy(
    broker: Broker, start_daemon: Any, trained_model_dir: Path, collector_for: Any,
    publisher_for: Any, tmp_path: Path,
) -> None:
    base = make_settings(broker, trained_model_dir)
    svc = start_daemon(broker, base.model_copy(update={
        "limits": LimitsConfig(max_batch_readings=MAX_BATCH), "state": StateConfig(dir=tmp_path),
    }))
    col = collector_for(broker, ["anomaly/dead-letter", "anomaly/hostile-ok/verdict"])
    pub = publisher_for(broker)
    expected: dict[str, tuple[str, str]] = {}  # topic -> (kind, reason)
    sent_at: dict[str, float] = {}
    for i, (kind, (dev, payload, reason)) in enumerate(BAD_INPUTS.items()):
        topic = f"sensors/{dev if dev != 'dev-1' else f'hostile-{i}'}/readings"
        expected[topic] = (kind, reason)
        sent_at[topic] = pub.send(topic, payload)
    raw = col.wait_for(lambda t, p: t == "anomaly/dead-letter"
                       and strict(p)["topic"] in expected, count=len(BAD_INPUTS), timeout=15)
    got = {strict(p)["topic"]: strict(p)["reason"] for _, p in raw}
    assert got == {t: reason for t, (_, reason) in expected.items()}
    latency = {strict(p)["topic"]: t - sent_at[strict(p)["topic"]]
               for topic, p, _, t in list(col.messages) if topic == "anomaly/dead-letter"
               and strict(p)["topic"] in sent_at}
    print(f"dead-letter latency: max {max(latency.values()) * 1000:.1f} ms over "
          f"{len(latency)} kinds")
    assert max(latency.values()) < 1.0
    status, health = http_get(svc.http.port, "/health")
    assert status == 200, health
    t0 = pub.send("sensors/hostile-ok/readings", {**NORMAL, "seq": 42})
    ((_, payload),) = col.wait_for(lambda t, p: t == "anomaly/hostile-ok/verdict")
    assert time.monotonic() - t0 < 2
    verdict = strict(payload)
    assert verdict["seq"] == 42 and verdict["key"] == "hostile-ok:42"
