"""Timestamps in verdicts: ISO 8601 UTC, milliseconds, the same as datetime's formatting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from daemon.pipeline import iso


@pytest.mark.parametrize(
    "ts", [0.0, 1.5, 946684800.25, 1795694462.1485317, 1795694462.9994, 4102444799.999]
)
def test_iso_matches_datetime(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    assert iso(ts) == expected.replace("+00:00", "Z")


def test_iso_cache_does_not_leak_between_seconds() -> None:
    assert iso(1000.5).startswith("1970-01-01T00:16:40.500")
    assert iso(1001.25) == "1970-01-01T00:16:41.250Z"
    assert iso(1000.75) == "1970-01-01T00:16:40.750Z"
