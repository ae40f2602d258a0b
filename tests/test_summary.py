"""The scorer's summary line (``daemon.summary``): the first batch at once, then at most
once a period, with what was judged since."""

from __future__ import annotations

from daemon.pipeline import BatchStats
from daemon.summary import ScoredSummary


def stats(readings: int, anomalies: int = 0, rejected: int = 0) -> BatchStats:
    return BatchStats(messages=readings + rejected, readings=readings, anomalies=anomalies,
                      rejected=rejected)


def test_the_first_batch_is_said_at_once_then_each_period_what_came_since() -> None:
    s = ScoredSummary(every_s=60.0)
    assert not s.due(0.0)  # nothing judged yet: nothing to say
    s.add(stats(5, anomalies=1), 0.002)
    assert s.due(0.0)
    assert s.take(0.0) == {"batches": 1, "messages": 5, "readings": 5, "anomalies": 1,
                           "rejected": 0, "max_latency_ms": 2.0, "period_s": None}
    s.add(stats(10, rejected=2), 0.004)
    s.add(stats(3), 0.001)
    assert not s.due(59.9)
    assert s.due(60.0)
    assert s.take(60.5) == {"batches": 2, "messages": 15, "readings": 13, "anomalies": 0,
                            "rejected": 2, "max_latency_ms": 4.0, "period_s": 60.5}
    assert not s.due(200.0)  # idle since: no line


def test_repeats_and_late_readings_are_counted_when_there_are_any() -> None:
    """A device (or the simulator) that counted its seq anew within 64 of its old highest
    had its readings taken for repeats: the line said 30 readings, 0 anomalies, and its
    raised alert never resolved, with nothing in the line to say why."""
    s = ScoredSummary(every_s=60.0)
    s.add(BatchStats(messages=30, readings=30, repeats=30), 0.001)
    assert s.take(0.0)["repeats"] == 30
    s.add(BatchStats(messages=4, readings=4, repeats=1, late=2), 0.001)
    s.add(BatchStats(messages=1, readings=1, late=1), 0.001)
    said = s.take(60.0)
    assert said["repeats"] == 1 and said["late"] == 3
