"""``anomalyd watch``: print verdicts, alerts, dead letters and devices gone quiet as they
arrive (one line each)."""

from __future__ import annotations

import sys
from typing import Any

import orjson
import paho.mqtt.client as paho

from daemon.config import Settings
from daemon.tool_client import connect_tool_client


def describe(topic: str, payload: bytes, settings: Settings) -> str:
    """One human line for a message on the result topics."""
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return f"{topic} {payload[:80]!r}"
    if not isinstance(body, dict):
        return f"{topic} {body!r}"
    device = body.get("device_id", "?")
    if topic == settings.topics.dead_letter:
        return f"DEAD-LETTER {device}: {body.get('reason')}: {body.get('detail')}"
    if "quiet_after_s" in body:
        if body.get("state") == "quiet":
            return f"QUIET   {device}: no reading judged since {body.get('last_seen')}"
        if body.get("first_seen"):
            return f"NEW     {device}: reporting"
        return f"BACK    {device}: reporting again after {body.get('quiet_for_s')} s"
    if "severity" in body:
        state = body.get("state", "raised")
        ack = body.get("acknowledged")
        if state == "acknowledged" and isinstance(ack, dict):
            state += f" by {ack.get('by') or 'someone'}" + (
                f" ({ack['note']})" if ack.get("note") else "")
        if body.get("flapping") and state != "resolved":
            state += flapping_note(body.get("resolve_after"))
        return f"ALERT   {device} {state} [{body['severity']}] {body.get('explanation')}"
    if "total_samples" in body:
        # a verdict split to fit the broker's packet size (daemon.oversize); each part
        # carries the whole message's totals
        part = f" (part {body['part']} of {body['parts']})" if "part" in body else ""
        return (f"batch   {device} {body['anomalies_detected']}/{body['total_samples']} "
                f"anomalous{part}")
    mark = "ANOMALY" if body.get("is_anomaly") else "normal "
    tags = "".join(f" [{tag}]" for tag, key in _TAGS if body.get(key))
    return (f"{mark} {device} seq={body.get('seq', '-')} score={body.get('anomaly_score', 0):.3f}"
            f" conf={body.get('confidence', 0):.2f}{tags} {body.get('explanation', '')}")


def line_for(topic: str, payload: bytes, retained: bool, settings: Settings) -> str:
    """``describe``, saying which lines are the broker's retained copies (each device's
    last alert state and presence, sent at subscription: not news) and which are the
    deletion of one (an empty retained message: ``anomalyd forget``)."""
    if not payload:
        return f"CLEARED {topic} (its retained state deleted)"
    line = describe(topic, payload, settings)
    return f"{line} (retained: the last state, not new)" if retained else line


def flapping_note(resolve_after: object) -> str:
    """What ``watch`` and ``anomalyd devices`` add to a flapping alert."""
    return f" (flapping: resolves after {resolve_after} normal readings)"


#: Verdict fields worth a tag on the line: a verdict that does not count the usual way.
_TAGS = (("warming up", "warming_up"), ("repeat", "repeat"), ("late", "late"),
         ("silenced", "silenced_until"))


def watch(settings: Settings, anomalies_only: bool = False) -> int:
    cfg = settings.mqtt
    verdict_filter = settings.topics.verdict.replace("{device_id}", "+")
    alert_filter = settings.topics.alert.replace("{device_id}", "+")
    presence_filter = settings.topics.presence.replace("{device_id}", "+")

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        line = line_for(msg.topic, bytes(msg.payload), msg.retain, settings)
        if anomalies_only and line.startswith("normal"):
            return
        print(line, flush=True)

    seen_up: list[bool] = []

    def on_link(up: bool, why: str) -> None:
        if up and seen_up:
            print("(reconnected to the broker; messages sent meanwhile were not shown)",
                  file=sys.stderr, flush=True)
        elif not up:
            print(f"({why}; reconnecting)", file=sys.stderr, flush=True)
        seen_up.append(up)

    client = connect_tool_client(
        cfg, subscriptions=[(verdict_filter, 0), (alert_filter, 0),
                            (settings.topics.dead_letter, 0), (presence_filter, 0)],
        on_link=on_link)
    client.on_message = on_message
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
    print("", file=sys.stderr)
    return 0
