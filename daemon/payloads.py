"""What anomalyd publishes: verdicts, batch verdicts, alert states, dead letters and
devices' presence.

Pure functions of a judged reading (``daemon.pipeline.Judgement``) and the configuration:
the payload reference in the README describes what these build. Strict JSON (orjson; no
NaN can reach here, the pipeline replaces a non-finite score first).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from daemon.config import AlertConfig, TopicsConfig
from daemon.readings import Decoded, Rejection

if TYPE_CHECKING:
    from daemon.alerts import Acknowledgement, AlertEvent, AlertState
    from daemon.pipeline import Judgement, RawMessage
    from daemon.presence import PresenceEvent

OutKind = Literal["verdict", "alert", "dead_letter", "presence"]
NORMAL_TEXT = "within normal parameters"


@dataclass(frozen=True, slots=True)
class Outbound:
    kind: OutKind
    topic: str
    payload: bytes
    # alert states and presence are retained: a new subscriber sees each device's last one
    retain: bool = False


_last_second: tuple[int, str] = (-1, "")


def iso(ts: float) -> str:
    """Epoch seconds to ISO 8601 UTC with millisecond precision (``…T12:26:02.115Z``).

    Called for every verdict: the formatted second is cached (readings of one batch share
    it), which makes this ~2.5x cheaper than formatting a datetime each time.
    """
    global _last_second
    sec = math.floor(ts)
    cached = _last_second  # one read: another thread may replace it meanwhile
    if cached[0] != sec:
        cached = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
        _last_second = cached
    return f"{cached[1]}.{int((ts - sec) * 1000):03d}Z"


def acknowledgement(ack: Acknowledgement | None) -> dict[str, Any] | None:
    """An acknowledgement as published: who, when (ISO 8601) and the note; None if none."""
    if ack is None:
        return None
    return {"at": iso(ack.at), "by": ack.by, "note": ack.note}


def severity(margin: float, cfg: AlertConfig) -> str:
    """Alert severity from the score's distance above the threshold (in normal spreads)."""
    if margin >= cfg.critical_margin:
        return "critical"
    if margin >= cfg.major_margin:
        return "major"
    return "minor"


