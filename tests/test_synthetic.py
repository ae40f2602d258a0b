"""The synthetic pump: relations at the operating point, fault labels, per-device streams."""

from __future__ import annotations

import numpy as np

from daemon.training.synthetic import FAULTS, FEATURES, STATES, PumpStream, generate_dataset


def test_dataset_shapes_and_determinism() -> None:
    x, y, states = generate_dataset(2000, seed=4, fault_fraction=0.2)
    assert x.shape == (2000, len(FEATURES))
    assert y.dtype == bool
    assert set(states) == set(STATES)
    again = generate_dataset(2000, seed=4, fault_fraction=0.2)
    np.testing.assert_array_equal(again[0], x)
    assert not np.array_equal(generate_dataset(2000, seed=5)[0], x)
    assert 0.15 < y.mean() < 0.25
    assert np.isfinite(x).all()


def test_normal_readings_follow_the_duty_cycle() -> None:
    x, y, states = generate_dataset(5000, seed=0)
    assert not y.any()
    duty = x[:, FEATURES.index("duty_cycle")]
    for name, slope, intercept in [
        ("flow_rate", 200, 0),
        ("current", 60, 42.5),
        ("pressure", 5, 2.75),
        ("vibration", 2, 1.3),
        ("temperature", 15, 34),
    ]:
        fitted_slope, fitted_intercept = np.polyfit(duty, x[:, FEATURES.index(name)], 1)
        assert abs(fitted_slope - slope) < 0.1 * slope, name
        assert abs(fitted_intercept - intercept) < 0.05 * (intercept + slope), name
    for name, ((lo, hi), _) in STATES.items():
        in_state = duty[states == name]
        assert lo <= in_state.min() and in_state.max() <= hi


def test_faults_break_the_normal_relations() -> None:
    clean, _, _ = generate_dataset(3000, seed=9)
    faulty, y, _ = generate_dataset(3000, seed=9, fault_fraction=1.0)
    assert y.all()
    moved = np.abs(faulty - clean) / clean.std(axis=0)
    # every faulty row moves some feature by well over its normal spread... mostly
    assert (moved.max(axis=1) > 0.5).mean() > 0.95


def test_stream_is_deterministic_per_device_and_differs_between_devices() -> None:
    a1 = [PumpStream("pump-001", seed=1).next() for _ in range(1)]
    a2 = [PumpStream("pump-001", seed=1).next() for _ in range(1)]
    b = [PumpStream("pump-002", seed=1).next() for _ in range(1)]
    assert a1 == a2
    assert a1 != b
    reading, state, fault = a1[0]
    assert list(reading) == list(FEATURES)
    assert state in STATES
    assert fault is None or fault in FAULTS


def test_stream_faults_last_several_consecutive_readings() -> None:
    stream = PumpStream("pump-007", seed=3, fault_rate=0.02)
    faults = [stream.next()[2] for _ in range(5000)]
    runs: list[int] = []
    current = 0
    for fault in faults:
        if fault is not None:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    assert len(runs) > 10
    assert min(runs) >= 5
    assert max(runs) <= 60
    assert {f for f in faults if f} <= set(FAULTS)


def test_stream_readings_stay_physical_without_faults() -> None:
    stream = PumpStream("pump-quiet", seed=0, fault_rate=0.0)
    rows = [stream.next() for _ in range(3000)]
    duty = np.array([r[0]["duty_cycle"] for r in rows])
    flow = np.array([r[0]["flow_rate"] for r in rows])
    assert all(r[2] is None for r in rows)
    assert duty.min() >= 0.25 and duty.max() <= 1.0
    assert np.corrcoef(duty, flow)[0, 1] > 0.95
    assert len({r[1] for r in rows}) >= 2  # the pump changes operating state
