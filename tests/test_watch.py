"""`anomalyd watch`: one readable line per verdict, alert state, dead letter and presence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from daemon.config import Settings
from daemon.models import load_bundle
from daemon.service import Service
from daemon.training.synthetic import FEATURES, generate_dataset
from daemon.training.train import train
from daemon.watch import describe
from tests.broker import REPO, Broker
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING
from tests.mqtt_client import Publisher

S = Settings()


def test_alert_line_names_the_state_and_severity() -> None:
    body = {"device_id": "p1", "state": "resolved", "severity": "major",
            "explanation": "within normal parameters"}
    line = describe("anomaly/p1/alert", orjson.dumps(body), S)
    assert line == "ALERT   p1 resolved [major] within normal parameters"
    back = {**body, "state": "raised", "flapping": True, "resolve_after": 40,
            "explanation": "vibration 12.4 is 24.0σ above normal"}
    assert describe("anomaly/p1/alert", orjson.dumps(back), S) == (
        "ALERT   p1 raised (flapping: resolves after 40 normal readings) [major] "
        "vibration 12.4 is 24.0σ above normal")


def test_verdict_and_dead_letter_lines() -> None:
    verdict = {"device_id": "p2", "seq": 7, "is_anomaly": True, "anomaly_score": 4.5,
               "confidence": 0.97, "explanation": "vibration 12.4 is 24.0σ above normal"}
    assert describe("anomaly/p2/verdict", orjson.dumps(verdict), S).startswith(
        "ANOMALY p2 seq=7 score=4.500 conf=0.97 vibration"
    )
    tagged = {**verdict, "warming_up": True, "repeat": True,
              "silenced_until": "2026-11-27T02:00:00.000Z"}
    assert describe("anomaly/p2/verdict", orjson.dumps(tagged), S).startswith(
        "ANOMALY p2 seq=7 score=4.500 conf=0.97 [warming up] [repeat] [silenced] vibration"
    )
    dead = {"device_id": "p3", "reason": "not_json", "detail": "line 1"}
    assert describe("anomaly/dead-letter", orjson.dumps(dead), S) == (
        "DEAD-LETTER p3: not_json: line 1"
    )


def test_garbage_is_shown_not_raised() -> None:
    assert describe("anomaly/x/verdict", b"\xff\xfe", S).startswith("anomaly/x/verdict ")


def test_presence_lines() -> None:
    quiet = {"device_id": "p4", "state": "quiet", "last_seen": "2026-11-27T03:00:00.000Z",
             "quiet_for_s": 301.0, "quiet_after_s": 300.0}
    assert describe("anomaly/p4/presence", orjson.dumps(quiet), S) == (
        "QUIET   p4: no reading judged since 2026-11-27T03:00:00.000Z"
    )
    back = {**quiet, "state": "reporting", "quiet_for_s": 912.5}
    assert describe("anomaly/p4/presence", orjson.dumps(back), S) == (
        "BACK    p4: reporting again after 912.5 s"
    )
    new = {**back, "quiet_for_s": 0.0, "first_seen": True}
    assert describe("anomaly/p4/presence", orjson.dumps(new), S) == "NEW     p4: reporting"


def test_a_batch_verdict_in_parts_says_which_part() -> None:
    whole = {"device_id": "p5", "total_samples": 30, "anomalies_detected": 2, "predictions": []}
    assert describe("anomaly/p5/verdict", orjson.dumps(whole), S) == (
        "batch   p5 2/30 anomalous")
    part = {**whole, "part": 2, "parts": 3, "predictions": [{"is_anomaly": True}]}
    assert describe("anomaly/p5/verdict", orjson.dumps(part), S) == (
        "batch   p5 2/30 anomalous (part 2 of 3, with 1 of them)")


def test_retained_states_and_deletions_are_told_from_news() -> None:
    from daemon.watch import line_for

    settings = Settings()
    alert = orjson.dumps({"device_id": "p-1", "state": "raised", "severity": "major",
                          "explanation": "x"})
    news = line_for("anomaly/p-1/alert", alert, False, settings)
    assert news.startswith("ALERT   p-1 raised") and "retained" not in news
    old = line_for("anomaly/p-1/alert", alert, True, settings)
    assert old == news + " (retained: the last state, not new)"
    assert line_for("anomaly/p-1/alert", b"", True, settings) == (
        "CLEARED anomaly/p-1/alert (its retained state deleted)")


def test_every_verdict_that_does_not_count_the_usual_way_is_tagged() -> None:
    """A partial window's verdict (a new device's first readings) feeds no alert: an
    untagged ANOMALY line would say a new device is in trouble when no one is paged."""
    verdict = {"device_id": "p6", "seq": 1, "is_anomaly": True, "anomaly_score": 4.543,
               "threshold": 0.68, "confidence": 1.0, "warming_up": False,
               "window_filling": True, "explanation": "vibration [std 5] 4.16 is 41σ above"}
    assert describe("anomaly/p6/verdict", orjson.dumps(verdict), S) == (
        "ANOMALY p6 seq=1 score=4.543 conf=1.00 [window filling] "
        "vibration [std 5] 4.16 is 41σ above")
    every = {**verdict, "warming_up": True, "repeat": True, "late": True,
             "silenced_until": "2026-11-27T02:00:00.000Z"}
    assert describe("anomaly/p6/verdict", orjson.dumps(every), S).startswith(
        "ANOMALY p6 seq=1 score=4.543 conf=1.00 "
        "[warming up] [repeat] [late] [window filling] [silenced] vibration")
    # over the model's threshold, yet normal: the device's own baseline overruled it
    overruled = {**verdict, "is_anomaly": False, "window_filling": False,
                 "baseline": {"score": 1.0, "threshold": 2.0, "is_anomaly": False},
                 "explanation": "within normal parameters"}
    assert describe("anomaly/p6/verdict", orjson.dumps(overruled), S) == (
        "normal  p6 seq=1 score=4.543 conf=1.00 [overruled by its baseline] "
        "within normal parameters")
    agreed = {**overruled, "anomaly_score": 0.2}
    assert "[" not in describe("anomaly/p6/verdict", orjson.dumps(agreed), S)


def test_a_batch_line_counts_its_tagged_and_refused_entries() -> None:
    preds = [{"index": i, "is_anomaly": i == 6, "warming_up": False,
              **({"window_filling": True} if i < 4 else {})} for i in range(7)]
    batch = {"device_id": "p7", "total_samples": 7, "anomalies_detected": 1,
             "rejected": 2, "predictions": preds}
    assert describe("anomaly/p7/verdict", orjson.dumps(batch), S) == (
        "batch   p7 1/7 anomalous, 2 refused [4 window filling]")


def test_anomalies_only_hides_normal_verdicts_and_batches_with_no_anomaly() -> None:
    from daemon.watch import shown

    def seen(topic: str, body: dict[str, object]) -> str | None:
        return shown(topic, orjson.dumps(body), False, S, anomalies_only=True)

    normal = {"device_id": "p8", "seq": 1, "is_anomaly": False, "anomaly_score": 0.1,
              "confidence": 0.9, "explanation": "within normal parameters"}
    assert seen("anomaly/p8/verdict", normal) is None
    assert seen("anomaly/p8/verdict", {**normal, "is_anomaly": True}) is not None
    preds = [{"index": i, "is_anomaly": False} for i in range(5)]
    calm = {"device_id": "p8", "total_samples": 5, "anomalies_detected": 0,
            "predictions": preds}
    assert seen("anomaly/p8/verdict", calm) is None
    troubled = {**calm, "anomalies_detected": 1,
                "predictions": [*preds[:4], {"index": 4, "is_anomaly": True}]}
    assert seen("anomaly/p8/verdict", troubled) == "batch   p8 1/5 anomalous"
    # a split verdict's parts carry the whole message's count: a part is shown if any of
    # its own readings is anomalous
    calm_part = {**troubled, "part": 1, "parts": 2, "predictions": preds[:3]}
    assert seen("anomaly/p8/verdict", calm_part) is None
    troubled_part = {**troubled, "part": 2, "parts": 2, "predictions": troubled["predictions"][3:]}
    assert seen("anomaly/p8/verdict", troubled_part) == (
        "batch   p8 1/5 anomalous (part 2 of 2, with 1 of them)")
    # and the rest is shown as without --anomalies
    alert = {"device_id": "p8", "state": "resolved", "severity": "minor", "explanation": "x"}
    assert seen("anomaly/p8/alert", alert) == "ALERT   p8 resolved [minor] x"
    assert seen("anomaly/dead-letter", {"device_id": "p8", "reason": "not_json",
                                        "detail": "d"}) == "DEAD-LETTER p8: not_json: d"
    assert shown("anomaly/p8/alert", b"", True, S, anomalies_only=True) == (
        "CLEARED anomaly/p8/alert (its retained state deleted)")


def test_a_resolved_alert_names_who_acknowledged_it() -> None:
    resolved = {"device_id": "p13", "state": "resolved", "severity": "major",
                "acknowledged": {"at": "t", "by": "alice", "note": None},
                "explanation": "within normal parameters"}
    assert describe("anomaly/p13/alert", orjson.dumps(resolved), S) == (
        "ALERT   p13 resolved (acknowledged by alice) [major] within normal parameters")


def test_a_dead_letter_without_a_device_names_its_topic() -> None:
    dead = {"reason": "bad_device_id", "device_id": None, "topic": "sensors/bad id/readings",
            "detail": "topic 'sensors/bad id/readings' does not match 'sensors/+/readings'"}
    assert describe("anomaly/dead-letter", orjson.dumps(dead), S) == (
        "DEAD-LETTER topic 'sensors/bad id/readings': bad_device_id: "
        "topic 'sensors/bad id/readings' does not match 'sensors/+/readings'")
    refused = {"device_id": "p9", "reason": "missing_feature", "detail": "no 'vibration'",
               "rejections": [{"reason": "missing_feature"}] * 2, "rejections_omitted": 1}
    assert describe("anomaly/dead-letter", orjson.dumps(refused), S) == (
        "DEAD-LETTER p9: missing_feature: no 'vibration' (+2 more)")


def test_the_daemons_status_and_markers_are_no_verdicts() -> None:
    """Where a result template holds the device id inside a level, watch subscribes to
    that whole level (``results/+``), which also brings the daemon's retained
    "online"/"offline" on ``results/status`` and its handover markers to watch."""
    from daemon.config import TopicsConfig
    from daemon.watch import shown, template_filter

    beside = Settings(topics=TopicsConfig(presence="results/presence-{device_id}",
                                          status="results/status"))
    assert template_filter(beside.topics.presence) == "results/+"  # takes the status too
    assert shown("results/status", b"online", True, beside) == (
        "STATUS  anomalyd online (retained: the last state, not new)")
    assert shown("results/status", b"offline", False, beside,
                 anomalies_only=True) == "STATUS  anomalyd offline"
    assert shown("anomaly/status/handover/1e5a09c2", b"0123456789", False, S) is None
    presence = {"state": "quiet", "last_seen": "t", "quiet_after_s": 300.0}
    # the device its topic names, when the message does not
    assert shown("results/presence-p10", orjson.dumps(presence), False, beside) == (
        "QUIET   p10: no reading judged since t")


def test_odd_fields_are_shown_not_raised() -> None:
    """A field missing, null or of another type must not end watch with a traceback (an
    exception in paho's message callback ends its loop)."""
    from daemon.watch import shown

    verdict = {"device_id": "p11", "seq": 3, "is_anomaly": True, "anomaly_score": 4.5,
               "threshold": 0.7, "confidence": 0.9, "explanation": "x",
               "baseline": {"is_anomaly": False}, "acknowledged": {"by": "a"}}
    batch = {"device_id": "p11", "total_samples": 2, "anomalies_detected": 1, "rejected": 0,
             "part": 1, "parts": 2, "predictions": [{"is_anomaly": True}]}
    alert = {"device_id": "p11", "state": "acknowledged", "severity": "major",
             "acknowledged": {"by": "a", "note": "n"}, "flapping": True, "resolve_after": 20}
    dead = {"device_id": "p11", "reason": "late", "detail": "d", "topic": "t",
            "rejections": [], "rejections_omitted": 0}
    presence = {"device_id": "p11", "state": "quiet", "quiet_after_s": 1.0}
    for topic, body in [("anomaly/p11/verdict", verdict), ("anomaly/p11/verdict", batch),
                        ("anomaly/p11/alert", alert), ("anomaly/dead-letter", dead),
                        ("anomaly/p11/presence", presence)]:
        for key in body:
            for odd in (None, "x", [], {}, True, -1, 1e300):
                for retained in (False, True):
                    line = shown(topic, orjson.dumps({**body, key: odd}), retained, S)
                    assert line is None or isinstance(line, str)
            assert isinstance(shown(topic, orjson.dumps(
                {k: v for k, v in body.items() if k != key}), False, S), str)
    assert shown("anomaly/p11/verdict", b"online", False, S, anomalies_only=True) == (
        "anomaly/p11/verdict b'online'")


class Watching:
    """``anomalyd watch`` run as a user runs it, against a test broker: its stdout lines
    as they come, waited for by content (never by time)."""

    def __init__(self, b: Broker, *flags: str, head: int = 0) -> None:
        """``head``: like ``| head -n``, close the pipe after that many lines."""
        self.head = head
        env = {**os.environ, "MQTT_HOST": b.host, "MQTT_PORT": str(b.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "watch", *flags], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
            if len(self.lines) == self.head:
                self.proc.stdout.close()
                break
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, start: str, count: int = 1) -> list[str]:
        """The lines beginning with ``start``, once there are ``count`` of them (a failure
        after 30 s: a guard, not a measurement)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len([s for s in self.lines if s.startswith(start)]) >= count
                or not self.reader.is_alive(), timeout=30)
            found = [s for s in self.lines if s.startswith(start)]
        assert ok and len(found) >= count, f"no {count} lines {start!r} in {self.lines}"
        return found

    def stop(self) -> str:
        """Ctrl-C, as a user stops it; what it said on stderr."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=20)
        self.reader.join(5)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def watch_on() -> Iterator[Callable[..., Watching]]:
    """Start ``anomalyd watch`` processes; any still running at teardown is killed."""
    started: list[Watching] = []

    def start(b: Broker, *flags: str, head: int = 0) -> Watching:
        started.append(Watching(b, *flags, head=head))
        return started[-1]

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def windowed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pump models over windows of 5 readings: a new device's first 4 verdicts are a
    partial window's (``window_filling``)."""
    out = tmp_path_factory.mktemp("windowed") / "m"
    x, _, _ = generate_dataset(3000, seed=0)
    train(x, FEATURES, out, source="test", window=5)
    return out


@pytest.mark.integration
def test_watch_against_the_daemon_and_mosquitto(
    fresh_broker: Broker, start_daemon: Callable[..., Service], windowed_dir: Path,
    publisher_for: Callable[[Broker], Publisher], watch_on: Callable[..., Watching],
) -> None:
    """The tester's three findings as a user saw them: a new device's verdicts untagged,
    ``--anomalies`` showing a batch with no anomaly, ``DEAD-LETTER None`` for a reading on
    a topic that names no valid device."""
    b = fresh_broker
    start_daemon(b, model=load_bundle(windowed_dir))
    pub = publisher_for(b)
    # a retained message each watch prints once subscribed: then nothing is missed
    probe = orjson.dumps({"device_id": "probe", "state": "quiet", "quiet_after_s": 1.0})
    pub.client.publish("anomaly/probe/presence", probe, qos=1, retain=True).wait_for_publish(5)
    everything, anomalies = watch_on(b), watch_on(b, "--anomalies")
    for w in (everything, anomalies):
        w.wait_for("QUIET   probe")

    for seq in (1, 2, 3):
        pub.send("sensors/new-1/readings", {**NORMAL_READING, "seq": seq})
    pub.send("sensors/new-1/readings", {**ANOMALOUS_READING, "seq": 4})
    pub.send("sensors/calm-1/readings", {"readings": [NORMAL_READING] * 5})
    pub.send("sensors/hit-1/readings", {"readings": [NORMAL_READING] * 6 + [ANOMALOUS_READING]})
    pub.send("sensors/bad id/readings", NORMAL_READING)

    normal = everything.wait_for("normal  new-1", count=3)
    assert all(" [window filling] " in line for line in normal)
    (anomaly,) = everything.wait_for("ANOMALY new-1 seq=4 ")
    assert " [window filling] " in anomaly
    calm = "batch   calm-1 0/5 anomalous [4 window filling]"
    hit = "batch   hit-1 1/7 anomalous [4 window filling]"
    assert everything.wait_for("batch   calm-1 ") == [calm]
    assert everything.wait_for("batch   hit-1 ") == [hit]
    (dead,) = everything.wait_for("DEAD-LETTER ")
    assert dead.startswith("DEAD-LETTER topic 'sensors/bad id/readings': bad_device_id: ")

    # everything the daemon published is at the broker: a message published now reaches
    # the --anomalies watch after all of it
    pub.send("anomaly/probe/presence", {**orjson.loads(probe), "state": "reporting",
                                        "quiet_for_s": 1.0})
    anomalies.wait_for("BACK    probe")
    shown = anomalies.lines
    assert shown[-1] == "BACK    probe: reporting again after 1.0 s"
    assert sorted(shown[1:-1]) == sorted([anomaly, hit, dead])  # no normal verdict, no calm
    pub.client.publish("anomaly/probe/presence", b"", qos=1, retain=True).wait_for_publish(5)
    for w in (everything, anomalies):
        err = w.stop()
        # a Ctrl-C is no lost connection
        assert "connection lost" not in err and "Traceback" not in err, err


@pytest.mark.integration
def test_watch_into_a_pipe_closed_early_ends_quietly(
    fresh_broker: Broker, publisher_for: Callable[[Broker], Publisher],
    watch_on: Callable[..., Watching],
) -> None:
    """``anomalyd watch | head -1``: once head has its line and is gone, watch ends
    without a traceback (a BrokenPipeError in paho's callback ended it with one)."""
    b = fresh_broker
    pub = publisher_for(b)
    probe = orjson.dumps({"device_id": "probe", "state": "quiet", "quiet_after_s": 1.0})
    pub.client.publish("anomaly/probe/presence", probe, qos=1, retain=True).wait_for_publish(5)
    w = watch_on(b, head=1)
    w.wait_for("QUIET   probe")
    w.reader.join(5)  # the reader of the pipe is gone
    verdict = {"device_id": "p12", "is_anomaly": True, "anomaly_score": 2.0, "confidence": 1}
    for seq in range(3):  # the first may still fit in the pipe's buffer
        pub.send("anomaly/p12/verdict", {**verdict, "seq": seq})
    assert w.proc.wait(timeout=30) == 0
    assert w.proc.stderr is not None
    err = w.proc.stderr.read()
    assert "Traceback" not in err, err


def test_a_device_id_inside_a_topic_level_gives_a_filter_of_that_whole_level() -> None:
    """``verdict = "results/verdict-{device_id}"`` is served by the daemon; watch built
    ``results/verdict-+`` from it, which is no MQTT filter, and died (a tester)."""
    from daemon.config import TopicsConfig
    from daemon.watch import template_filter, topic_kind

    assert template_filter("anomaly/{device_id}/verdict") == "anomaly/+/verdict"
    assert template_filter("results/verdict-{device_id}") == "results/+"
    settings = Settings(topics=TopicsConfig(verdict="results/verdict-{device_id}",
                                            alert="results/alert-{device_id}"))
    # what the wider filter takes is told apart by the template
    assert topic_kind("results/verdict-p1", settings) == ("verdict", "p1")
    assert topic_kind("results/alert-p1", settings) == ("alert", "p1")
    assert topic_kind("results/other", settings) == ("", None)


def test_results_under_the_status_topic_are_results_not_markers() -> None:
    """Status ``factory/anomalyd`` and verdicts under it: watch took every one for a
    handover marker and showed nothing (a review found it). Only a marker's exact shape
    is one."""
    from daemon.config import TopicsConfig
    from daemon.watch import topic_kind

    nested = Settings(topics=TopicsConfig(
        status="factory/anomalyd", verdict="factory/anomalyd/{device_id}/verdict",
        alert="factory/anomalyd/{device_id}/alert",
        presence="factory/anomalyd/{device_id}/presence"))
    assert topic_kind("factory/anomalyd/pump-1/verdict", nested) == ("verdict", "pump-1")
    assert topic_kind("factory/anomalyd/handover/0a1b2c3d", nested) == ("marker", None)
