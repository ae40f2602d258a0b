"""Results larger than the broker's packet size limit are made to fit (``daemon.oversize``),
on the pipeline's own outputs: split batch verdicts, truncated dead letters, shortened
verdicts, and a ``result_too_large`` notice where nothing else fits."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from daemon import oversize
from daemon.config import AlertConfig, TopicsConfig
from daemon.models import ModelBundle
from daemon.payloads import Outbound
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from tests.broker import Broker
from tests.conftest_models import ANOMALOUS_READING as ANOMALOUS
from tests.conftest_models import NORMAL_READING as NORMAL

DEAD = TopicsConfig().dead_letter


def _outputs(bundle: ModelBundle, payload: bytes | dict[str, Any]) -> list[Outbound]:
    p = Pipeline(bundle, Decoder(bundle.features, bundle.detector_names), TopicsConfig(),
                 AlertConfig(raise_after=1, window=1))
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    outputs, _ = p.process([RawMessage("sensors/big-1/readings", body, 1000.0)], 1000.0)
    return outputs[0]


def _packet_size(out: Outbound) -> int:
    return len(out.payload) + len(out.topic.encode()) + oversize.PUBLISH_OVERHEAD


def _batch(n: int, **extra: Any) -> dict[str, Any]:
    return {"readings": [{**NORMAL, "seq": i, **extra} for i in range(n)]}


@pytest.mark.parametrize("max_packet", [1024, 3000, 20_000])
def test_a_batch_verdict_is_split_into_parts_that_fit_and_lose_nothing(
    model_bundle: ModelBundle, max_packet: int,
) -> None:
    # one anomalous entry, so that one prediction carries an explanation
    batch = _batch(120)
    batch["readings"][7] = {**ANOMALOUS, "seq": 7}
    (verdict,) = [o for o in _outputs(model_bundle, batch) if o.kind == "verdict"]
    whole = orjson.loads(verdict.payload)
    assert len(verdict.payload) > max_packet  # the case at hand

    parts, action = oversize.fit(verdict, max_packet, DEAD, 1000.0)

    assert action == "split"
    assert len(parts) > 1
    bodies = [orjson.loads(p.payload) for p in parts]
    assert all(_packet_size(p) <= max_packet for p in parts)
    assert all(p.topic == verdict.topic and p.kind == "verdict" for p in parts)
    assert [b["part"] for b in bodies] == list(range(1, len(parts) + 1))
    assert {b["parts"] for b in bodies} == {len(parts)}
    assert [b["key"] for b in bodies] == [f"{whole['key']}/{i}" for i in range(1, len(parts) + 1)]
    # every prediction once, in order, unchanged; the message's totals on every part
    assert [p for b in bodies for p in b["predictions"]] == whole["predictions"]
    for b in bodies:
        rest = {k: v for k, v in b.items() if k not in ("key", "part", "parts", "predictions")}
        assert rest == {k: v for k, v in whole.items() if k not in ("key", "predictions")}


def test_a_dead_letter_carries_as_much_of_the_refused_payload_as_fits(
    model_bundle: ModelBundle,
) -> None:
    raw = orjson.dumps(_batch(40, temperature="hot"))  # every entry refused
    (dead,) = _outputs(model_bundle, raw)
    body = orjson.loads(dead.payload)
    assert dead.kind == "dead_letter"
    assert len(body["rejections"]) == 40

    (fitted,), action = oversize.fit(dead, 8000, DEAD, 1000.0)

    assert action == "truncated"
    assert _packet_size(fitted) <= 8000
    small = orjson.loads(fitted.payload)
    assert small["payload_truncated"] is True
    assert 0 < len(small["payload"]) < len(body["payload"])
    assert raw.decode().startswith(small["payload"])
    assert small["rejections"] == body["rejections"]
    # as much as fits: one more character would not
    longer = {**small, "payload": body["payload"][: len(small["payload"]) + 1]}
    assert len(orjson.dumps(longer)) + len(dead.topic) + oversize.PUBLISH_OVERHEAD > 8000

    # too small a packet for every rejection: the first ones, and how many were left out
    (fewer,), action = oversize.fit(dead, 2500, DEAD, 1000.0)
    few = orjson.loads(fewer.payload)
    assert action == "truncated"
    assert _packet_size(fewer) <= 2500
    assert few["payload"] == ""
    assert 0 < len(few["rejections"]) < 40
    assert few["rejections"] == body["rejections"][: len(few["rejections"])]
    assert few["rejections_omitted"] == 40 - len(few["rejections"])


def test_a_binary_payload_is_cut_at_whole_base64_quanta() -> None:
    payload = base64.b64encode(bytes(range(256)) * 40).decode()
    body = {"reason": "not_utf8", "detail": "x", "payload": payload,
            "payload_encoding": "base64", "payload_truncated": False, "rejections": []}
    dead = Outbound("dead_letter", DEAD, orjson.dumps(body))
    (fitted,), action = oversize.fit(dead, 4096, DEAD, 1000.0)
    cut = orjson.loads(fitted.payload)["payload"]
    assert action == "truncated"
    assert len(cut) % 4 == 0 and payload.startswith(cut)
    assert base64.b64decode(cut) == (bytes(range(256)) * 40)[: len(cut) // 4 * 3]


def test_a_verdict_loses_its_detail_before_it_is_replaced(model_bundle: ModelBundle) -> None:
    outs = _outputs(model_bundle, {**ANOMALOUS, "seq": 1})
    verdict = next(o for o in outs if o.kind == "verdict")
    alert = next(o for o in outs if o.kind == "alert")
    for out in (verdict, alert):
        body = orjson.loads(out.payload)
        assert body["contributions"]
        short_size = len(orjson.dumps({k: v for k, v in body.items()
                                       if k not in oversize.DETAIL_FIELDS}))
        max_packet = short_size + 40 + len(out.topic) + oversize.PUBLISH_OVERHEAD
        assert not oversize.fits(out, max_packet)

        (fitted,), action = oversize.fit(out, max_packet, DEAD, 1000.0)

        assert action == "shortened"
        assert fitted.topic == out.topic and fitted.retain == out.retain
        short = orjson.loads(fitted.payload)
        assert short["shortened"] is True
        assert "contributions" not in short and "detector_scores" not in short
        assert short["is_anomaly" if out.kind == "verdict" else "state"] == body[
            "is_anomaly" if out.kind == "verdict" else "state"]


def test_what_cannot_be_made_to_fit_is_named_in_a_dead_letter_or_dropped(
    model_bundle: ModelBundle,
) -> None:
    outs = _outputs(model_bundle, {**ANOMALOUS, "seq": 1})
    verdict = next(o for o in outs if o.kind == "verdict")

    (notice,), action = oversize.fit(verdict, 420, DEAD, 1000.0)

    assert action == "replaced"
    assert notice.topic == DEAD and notice.kind == "dead_letter" and not notice.retain
    assert _packet_size(notice) <= 420
    body = orjson.loads(notice.payload)
    assert body["reason"] == "result_too_large"
    assert body["topic"] == verdict.topic and body["kind"] == "verdict"
    assert body["key"] == "big-1:1" and body["device_id"] == "big-1"
    assert body["size_bytes"] == len(verdict.payload) and body["max_packet_bytes"] == 420

    assert oversize.fit(verdict, 100, DEAD, 1000.0) == ([], "dropped")


def test_what_fits_is_left_alone(model_bundle: ModelBundle) -> None:
    for out in _outputs(model_bundle, _batch(5)):
        assert oversize.fit(out, 10_000, DEAD, 1000.0) == ([out], "fits")


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_broker_that_caps_packets_gets_results_that_fit_and_keeps_the_daemon(
    protocol: str, start_daemon: Any, collector_for: Any, publisher_for: Any,
) -> None:
    # Mosquitto disconnects a client that sends a larger packet. MQTT 5: it announces
    # its limit in the CONNACK; MQTT 3.1.1: the daemon is told (mqtt.max_packet_bytes).
    broker = Broker(extra_conf="max_packet_size 4000\n").start()
    try:
        told = {"max_packet_bytes": 4000} if protocol == "3.1.1" else {}
        svc = start_daemon(broker, protocol=protocol, **told)
        assert svc.mqtt.max_packet == 4000
        col = collector_for(broker, ["anomaly/#"])
        pub = publisher_for(broker)
        batch = orjson.dumps(_batch(30))
        assert len(batch) < 3900  # the readings fit; their verdict does not
        pub.send("sensors/big-1/readings", batch)
        first = col.json_on("anomaly/big-1/verdict")[0]
        parts = col.json_on("anomaly/big-1/verdict", count=first["parts"])
        assert first["parts"] > 1
        assert sorted(p["part"] for p in parts) == list(range(1, first["parts"] + 1))
        assert sorted(q["seq"] for p in parts for q in p["predictions"]) == list(range(30))

        pub.send("sensors/big-2/readings", orjson.dumps(_batch(30, temperature="hot")))
        dead = col.json_on("anomaly/dead-letter")[0]
        assert dead["payload_truncated"] is True and dead["reason"] == "non_numeric_feature"

        # the links stayed up: nothing was refused, nothing is stuck behind it
        pub.send("sensors/small-1/readings", {**NORMAL, "seq": 1})
        assert col.json_on("anomaly/small-1/verdict")[0]["seq"] == 1
        assert svc.metrics.reconnects._value.get() == 0
        split = svc.metrics.oversize_results.labels("verdict", "split")._value.get()
        assert split == 1
    finally:
        broker.stop()
