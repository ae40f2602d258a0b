"""`anomalyd watch`: one readable line per verdict, alert state, dead letter and presence."""

from __future__ import annotations

import orjson

from daemon.config import Settings
from daemon.watch import describe

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
    part = {**whole, "part": 2, "parts": 3}
    assert describe("anomaly/p5/verdict", orjson.dumps(part), S) == (
        "batch   p5 2/30 anomalous (part 2 of 3)")


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
