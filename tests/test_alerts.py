"""The per-device alert state machine: every transition, and no repeats while a state holds."""

from __future__ import annotations

import pytest

from daemon.alerts import AlertTracker


def feed(t: AlertTracker, flags: str, sev: str = "minor", dev: str = "d") -> list[str | None]:
    """Feed verdicts written as a string ('x' anomalous, '.' normal); the transitions."""
    out = []
    for i, c in enumerate(flags):
        ev = t.observe(dev, c == "x", sev, 1.0, float(i))
        out.append(ev.transition if ev else None)
    return out


def test_fewer_than_k_of_n_anomalous_verdicts_raise_nothing() -> None:
    t = AlertTracker(raise_after=3, window=5, resolve_after=2)
    assert feed(t, "xx...xx...x.x..") == [None] * 15
    assert not t.is_active("d")


def test_k_of_the_last_n_raise_once_even_when_not_consecutive() -> None:
    t = AlertTracker(raise_after=3, window=5, resolve_after=10)
    got = feed(t, "x.x.x" + "xxxxx")
    assert got[:5] == [None, None, None, None, "raised"]
    assert got[5:] == [None] * 5  # no repeats while the alert holds
    assert t.is_active("d")


def test_severity_escalates_once_and_never_goes_down_while_active() -> None:
    t = AlertTracker(raise_after=1, window=1, resolve_after=3)
    assert t.observe("d", True, "minor", 0.5, 0.0).transition == "raised"  # type: ignore[union-attr]
    ev = t.observe("d", True, "critical", 12.0, 1.0)
    assert ev is not None and ev.transition == "escalated" and ev.severity == "critical"
    assert ev.raised_at == 0.0 and ev.peak_margin == 12.0
    assert t.observe("d", True, "major", 4.0, 2.0) is None  # lower: no message
    assert t.observe("d", True, "critical", 11.0, 3.0) is None  # same: no repeat


def test_resolved_after_m_consecutive_normal_verdicts_and_an_anomaly_restarts_the_count() -> None:
    t = AlertTracker(raise_after=1, window=3, resolve_after=3)
    got = feed(t, "x..x...", sev="major")
    assert got == ["raised", None, None, None, None, None, "resolved"]
    assert not t.is_active("d")
    ev = t.devices  # the device starts over with an empty window
    assert list(ev["d"].recent) == []


def test_resolved_event_carries_the_alerts_severity_and_raise_time() -> None:
    t = AlertTracker(raise_after=2, window=2, resolve_after=1)
    t.observe("d", True, "major", 5.0, 10.0)
    t.observe("d", True, "major", 6.0, 11.0)
    ev = t.observe("d", False, "minor", -1.0, 12.0)
    assert ev is not None and ev.transition == "resolved"
    assert ev.severity == "major" and ev.raised_at == 11.0 and ev.peak_margin == 6.0


def test_after_resolving_a_new_alert_needs_k_fresh_anomalous_verdicts() -> None:
    t = AlertTracker(raise_after=2, window=3, resolve_after=1)
    assert feed(t, "xx.x") == [None, "raised", "resolved", None]
    assert feed(t, "x") == ["raised"]


def test_devices_are_independent() -> None:
    t = AlertTracker(raise_after=2, window=2, resolve_after=1)
    assert feed(t, "x", dev="a") == [None]
    assert feed(t, "x", dev="b") == [None]
    assert feed(t, "x", dev="a") == ["raised"]
    assert not t.is_active("b")


def test_state_round_trips_through_plain_data() -> None:
    t = AlertTracker(raise_after=2, window=4, resolve_after=3)
    feed(t, "x.x.", sev="major")
    copy = AlertTracker(raise_after=2, window=4, resolve_after=3)
    copy.restore(t.to_json())
    assert feed(copy, "..") == feed(t, "..") == [None, "resolved"]


@pytest.mark.parametrize(("k", "n", "m"), [(0, 5, 1), (6, 5, 1), (1, 1, 0)])
def test_impossible_settings_are_refused(k: int, n: int, m: int) -> None:
    with pytest.raises(ValueError, match=r"raise_after|resolve_after"):
        AlertTracker(raise_after=k, window=n, resolve_after=m)
