"""Per-device rate limiting: a token bucket per device id, in readings per second.

Pure: the current time is passed in. A message is let through while its device has at
least one token; a batch message then charges one token per reading, which may leave the
bucket in debt, so batching cannot be used to get past the limit. Memory is bounded: when
``max_devices`` buckets exist, the ones that have refilled completely (equivalent to no
bucket at all) are dropped.
"""

from __future__ import annotations


class DeviceRateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_devices: int = 100_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_devices = max_devices
        self._buckets: dict[str, list[float]] = {}  # device -> [tokens, last refill time]

    def allow(self, device: str, now: float) -> bool:
        """True (and one token taken) if ``device`` may send one more reading now."""
        bucket = self._buckets.get(device)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._evict(now)
            self._buckets[device] = [self.burst - 1.0, now]
            return True
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
        full = [
            d for d, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for d in full:
            del self._buckets[d]
        if len(self._buckets) >= self.max_devices:
            # Every bucket is in use: forget the one idle longest.
            oldest = min(self._buckets, key=lambda d: self._buckets[d][1])
            del self._buckets[oldest]

    def __len__(self) -> int:
        return len(self._buckets)
