"""What the harness reads about a process from /proc and from the daemon's /metrics."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5)


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET from the daemon's HTTP port on loopback: (status, body); status 0 if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), bytes(r.read())
    except OSError as exc:
        code = getattr(exc, "code", 0)
        return int(code or 0), b""


_BUCKET = re.compile(r'^anomalyd_batch_size_bucket\{detector="([^"]+)",le="([^"]+)"\} (\S+)$')
_SUMCOUNT = re.compile(r'^anomalyd_batch_size_(sum|count)\{detector="([^"]+)"\} (\S+)$')


def batch_histogram(text: str) -> dict[str, float]:
    """Cumulative bucket counts ("le=..."), plus "sum" and "count", over all detectors."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m:
            out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(3))
            continue
        m = _SUMCOUNT.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out
