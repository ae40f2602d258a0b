"""The per-device alert state machine: every transition, and no repeats while a state holds."""

from __future__ import annotations

import orjson
import pytest

from daemon import state
from daemon.alerts import AlertTracker
from daemon.config import AlertConfig, TopicsConfig
from daemon.models import ModelBundle
from daemon.pipeline import Pipeline, RawMessage
from daemon.readings import Decoder
from tests.conftest_models import ANOMALOUS_READING, NORMAL_READING


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


def test_an_alert_back_soon_after_resolving_needs_twice_the_normal_run_each_time() -> None:
    """An intermittent fault: each raise within twice the last all-clear's run doubles
    the run the next all-clear needs (m=2: 2, 4, 8, then capped at 2**2 × 2 = 8)."""
    t = AlertTracker(raise_after=1, window=1, resolve_after=2, backoff_max=2)
    needs, flapping = [], []
    for run in range(5):
        ev = t.observe("d", True, "minor", 1.0, float(run))
        assert ev is not None and ev.transition == "raised"
        needs.append(ev.resolve_after)
        flapping.append(ev.flapping)
        got = feed(t, "." * ev.resolve_after)
        assert got[-1] == "resolved" and got[:-1] == [None] * (ev.resolve_after - 1)
        feed(t, ".")  # back within one verdict of the all-clear: soon
    assert needs == [2, 4, 8, 8, 8]
    assert flapping == [False, True, True, True, True]


def test_a_device_normal_for_longer_than_soon_starts_again_from_m() -> None:
    t = AlertTracker(raise_after=1, window=1, resolve_after=2)
    assert feed(t, "x..x....") == ["raised", None, "resolved", "raised", None, None, None,
                                   "resolved"]  # the second needed 4
    feed(t, "." * 8)  # twice the last all-clear's run (4): the next verdict is not soon
    ev = t.observe("d", True, "minor", 1.0, 99.0)
    assert ev is not None and ev.transition == "raised"
    assert ev.resolve_after == 2 and not ev.flapping
    # at the edge: a raise at exactly twice the run is still soon
    t2 = AlertTracker(raise_after=1, window=1, resolve_after=2)
    feed(t2, "x.." + "." * 3)  # resolved, then 3 normal: the 4th verdict after it is a raise
    ev = t2.observe("d", True, "minor", 1.0, 99.0)
    assert ev is not None and ev.flapping and ev.resolve_after == 4


def test_no_backoff_when_it_is_off_and_the_flaps_survive_a_restart() -> None:
    off = AlertTracker(raise_after=1, window=1, resolve_after=2, backoff_max=0)
    assert feed(off, "x..x..x..") == ["raised", None, "resolved"] * 3
    t = AlertTracker(raise_after=1, window=1, resolve_after=2)
    feed(t, "x..x")  # raised again soon: needs 4
    summary = t.summary("d")
    assert summary is not None and summary["flapping"] and summary["resolve_after"] == 4
    saved = orjson.loads(state.encode(t.to_json()))  # as written and read back
    copy = AlertTracker(raise_after=1, window=1, resolve_after=2)
    copy.restore(saved)
    assert feed(copy, "....") == [None, None, None, "resolved"]
    # state saved before flaps were kept restores as not flapping; a bad count is refused
    for raw in saved["devices"].values():
        del raw["flaps"], raw["since_resolved"]
    old = AlertTracker(raise_after=1, window=1, resolve_after=2)
    old.restore(saved)
    assert feed(old, "..") == [None, "resolved"]
    saved["devices"]["d"]["flaps"] = 99
    with pytest.raises(ValueError, match="flap count"):
        AlertTracker(raise_after=1, window=1, resolve_after=2).restore(saved)


def test_alert_messages_say_how_many_normal_verdicts_resolve_them_and_if_flapping(
    model_bundle: ModelBundle,
) -> None:
    p = Pipeline(model_bundle, Decoder(model_bundle.features, model_bundle.detector_names),
                 TopicsConfig(), AlertConfig(raise_after=1, window=1, resolve_after=2))
    sent = [ANOMALOUS_READING, NORMAL_READING, NORMAL_READING, ANOMALOUS_READING]
    msgs = [RawMessage("sensors/p-1/readings", orjson.dumps(r), 0.0) for r in sent]
    outputs, _ = p.process(msgs, 1000.0)
    alerts = [orjson.loads(o.payload) for outs in outputs for o in outs if o.kind == "alert"]
    assert [(a["state"], a["resolve_after"], a["flapping"]) for a in alerts] == [
        ("raised", 2, False), ("resolved", 2, False), ("raised", 4, True)]
