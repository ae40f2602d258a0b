"""``anomalyd watch``: print verdicts, alerts, dead letters and devices gone quiet as they
arrive (one line each)."""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple, TypeGuard

import orjson
import paho.mqtt.client as paho

from daemon.config import Settings
from daemon.tool_client import connect_tool_client
from daemon.topics import is_marker


class Line(NamedTuple):
    """What ``watch`` makes of one message: its ``text``, None for a message that is not
    for a person (the daemon's own handover markers under its status topic), and whether
    it is ``normal``: a verdict with nothing anomalous in it, which ``--anomalies`` hides."""

    text: str | None
    normal: bool = False


def describe(topic: str, payload: bytes, settings: Settings) -> str:
    """One human line for a message on the result topics."""
    return read(topic, payload, settings).text or f"{topic} (anomalyd's own marker)"


def read(topic: str, payload: bytes, settings: Settings) -> Line:
    """``describe``'s line, and whether ``--anomalies`` hides it. Never raises: whatever
    arrives (a field missing or of another type, a payload that is not JSON) is shown."""
    kind, device = topic_kind(topic, settings)
    if kind == "marker":
        return Line(None)
    if kind == "status":
        return Line(f"STATUS  anomalyd {_text(payload)}")
    try:
        body: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return Line(f"{topic} {payload[:80]!r}")
    if not isinstance(body, dict):
        return Line(f"{topic} {body!r}")
    named = body.get("device_id")
    device = named if isinstance(named, str) and named else device or "?"
    try:
        return _describe(kind, device, body)
    except (TypeError, ValueError, KeyError, AttributeError):  # a field of an odd shape
        return Line(f"{topic} {payload[:80]!r}")


def template_filter(template: str) -> str:
    """The MQTT filter for every topic a result template gives: the level holding
    ``{device_id}`` becomes ``+`` whole (``results/verdict-{device_id}`` gives
    ``results/+``; a ``+`` inside a level is no filter: watch died on it). What the
    filter takes beyond the template is told apart by ``topic_kind``."""
    return "/".join("+" if "{device_id}" in level else level for level in template.split("/"))


def topic_kind(topic: str, settings: Settings) -> tuple[str, str | None]:
    """Which result ``topic`` carries: "dead_letter", "status", "marker" (the daemon's
    handover markers, ``<status>/handover/<random>``), "verdict", "alert" or "presence"
    with the device its topic names, or "" for none of them (told by the payload then)."""
    topics = settings.topics
    if topic == topics.dead_letter:
        return "dead_letter", None
    if topic == topics.status:
        return "status", None
    if is_marker(topic, topics.status):
        return "marker", None
    for kind in ("verdict", "alert", "presence"):
        prefix, _, suffix = getattr(topics, kind).partition("{device_id}")
        if (len(topic) > len(prefix) + len(suffix) and topic.startswith(prefix)
                and topic.endswith(suffix)):
            device = topic[len(prefix):len(topic) - len(suffix)]
            if "/" not in device:
                return kind, device
    return "", None


def _describe(kind: str, device: str, body: dict[str, Any]) -> Line:
    if kind == "dead_letter":
        return Line(_dead_letter(body))
    if kind == "presence" or (not kind and "quiet_after_s" in body):
        return Line(_presence(device, body))
    if kind == "alert" or (not kind and "severity" in body):
        return Line(_alert(device, body))
    if "total_samples" in body or "predictions" in body:
        return _batch(device, body)
    return _verdict(device, body)


def _dead_letter(body: dict[str, Any]) -> str:
    named = body.get("device_id")
    # a reading whose topic names no valid device (bad_device_id) has none: its topic says
    # where it came from
    where = (named if isinstance(named, str) and named
             else f"topic {body['topic']!r}" if isinstance(body.get("topic"), str) else "?")
    rejections = body.get("rejections")
    refused = (len(rejections) if isinstance(rejections, list) else 1) + _count(
        body.get("rejections_omitted"))
    more = f" (+{refused - 1} more)" if refused > 1 else ""
    return f"DEAD-LETTER {where}: {body.get('reason')}: {body.get('detail')}{more}"


def _presence(device: str, body: dict[str, Any]) -> str:
    if body.get("state") == "quiet":
        return f"QUIET   {device}: no reading judged since {body.get('last_seen')}"
    if body.get("first_seen"):
        return f"NEW     {device}: reporting"
    return f"BACK    {device}: reporting again after {body.get('quiet_for_s')} s"


def _alert(device: str, body: dict[str, Any]) -> str:
    state = str(body.get("state", "raised"))
    ack = body.get("acknowledged")
    if state == "acknowledged" and isinstance(ack, dict):
        state += f" by {ack.get('by') or 'someone'}" + (
            f" ({ack['note']})" if ack.get("note") else "")
    elif state == "resolved" and isinstance(ack, dict):  # the resolution names who was on it
        state += f" (acknowledged by {ack.get('by') or 'someone'})"
    if body.get("flapping") and state != "resolved":
        state += flapping_note(body.get("resolve_after"))
    return (f"ALERT   {device} {state} [{body.get('severity', '?')}] "
            f"{body.get('explanation') or ''}").rstrip()


