"""Per-device token buckets: burst, refill, batch debt, bounded memory."""

from __future__ import annotations

import pytest

from daemon.ratelimit import DeviceRateLimiter


def test_burst_then_refill_at_the_rate() -> None:
    lim = DeviceRateLimiter(rate_per_s=2.0, burst=3)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("a", 0.4) is False  # 0.8 token: not yet
    assert lim.allow("a", 0.5) is True  # 1 token after 0.5 s at 2/s
    assert lim.allow("b", 0.5) is True  # another device has its own bucket


def test_a_batch_message_charges_every_reading() -> None:
    lim = DeviceRateLimiter(rate_per_s=10.0, burst=10)
    assert lim.allow("a", 0.0)
    lim.charge("a", 99, 0.0)  # a batch of 100 readings: 90 tokens of debt
    assert lim.allow("a", 5.0) is False  # 50 tokens earned, still 40 in debt
    assert lim.allow("a", 9.1) is True


def test_memory_is_bounded_by_max_devices() -> None:
    lim = DeviceRateLimiter(rate_per_s=1.0, burst=5, max_devices=100)
    for i in range(1000):
        lim.allow(f"d{i}", float(i) * 0.001)
    assert len(lim) <= 100


def test_a_flood_of_new_ids_pushes_out_the_devices_heard_from_least_recently() -> None:
    lim = DeviceRateLimiter(rate_per_s=0.001, burst=2, max_devices=3)
    for d in ("a", "b", "c"):
        lim.allow(d, 0.0)  # one token left each, refilling slowly
    lim.allow("a", 1.0)  # "a" was heard from again: "b" is now the least recent
    lim.allow("new", 2.0)
    assert lim.allow("a", 3.0) is False  # its bucket was kept: still empty
    assert lim.allow("c", 3.0) is True and lim.allow("c", 3.0) is False  # kept too
    assert lim.allow("b", 3.0) is True and lim.allow("b", 3.0) is True  # dropped: anew
    assert len(lim) == 3


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (1.0, 0)])
def test_nonsense_settings_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        DeviceRateLimiter(rate, burst)