class Payloads:
    """Builds the outgoing messages; topics come from ``[topics]``."""

    def __init__(
        self,
        topics: TopicsConfig,
        alerts: AlertConfig,
        model_version: str,
        max_payload_bytes: int = 65536,
    ) -> None:
        self.dead_letter_topic = topics.dead_letter
        self.alert_window = alerts.window
        self.model_version = model_version
        self.max_payload_bytes = max_payload_bytes
        self._verdict_prefix, self._verdict_suffix = topics.verdict.split("{device_id}", 1)
        self._alert_prefix, self._alert_suffix = topics.alert.split("{device_id}", 1)
        self._presence_prefix, self._presence_suffix = topics.presence.split("{device_id}", 1)
        self.quiet_after_s = alerts.quiet_after_s

    def verdict_dict(self, j: Judgement, scored_at: str) -> dict[str, Any]:
        r = j.reading
        v: dict[str, Any] = {
            "device_id": r.device_id,
            "key": r.key,
            "is_anomaly": j.is_anomaly,
            "anomaly_score": j.score,
            "threshold": j.threshold,
            "confidence": j.confidence,
            "model_used": j.detector,
            "model_version": self.model_version,
            "timestamp": iso(r.timestamp),
            "scored_at": scored_at,
            "explanation": j.explanation["text"] if j.explanation else NORMAL_TEXT,
            "warming_up": j.warming_up,
        }
        if r.seq is not None:
            v["seq"] = r.seq
        if r.operational_state is not None:
            v["operational_state"] = r.operational_state
        if j.explanation:
            v["contributions"] = j.explanation["contributions"]
        if j.repeat:
            v["repeat"] = True
        if j.late:
            v["late"] = True
        if j.filling:
            v["window_filling"] = True
        if j.silenced_until is not None:
            v["silenced_until"] = iso(j.silenced_until)
        if j.members is not None:
            v["detector_scores"] = j.members
        if j.baseline is not None:
            v["baseline"] = j.baseline
        return v

    def alert_message(self, j: Judgement, event: AlertEvent, scored_at: str) -> dict[str, Any]:
        """The device's new alert state, caused by verdict ``j`` (published retained by
        ``single``/``batch`` from ``j.alert_message``)."""
        r = j.reading
        body: dict[str, Any] = {
            "device_id": r.device_id,
            "key": r.key,
            "state": event.transition,
            "active": event.transition != "resolved",
            "severity": event.severity,
            "anomaly_score": j.score,
            "threshold": j.threshold,
            "confidence": j.confidence,
            "model_used": j.detector,
            "timestamp": iso(r.timestamp),
            "raised_at": iso(event.raised_at),
            "published_at": scored_at,
            "anomalous_in_window": event.anomalous_in_window,
            "window": self.alert_window,
            "peak_margin": event.peak_margin,
            "warming_up": j.warming_up,
            "explanation": j.explanation["text"] if j.explanation else NORMAL_TEXT,
            "contributions": j.explanation["contributions"] if j.explanation else [],
            "acknowledged": acknowledgement(event.acknowledged),
            "resolve_after": event.resolve_after,
            "flapping": event.flapping,
        }
        if event.transition == "resolved":
            body["resolved_at"] = iso(r.timestamp)
        if r.seq is not None:
            body["seq"] = r.seq
        if r.index is not None:
            body["index"] = r.index
        return body

    def alert(self, device_id: str, message: dict[str, Any]) -> Outbound:
        """An alert message, retained: a new subscriber sees each device's last state."""
        return Outbound("alert", self.alert_topic(device_id), orjson.dumps(message),
                        retain=True)

    def acknowledged_alert(
        self, device_id: str, state: AlertState, ack: Acknowledgement, now: float
    ) -> Outbound:
        """The device's active alert, acknowledged: its last message (what it was raised or
        escalated for) with ``state: "acknowledged"`` and who acknowledged it when."""
        # an alert raised before its messages were kept: what its state says
        base = state.message or self.alert_of_state(device_id, state)
        body = {**base, "state": "acknowledged", "active": True, "severity": state.severity,
                "published_at": iso(now), "acknowledged": acknowledgement(ack)}
        return self.alert(device_id, body)

    def current_alert(self, device_id: str, state: AlertState) -> Outbound:
        """The device's active alert as it was last published (retained), to publish again:
        its acknowledgement if it has one (the same bytes: made from the same message at the
        acknowledgement's time), else the message that raised or escalated it."""
        if state.acknowledged is not None:
            ack = state.acknowledged
            return self.acknowledged_alert(device_id, state, ack, ack.at)
        # an alert raised before its messages were kept: what its state says
        message = state.message or {**self.alert_of_state(device_id, state),
                                    "state": "raised", "active": True}
        return self.alert(device_id, message)

    def alert_of_state(self, device_id: str, state: AlertState) -> dict[str, Any]:
        """The fields of an alert message that the alert's state alone gives, for one no
        verdict caused (an operator's action): the verdict's own fields (key, seq, scores,
        model, explanation) are for the caller to say or leave out."""
        return {
            "device_id": device_id,
            "severity": state.severity,
            "raised_at": None if state.raised_at is None else iso(state.raised_at),
            "peak_margin": state.peak_margin,
            "window": self.alert_window,
            "acknowledged": acknowledgement(state.acknowledged),
        }

    def single(self, j: Judgement, scored_at: str) -> list[Outbound]:
        """A single reading's verdict, and the alert state it changed, if any."""
        topic = self._verdict_prefix + j.reading.device_id + self._verdict_suffix
        outs = [Outbound("verdict", topic, orjson.dumps(self.verdict_dict(j, scored_at)))]
        if j.alert_message is not None:
            outs.append(self.alert(j.reading.device_id, j.alert_message))
        if j.presence is not None:
            outs.append(self.presence(j.presence))
        return outs

    def batch(self, d: Decoded, judged: list[Judgement], scored_at: str) -> list[Outbound]:
        """One verdict for a batch message, and the alert states its readings changed."""
        device = judged[0].reading.device_id
        preds = []
        for j in judged:
            p: dict[str, Any] = {
                "index": j.reading.index,
                "is_anomaly": j.is_anomaly,
                "anomaly_score": j.score,
                "confidence": j.confidence,
                "timestamp": iso(j.reading.timestamp),
                "warming_up": j.warming_up,
            }
            if j.reading.seq is not None:
                p["seq"] = j.reading.seq
            if j.explanation:
                p["explanation"] = j.explanation["text"]
            if j.repeat:
                p["repeat"] = True
            if j.late:
                p["late"] = True
            if j.filling:
                p["window_filling"] = True
            if j.silenced_until is not None:
                p["silenced_until"] = iso(j.silenced_until)
            preds.append(p)
        n_anom = sum(1 for j in judged if j.is_anomaly)
        models = sorted({j.detector for j in judged})
        body = {
            "device_id": device,
            "key": judged[0].reading.key.rsplit("#", 1)[0],
            "model_used": models[0] if len(models) == 1 else models,
            "model_version": self.model_version,
            "scored_at": scored_at,
            "total_samples": len(judged),
            "anomalies_detected": n_anom,
            "anomaly_rate": n_anom / len(judged),
            "rejected": len(d.rejections),
            "predictions": preds,
        }
        topic = self._verdict_prefix + device + self._verdict_suffix
        outs = [Outbound("verdict", topic, orjson.dumps(body))]
        outs.extend(self.alert(j.reading.device_id, j.alert_message)
                    for j in judged if j.alert_message is not None)
        outs.extend(self.presence(j.presence) for j in judged if j.presence is not None)
        return outs

    def presence(self, event: PresenceEvent) -> Outbound:
        """A device gone quiet, or reporting again (retained)."""
        at = event.at
        body: dict[str, Any] = {
            "device_id": event.device_id,
            "state": event.state,
            # its last judged reading: before it went quiet, or the one that is back
            "last_seen": iso(event.last_seen if event.state == "quiet" else at),
            # quiet: so far; reporting: in all
            "quiet_for_s": round(at - event.last_seen, 3),
            "quiet_after_s": self.quiet_after_s,
            "published_at": iso(at),
        }
        if event.first:
            body["first_seen"] = True
        topic = self._presence_prefix + event.device_id + self._presence_suffix
        return Outbound("presence", topic, orjson.dumps(body), retain=True)

    def alert_topic(self, device_id: str) -> str:
        return self._alert_prefix + device_id + self._alert_suffix

    def clear_retained(self, device_id: str) -> list[Outbound]:
        """Empty retained messages: the broker deletes the device's retained alert state
        and presence (a device taken out of service)."""
        presence = self._presence_prefix + device_id + self._presence_suffix
        return [Outbound("alert", self.alert_topic(device_id), b"", retain=True),
                Outbound("presence", presence, b"", retain=True)]

    def dead_letter(
        self, msg: RawMessage, d: Decoded, rejections: Sequence[Rejection], now: float
    ) -> Outbound:
        """Why a message was refused, with its topic and the original payload."""
        limit = self.max_payload_bytes
        raw = msg.payload[:limit]
        body: dict[str, Any] = {
            "reason": rejections[0].reason,
            "detail": rejections[0].detail,
            "topic": msg.topic,
            "device_id": d.device_id,
            "received_at": iso(msg.received_at),
            "dead_lettered_at": iso(now),
            "rejections": [
                {"reason": r.reason, "detail": r.detail, "index": r.index} for r in rejections
            ],
            "payload_truncated": len(msg.payload) > limit,
        }
        try:
            body["payload"] = raw.decode("utf-8")
            body["payload_encoding"] = "utf-8"
        except UnicodeDecodeError:
            body["payload"] = base64.b64encode(raw).decode("ascii")
            body["payload_encoding"] = "base64"
        return Outbound("dead_letter", self.dead_letter_topic, orjson.dumps(body))