def _batch(device: str, body: dict[str, Any]) -> Line:
    """A batch message's verdict: how many of its readings are anomalous, how many
    entries were refused, and the entries that do not count the usual way (tags)."""
    listed = body.get("predictions")
    preds = [p for p in listed if isinstance(p, dict)] if isinstance(listed, list) else []
    here = sum(1 for p in preds if p.get("is_anomaly"))
    anomalous = body.get("anomalies_detected")
    if not isinstance(anomalous, int) or isinstance(anomalous, bool):
        anomalous = here if isinstance(listed, list) else "?"
    line = f"batch   {device} {anomalous}/{body.get('total_samples', '?')} anomalous"
    rejected = _count(body.get("rejected"))
    if rejected:
        line += f", {rejected} refused"
    normal = anomalous == 0
    if "part" in body:
        # a verdict split to fit the broker's packet size (daemon.oversize): each part
        # carries the whole message's totals, and its own readings' predictions
        line += f" (part {body.get('part')} of {body.get('parts', '?')}"
        if anomalous != 0 and isinstance(listed, list):
            line += f", with {here or 'none'} of them"
            normal = here == 0
        line += ")"
    for tag, key in _TAGS:
        n = sum(1 for p in preds if p.get(key))
        if n:
            line += f" [{n} {tag}]"
    return Line(line, normal=normal)


def _verdict(device: str, body: dict[str, Any]) -> Line:
    anomaly = bool(body.get("is_anomaly"))
    tags = [tag for tag, key in _TAGS if body.get(key)]
    if overruled(body):
        tags.append("overruled by its baseline")
    tagged = "".join(f" [{tag}]" for tag in tags)
    explanation = body.get("explanation")
    return Line((f"{'ANOMALY' if anomaly else 'normal '} {device} "
                 f"seq={body.get('seq', '-')} score={_number(body.get('anomaly_score'), '.3f')}"
                 f" conf={_number(body.get('confidence'), '.2f')}{tagged} "
                 f"{'' if explanation is None else explanation}").rstrip(),
                normal=not anomaly)


def overruled(body: dict[str, Any]) -> bool:
    """A normal verdict whose score is over the model's threshold: the device's own
    baseline found the reading normal for it (README, ``baseline``)."""
    baseline, score, threshold = body.get("baseline"), body.get("anomaly_score"), body.get(
        "threshold")
    return (isinstance(baseline, dict) and baseline.get("is_anomaly") is False
            and not body.get("is_anomaly") and _is_number(score) and _is_number(threshold)
            and score > threshold)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: object, spec: str) -> str:
    return format(value, spec) if _is_number(value) else "-"


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _text(payload: bytes) -> str:
    return payload[:80].decode("utf-8", errors="replace")


def line_for(topic: str, payload: bytes, retained: bool, settings: Settings) -> str:
    """``describe``, saying which lines are the broker's retained copies (each device's
    last alert state and presence, sent at subscription: not news) and which are the
    deletion of one (an empty retained message: ``anomalyd forget``)."""
    if not payload:
        return f"CLEARED {topic} (its retained state deleted)"
    line = describe(topic, payload, settings)
    return f"{line} (retained: the last state, not new)" if retained else line


def shown(topic: str, payload: bytes, retained: bool, settings: Settings,
          anomalies_only: bool = False) -> str | None:
    """The line ``watch`` prints for a message (``line_for``), or None: for the daemon's
    own markers, and with ``anomalies_only`` for a normal verdict (a batch's when none of
    its readings is anomalous)."""
    seen = read(topic, payload, settings)
    if seen.text is None or (anomalies_only and seen.normal):
        return None
    return line_for(topic, payload, retained, settings)


def flapping_note(resolve_after: object) -> str:
    """What ``watch`` and ``anomalyd devices`` add to a flapping alert."""
    return f" (flapping: resolves after {resolve_after} normal readings)"


#: Verdict fields worth a tag on the line: a verdict that does not count the usual way.
_TAGS = (("warming up", "warming_up"), ("repeat", "repeat"), ("late", "late"),
         ("window filling", "window_filling"), ("silenced", "silenced_until"))


def watch(settings: Settings, anomalies_only: bool = False) -> int:
    cfg = settings.mqtt
    verdict_filter = template_filter(settings.topics.verdict)
    alert_filter = template_filter(settings.topics.alert)
    presence_filter = template_filter(settings.topics.presence)
    stopping: list[bool] = []

    def on_message(c: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        line = shown(msg.topic, bytes(msg.payload), msg.retain, settings, anomalies_only)
        if line is None or stopping:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            # stdout closed (`anomalyd watch | head`): stop quietly; what is still
            # buffered goes to devnull, or its flush at exit would complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            stopping.append(True)
            c.disconnect()

    seen_up: list[bool] = []

    def on_link(up: bool, why: str) -> None:
        if stopping:  # our own disconnect, not a lost link
            return
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
        stopping.append(True)
        client.disconnect()
    print("", file=sys.stderr)
    return 0
