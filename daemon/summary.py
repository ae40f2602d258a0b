"""The scorer's INFO summary: what it did since its last summary line.

One line per micro-batch (``batch``, now DEBUG) was most of the log at any real rate (a
tester: 662 of 670 lines), burying the lines a person must see (``device_quiet``,
``model_reloaded``). So the first batch is said at once (the daemon is judging) and then,
at most once a ``every_s``, what was judged since. Pure: the caller gives the clock.
"""

from __future__ import annotations

from typing import Any

from daemon.pipeline import BatchStats

#: Seconds between two summary lines.
EVERY_S = 60.0


class ScoredSummary:
    def __init__(self, every_s: float = EVERY_S) -> None:
        self.every_s = every_s
        self._since: float | None = None  # when the last line was said; None: never
        self._reset()

    def _reset(self) -> None:
        self.batches = self.messages = self.readings = self.anomalies = self.rejected = 0
        self.repeats = self.late = 0
        self.max_latency_s = 0.0

    def add(self, stats: BatchStats, elapsed_s: float) -> None:
        self.batches += 1
        self.messages += stats.messages
        self.readings += stats.readings
        self.anomalies += stats.anomalies
        self.rejected += stats.rejected
        self.repeats += stats.repeats
        self.late += stats.late
        self.max_latency_s = max(self.max_latency_s, elapsed_s)

    def due(self, now: float) -> bool:
        return self.batches > 0 and (self._since is None or now - self._since >= self.every_s)

    def take(self, now: float) -> dict[str, Any]:
        """The line's fields, and a new period from ``now``."""
        fields = {"batches": self.batches, "messages": self.messages,
                  "readings": self.readings, "anomalies": self.anomalies,
                  "rejected": self.rejected,
                  "max_latency_ms": round(self.max_latency_s * 1000, 3),
                  "period_s": None if self._since is None else round(now - self._since, 1)}
        # readings judged that changed nothing (no window, baseline or alert), said when
        # there were any: 30 readings "normal" that resolved no alert, with no word why
        # (a device that counted its seq anew within 64 of its old highest)
        fields.update({k: v for k, v in (("repeats", self.repeats), ("late", self.late)) if v})
        self._since = now
        self._reset()
        return fields
