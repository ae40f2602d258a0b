"""Results larger than the broker takes, made to fit (pure: no I/O, no clock).

A broker may cap the size of a packet: MQTT 5 brokers announce it in their CONNACK
(Maximum Packet Size; Mosquitto's ``max_packet_size``), others document it (AWS IoT Core,
128 KB), and a client that sends more is disconnected. The verdict of a batch message of
1,000 readings is about 150 KB; a dead letter carries the refused payload. Sent as it is,
such a result would be sent again after every reconnection, for ever, and every later
reading's acknowledgement would wait behind it.

``fit`` says what to publish instead, every message within the limit:

* a batch verdict is split into parts, each a batch verdict for some of the message's
  readings (its totals still the whole message's) with ``part``, ``parts`` and a key of
  its own (``<key>/<part>``, so that consumers deduplicating on ``key`` keep every part);
* a dead letter carries less of the refused payload (``payload_truncated``), and if need
  be fewer of its rejections (``rejections_omitted``);
* a verdict or alert loses its per-input detail (``contributions``, ``detector_scores``),
  marked ``shortened``;
* whatever still does not fit is replaced by a dead letter with reason
  ``result_too_large`` that names it (topic, kind, key, size); if even that cannot fit,
  nothing is published (the caller counts and logs it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from daemon.payloads import Outbound, iso

#: A QoS 1 PUBLISH without properties, around its topic and payload: fixed header (1 byte
#: and a remaining length of up to 4), topic length (2), packet id (2) and, in MQTT 5,
#: the properties' length (1).
PUBLISH_OVERHEAD = 10
#: The dead-letter reason of a result that could not be made to fit.
RESULT_TOO_LARGE = "result_too_large"
#: Fields a verdict or alert can do without, largest first.
DETAIL_FIELDS = ("contributions", "detector_scores")


def payload_limit(max_packet: int, topic: str) -> int:
    """The largest payload that fits a packet of ``max_packet`` bytes on ``topic``."""
    return max_packet - PUBLISH_OVERHEAD - len(topic.encode("utf-8"))


def fits(out: Outbound, max_packet: int) -> bool:
    return len(out.payload) <= payload_limit(max_packet, out.topic)


def fit(
    out: Outbound, max_packet: int, dead_letter_topic: str, now: float
) -> tuple[list[Outbound], str]:
    """What to publish instead of ``out`` within ``max_packet`` bytes, and what was done:
    ``fits``, ``split``, ``truncated``, ``shortened``, ``replaced`` or ``dropped``."""
    limit = payload_limit(max_packet, out.topic)
    if len(out.payload) <= limit:
        return [out], "fits"
    body: dict[str, Any] = orjson.loads(out.payload)
    if out.kind == "verdict" and isinstance(body.get("predictions"), list):
        parts = _split(body, limit)
        if parts is not None:
            return [Outbound(out.kind, out.topic, p, out.retain) for p in parts], "split"
    if out.kind == "dead_letter":
        shrunk = _truncated(body, limit)
        if shrunk is not None:
            return [Outbound(out.kind, out.topic, shrunk, out.retain)], "truncated"
    if out.kind in ("verdict", "alert"):
        short = {k: v for k, v in body.items() if k not in DETAIL_FIELDS}
        short["shortened"] = True
        payload = orjson.dumps(short)
        if len(payload) <= limit and "predictions" not in short:
            return [Outbound(out.kind, out.topic, payload, out.retain)], "shortened"
    notice = Outbound("dead_letter", dead_letter_topic,
                      orjson.dumps(_too_large(out, body, max_packet, now)))
    if fits(notice, max_packet):
        return [notice], "replaced"
    return [], "dropped"


def _split(body: dict[str, Any], limit: int) -> list[bytes] | None:
    """A batch verdict as parts of at most ``limit`` bytes each; None if one prediction
    with the verdict's other fields is already too large."""
    preds = body["predictions"]
    if not preds:
        return None
    encoded = [orjson.dumps(p) for p in preds]
    key = str(body.get("key", ""))
    most = len(preds)  # no more parts than predictions: the widest numbers it can take

    def part(i: int, n: int, chunk: list[Any]) -> dict[str, Any]:
        return {**body, "key": f"{key}/{i}", "part": i, "parts": n, "predictions": chunk}

    # the envelope at its widest, with an empty list: each prediction adds itself and a comma
    base = len(orjson.dumps(part(most, most, [])))
    bounds: list[tuple[int, int]] = []
    start, size = 0, base
    for i, e in enumerate(encoded):
        grow = len(e) + (1 if i > start else 0)
        if size + grow > limit:
            if i == start:
                return None  # this prediction alone does not fit
            bounds.append((start, i))
            start, size = i, base
            grow = len(e)
            if size + grow > limit:
                return None
        size += grow
    bounds.append((start, len(encoded)))
    n = len(bounds)
    return [orjson.dumps(part(i + 1, n, preds[a:b])) for i, (a, b) in enumerate(bounds)]


def _truncated(body: dict[str, Any], limit: int) -> bytes | None:
    """A dead letter with as much of its payload, and of its rejections, as fits."""
    text = str(body.get("payload", ""))
    step = 4 if body.get("payload_encoding") == "base64" else 1  # whole base64 quanta

    def with_payload(m: int) -> bytes:
        return orjson.dumps({**body, "payload": text[:m], "payload_truncated": True})

    if len(with_payload(0)) <= limit:
        m = _longest(len(text) // step, lambda k: len(with_payload(k * step)) <= limit)
        return with_payload(m * step)
    rejections = list(body.get("rejections", []))

    def with_rejections(k: int) -> bytes:
        return orjson.dumps({**body, "payload": "", "payload_truncated": True,
                             "rejections": rejections[:k],
                             "rejections_omitted": len(rejections) - k})

    if len(with_rejections(0)) > limit:
        return None
    return with_rejections(_longest(len(rejections), lambda k: len(with_rejections(k)) <= limit))


def _longest(most: int, ok: Callable[[int], bool]) -> int:
    """The largest k in [0, most] with ok(k), given ok(0) and that ok only turns false."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _too_large(out: Outbound, body: dict[str, Any], max_packet: int, now: float) -> dict[str, Any]:
    size = len(out.payload)
    return {
        "reason": RESULT_TOO_LARGE,
        "detail": (f"the {out.kind} for {out.topic} is {size} bytes and cannot be made to "
                   f"fit the broker's packets of at most {max_packet} bytes"),
        "topic": out.topic,
        "kind": out.kind,
        "device_id": body.get("device_id"),
        "key": body.get("key"),
        "size_bytes": size,
        "max_packet_bytes": max_packet,
        "dead_lettered_at": iso(now),
    }
