"""Per-device rate limiting: a token bucket per device id, in readings per second.

Pure: the current time is passed in. A message is let through while its device has at
least one token; a batch message then charges one token per reading, which may leave the
bucket in debt, so batching cannot be used to get past the limit. Memory is bounded: when
``max_devices`` buckets exist, the ones that have refilled completely (equivalent to no
bucket at all) are dropped, the devices heard from least recently first, and if none
has, the one heard from least recently: a constant cost per new device (a scan of every
bucket per new device took 45 ms at 100,000 of them, which a flood of invented device
ids would have made the rule).
"""

from __future__ import annotations

from collections import OrderedDict


class DeviceRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_devices: int = 100_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_devices = max_devices
        # device -> [tokens, last refill time], the device heard from least recently first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def allow(self, device: str, now: float) -> bool:
        """True (and one token taken) if ``device`` may send one more reading now."""
        bucket = self._buckets.get(device)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._evict(now)
            self._buckets[device] = [self.burst - 1.0, now]
            return True
        self._buckets.move_to_end(device)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def charge(self, device: str, readings: int, now: float) -> None:
        """Take ``readings`` more tokens (a batch message beyond its first reading)."""
        if readings <= 0:
            return
        bucket = self._buckets.get(device)
        if bucket is not None:
            bucket[0] -= readings

    def _evict(self, now: float) -> None:
        """Make room for one more: drop the least recently heard devices while their
        bucket has refilled, and in any case one."""
        buckets = self._buckets
        while buckets:
            tokens, last = next(iter(buckets.values()))
            refilled = tokens + (now - last) * self.rate >= self.burst
            if not refilled and len(buckets) < self.max_devices:
                return
            buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
