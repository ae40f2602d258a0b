"""Issue 5's harness: ``python -m bench.run [--quick] [--reps N] [--out results.json]``.

One machine, separate processes, loopback only: a Mosquitto (the repo's configuration on a
free port, via ``tests.broker.Broker``; a fresh one per system and repetition), the system
under test (the daemon, ``WORKERS=2`` daemons, or the bare paho echo of ``bench.echo``),
load generators (``bench.loadgen``) and a sink (``bench.sink``). Every process has a time
bound. Each repetition measures the echo and the daemon back to back, so ratios are same-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import procstat
from bench.loadgen import seq_span
from tests.broker import Broker, free_port

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Scale:
    probe: int = 200
    rate_seconds: float = 8.0
    flood: int = 30_000
    batch_readings: int = 200_000
    publishers: int = 2


QUICK = Scale(probe=50, rate_seconds=3.0, flood=8_000, batch_readings=40_000, publishers=2)


def write_rows(path: Path, streams: int = 40, n: int = 400) -> None:
    """Normal pump readings (no injected faults): one stream per device, in order.

    A device cycles through its ``n`` rows; with n = the daemon's warm-up (400) it keeps
    to the distribution its baseline was learnt from, so few verdicts are anomalies
    (the share is reported: anomalies cost explanations and alerts).
    """
    from daemon.training.synthetic import FEATURES, PumpStream

    out = []
    for i in range(streams):
        pump = PumpStream(f"pump-{i}", seed=i, fault_rate=0.0)
        out.append([[round(float(v[f]), 4) for f in FEATURES]
                    for v, _, _ in (pump.next() for _ in range(n))])
    path.write_text(json.dumps({"features": list(FEATURES), "streams": out}))


# -- systems under test ---------------------------------------------------------------


@dataclass
class System:
    name: str
    reply: list[str]  # what the sink subscribes to
    proc: subprocess.Popen[bytes]
    ports: list[int] = field(default_factory=list)
    ready_s: float = float("nan")

    def pids(self) -> list[int]:
        if self.name == "daemon-w2":
            return procstat.children(self.proc.pid)
        return [self.proc.pid]

    def cpu(self) -> float:
        return sum(procstat.cpu_seconds(p) for p in self.pids())

    def batch_hist(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for port in self.ports:
            _, body = procstat.http_get(port, "/metrics")
            for k, v in procstat.batch_histogram(body.decode()).items():
                total[k] = total.get(k, 0.0) + v
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_echo(port: int, work: Path) -> System:
    ready = work / "echo.ready"
    t0 = time.monotonic()
    proc = subprocess.Popen([PY, "-m", "bench.echo", "--port", str(port), "--ready", str(ready),
                             "--max-time", "900"], cwd=REPO)
    wait_until(ready.exists, 20, "echo ready")
    sysm = System("echo", ["echo/#"], proc)
    sysm.ready_s = time.monotonic() - t0
    return sysm


def start_daemon(port: int, work: Path, models: Path, workers: int, tag: str,
                 config: Path | None = None) -> System:
    http = free_port() if workers == 1 else _free_port_pair()
    env = dict(os.environ, MQTT_HOST="127.0.0.1", MQTT_PORT=str(port), MODEL_DIR=str(models),
               HEALTH_PORT=str(http), MQTT_CLIENT_ID=f"anomalyd-bench-{tag}",
               WORKERS=str(workers), STATE_DIR=str(work / f"state-{tag}"))
    log = (work / f"daemon-{tag}.log").open("wb")
    t0 = time.monotonic()
    cfg = ["--config", str(config)] if config else []
    proc = subprocess.Popen([PY, "-m", "daemon", *cfg, "run"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    ports = [http + i for i in range(workers)]
    name = "daemon" if workers == 1 else f"daemon-w{workers}"
    sysm = System(name, ["anomaly/+/verdict", "anomaly/dead-letter"], proc, ports)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}; see {log.name}")
        return all(procstat.http_get(p, "/ready", 0.5)[0] == 200 for p in ports)

    wait_until(ready, 30, "daemon /ready", poll=0.005)
    sysm.ready_s = time.monotonic() - t0
    return sysm


def _free_port_pair() -> int:
    for _ in range(50):
        p = free_port()
        if p < 65535:
            try:
                import socket

                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll)


# -- one measured phase ----------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, rows: Path, devices: int) -> None:
        self.work = work
        self.rows = rows
        self.devices = devices  # per load publisher
        self.next_seq = 1
        self.n = 0

    def _path(self, stem: str) -> Path:
        self.n += 1
        return self.work / f"{self.n:04d}-{stem}"

    def _seqs(self, count: int) -> int:
        base = self.next_seq
        self.next_seq += count + 1000
        return base

    def probe(self, sysm: System, port: int, count: int) -> dict[str, Any]:
        """Sequential single readings on an idle system: publish, wait for the reply."""
        out = self._path("probe.npy")
        base = self._seqs(count)
        subprocess.run([PY, "-m", "bench.loadgen", "--port", str(port), "--rows", str(self.rows),
                        "--out", str(out), "--probe", str(count), "--seq-base", str(base),
                        "--reply", sysm.reply[0], "--max-time", "60", "--prefix", "g9"],
                       cwd=REPO, check=True, timeout=90)
        rtt = np.load(out) * 1000
        return {"n": int(rtt.size), "p50_ms": float(np.median(rtt)),
                "p95_ms": float(np.percentile(rtt, 95)), "lost": count - int(rtt.size)}

    def load(self, sysm: System, port: int, total: int, rate: float, publishers: int,
             batch: int = 1) -> dict[str, Any]:
        """``total`` readings from ``publishers`` processes at ``rate`` (0 = flood)."""
        sink_out, ready = self._path("sink.npz"), self._path("sink.ready")
        share = total // publishers
        span = seq_span(share, self.devices, batch)  # each publisher's own seq values
        base = self._seqs(span * publishers)
        budget = (total / rate if rate else total / 500) + 60
        sink = subprocess.Popen(
            [PY, "-m", "bench.sink", "--port", str(port), "--expect", str(total),
             "--out", str(sink_out), "--ready", str(ready), "--max-time", str(budget + 30),
             *[a for f in sysm.reply for a in ("--filter", f)]], cwd=REPO)
        wait_until(ready.exists, 20, "sink ready")
        cpu0, hist0 = sysm.cpu(), sysm.batch_hist()
        gens, outs = [], []
        for g in range(publishers):
            out = self._path(f"gen{g}.npy")
            outs.append(out)
            gens.append(subprocess.Popen(
                [PY, "-m", "bench.loadgen", "--port", str(port), "--rows", str(self.rows),
                 "--out", str(out), "--prefix", publisher_prefix(g),
                 "--seq-base", str(base + g * span),
                 "--count", str(share), "--rate", str(rate / publishers), "--batch", str(batch),
                 "--devices", str(self.devices), "--max-time", str(budget)], cwd=REPO))
        for gproc in gens:
            gproc.wait(budget + 30)
        sink.wait(budget + 60)
        cpu1, hist1 = sysm.cpu(), sysm.batch_hist()
        return self._summarise(sysm, outs, sink_out, cpu1 - cpu0, hist0, hist1, rate)

    def _summarise(self, sysm: System, outs: list[Path], sink_out: Path,
                   cpu: float, hist0: dict[str, float], hist1: dict[str, float],
                   rate: float) -> dict[str, Any]:
        send_seq, send_t = [], []
        t_last_send = 0.0
        for out in outs:
            t = np.load(out)
            ok = ~np.isnan(t)
            send_seq.append(np.load(str(out) + ".seq.npy")[ok])
            send_t.append(t[ok])
            t_last_send = max(t_last_send, json.loads(Path(str(out) + ".json").read_text())[
                "t_last"])
        seq = np.concatenate(send_seq)
        ts = np.concatenate(send_t)
        recv = np.load(sink_out)
        rseq, rt = recv["seq"], recv["t"]
        # first arrival of each seq
        order = np.lexsort((rt, rseq))
        rseq, rt = rseq[order], rt[order]
        first = np.ones(rseq.size, dtype=bool)
        first[1:] = rseq[1:] != rseq[:-1]
        rseq, rt = rseq[first], rt[first]
        pos = np.searchsorted(rseq, seq)
        pos = np.minimum(pos, max(rseq.size - 1, 0))
        hit = (rseq.size > 0) & (rseq[pos] == seq) if rseq.size else np.zeros(seq.size, bool)
        lat = (rt[pos[hit]] - ts[hit]) * 1000
        delivered = int(hit.sum())
        t_first_send = float(ts.min())
        t_end = float(rt.max()) if rt.size else t_first_send
        res: dict[str, Any] = {
            "offered_rate": rate,
            "sent": int(seq.size),
            "delivered": delivered,
            "lost": int(seq.size) - delivered,
            "publish_rate": seq.size / max(t_last_send - t_first_send, 1e-9),
            "throughput": delivered / max(t_end - t_first_send, 1e-9),
            "cpu_s": cpu,
            "cpu_us_per_reading": cpu / max(delivered, 1) * 1e6,
        }
        if lat.size:
            res.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                       p99_ms=float(np.percentile(lat, 99)), max_ms=float(lat.max()))
        if hist1:
            res["batch_hist"] = {k: hist1.get(k, 0.0) - hist0.get(k, 0.0) for k in hist1}
        return res


# -- the run ---------------------------------------------------------------------------


def one_rep(runner: Runner, scale: Scale, models: Path, rep: int,
            config: Path | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("echo", "daemon", "daemon-w2", "daemon-w2-shared"):
        broker = Broker().start()  # a fresh broker per system: no sessions left over
        try:
            if kind == "echo":
                sysm = start_echo(broker.port, runner.work)
            else:
                cfg = shared_dispatch(config, runner.work) if kind.endswith("shared") else config
                sysm = start_daemon(broker.port, runner.work, models,
                                    1 if kind == "daemon" else 2, f"{rep}-{kind}", cfg)
            try:
                r: dict[str, Any] = {"ready_s": sysm.ready_s}
                print(f"[rep {rep}] {kind}: ready in {sysm.ready_s:.2f}s", flush=True)
                if kind == "daemon" or kind == "echo":
                    r["idle"] = runner.probe(sysm, broker.port, scale.probe)
                    for rate in (100, 1000):
                        r[f"rate_{rate}"] = runner.load(
                            sysm, broker.port, int(rate * scale.rate_seconds), rate, 1)
                r["flood"] = runner.load(sysm, broker.port, scale.flood, 0, scale.publishers)
                if kind == "daemon" or kind == "echo":
                    sat = round(0.9 * r["flood"]["throughput"], -1)
                    r["rate_sat"] = runner.load(sysm, broker.port,
                                                int(sat * scale.rate_seconds), sat,
                                                scale.publishers)
                # batch messages cost the broker little: the phase where CPU-bound scoring
                # could use a second core, so WORKERS=2 runs it too
                r["batch100"] = runner.load(sysm, broker.port, scale.batch_readings, 0,
                                            scale.publishers, batch=100)
                r["peak_rss_mib"] = [procstat.peak_rss_mib(p) for p in sysm.pids()]
                print(f"[rep {rep}] {kind}: " + summary_line(r), flush=True)
            finally:
                sysm.stop()
        finally:
            broker.stop()
        out[kind] = r
    return out


def shared_dispatch(config: Path | None, work: Path) -> Path:
    """``config`` (default: the repository's) with ``service.dispatch = "shared"``: WORKERS=2
    through an MQTT shared subscription, against the default device dispatch."""
    text = (config or REPO / "config" / "anomalyd.toml").read_text()
    text, replaced = re.subn(r'(?m)^dispatch\s*=.*$', 'dispatch = "shared"', text)
    if not replaced and "[service]" in text:
        text = text.replace("[service]", '[service]\ndispatch = "shared"', 1)
    elif not replaced:
        text += '\n[service]\ndispatch = "shared"\n'
    out = work / "shared-dispatch.toml"
    out.write_text(text)
    return out


def summary_line(r: dict[str, Any]) -> str:
    f = r["flood"]
    s = f"flood {f['throughput']:.0f}/s lost {f['lost']} cpu {f['cpu_us_per_reading']:.0f}us"
    if "rate_1000" in r:
        s += f" | 1000/s p99 {r['rate_1000'].get('p99_ms', float('nan')):.1f}ms"
        s += f" | idle p50 {r['idle']['p50_ms']:.2f}ms"
        s += f" | batch100 {r['batch100']['throughput']:.0f}/s"
    return s


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(int(mem) / 2**20, 1),
            "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "mosquitto": mosq.splitlines()[0] if mosq else "?",
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run (1 repetition, small counts)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--models", type=Path, default=None,
                   help="trained model set (default: train one into the work dir)")
    p.add_argument("--out", type=Path, default=Path("bench-results.json"))
    p.add_argument("--no-detectors", action="store_true", help="skip the scoring microbench")
    p.add_argument("--daemon-config", type=Path, default=None,
                   help="configuration file for the daemon (default: the repo's)")
    p.add_argument("--devices", type=int, default=100,
                   help="devices per load publisher (default 100; before 2026-11-27: 10, "
                        "which split 12 to 8 between two workers by device)")
    args = p.parse_args()
    scale = QUICK if args.quick else Scale()
    reps = args.reps or (1 if args.quick else 3)
    info = machine()
    print(f"machine: {info}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="anomalyd-bench-"))
    models = args.models
    if models is None:
        models = work / "models"
        subprocess.run([PY, "-m", "daemon", "train", "--out", str(models)], cwd=REPO,
                       check=True, timeout=300)
    rows = work / "rows.json"
    write_rows(rows)
    runner = Runner(work, rows, args.devices)
    split = device_split(scale.publishers, args.devices, 2)
    print(f"devices: {scale.publishers} publishers x {args.devices}; with WORKERS=2 by "
          f"device, each worker owns {split}", flush=True)
    results: dict[str, Any] = {"machine": info, "scale": scale.__dict__, "reps": [],
                               "devices_per_publisher": args.devices,
                               "device_split_2_workers": split,
                               "daemon_config": str(args.daemon_config or "config/anomalyd.toml"),
                               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                        cwd=REPO, capture_output=True,
                                                        text=True).stdout.strip()}
    for rep in range(reps):
        results["reps"].append(one_rep(runner, scale, models, rep, args.daemon_config))
        args.out.write_text(json.dumps(results, indent=1))
    if not args.no_detectors:
        det_out = work / "detectors.json"
        subprocess.run([PY, "-m", "bench.detectors", "--models", str(models), "--out",
                        str(det_out)] + (["--quick"] if args.quick else []),
                       cwd=REPO, check=True, timeout=900)
        results["detectors"] = json.loads(det_out.read_text())
    results["loadavg_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    print(report(results))
    print(f"raw results: {args.out}; work dir: {work}")


def device_split(publishers: int, devices: int, workers: int) -> list[int]:
    """How many of the load's devices each worker owns under device dispatch (the load
    spreads its readings evenly over the devices, so this is each worker's share)."""
    from bench.loadgen import device_id
    from daemon.partition import owner

    counts = [0] * workers
    for g in range(publishers):
        for d in range(devices):
            counts[owner(device_id(publisher_prefix(g), d), workers)] += 1
    return counts


def publisher_prefix(g: int) -> str:
    """The device-id prefix of the ``g``-th load publisher."""
    return f"g{g}"


# -- the report ------------------------------------------------------------------------


def _vals(results: dict[str, Any], path: str) -> list[float]:
    vals = []
    for rep in results["reps"]:
        node: Any = rep
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, int | float):
            vals.append(float(node))
    return vals


def med(results: dict[str, Any], path: str, fmt: str = "{:.0f}") -> str:
    vals = _vals(results, path)
    if not vals:
        return "–"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"


def ratio(results: dict[str, Any], num: str, den: str) -> str:
    vals = [a / b for a, b in zip(_vals(results, num), _vals(results, den), strict=True) if b]
    if not vals:
        return "–"
    m = statistics.median(vals)
    return f"{m:.2f} ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else f"{m:.2f}"


def report(r: dict[str, Any]) -> str:
    lines = ["", "| measure | echo | daemon | daemon ÷ echo |", "|---|---|---|---|"]
    rows = [
        ("single readings: sustained throughput (readings/s)", "flood.throughput", "{:.0f}"),
        ("single readings: lost", "flood.lost", "{:.0f}"),
        ("single readings: CPU µs per reading", "flood.cpu_us_per_reading", "{:.0f}"),
        ("batch-100 messages: readings/s", "batch100.throughput", "{:.0f}"),
        ("batch-100 messages: lost", "batch100.lost", "{:.0f}"),
        ("batch-100: CPU µs per reading", "batch100.cpu_us_per_reading", "{:.1f}"),
        ("idle single reading p50 (ms)", "idle.p50_ms", "{:.2f}"),
        ("100/s: p50 ms", "rate_100.p50_ms", "{:.2f}"),
        ("100/s: p99 ms", "rate_100.p99_ms", "{:.2f}"),
        ("1000/s: p50 ms", "rate_1000.p50_ms", "{:.2f}"),
        ("1000/s: p95 ms", "rate_1000.p95_ms", "{:.2f}"),
        ("1000/s: p99 ms", "rate_1000.p99_ms", "{:.2f}"),
        ("1000/s: max ms", "rate_1000.max_ms", "{:.1f}"),
        ("1000/s: lost", "rate_1000.lost", "{:.0f}"),
        ("0.9 × saturation: offered/s", "rate_sat.offered_rate", "{:.0f}"),
        ("0.9 × saturation: p50 ms", "rate_sat.p50_ms", "{:.1f}"),
        ("0.9 × saturation: p99 ms", "rate_sat.p99_ms", "{:.1f}"),
        ("0.9 × saturation: max ms", "rate_sat.max_ms", "{:.1f}"),
        ("0.9 × saturation: lost", "rate_sat.lost", "{:.0f}"),
        ("start to ready (s)", "ready_s", "{:.2f}"),
    ]
    for label, path, fmt in rows:
        lines.append(f"| {label} | {med(r, 'echo.' + path, fmt)} | "
                     f"{med(r, 'daemon.' + path, fmt)} | "
                     f"{ratio(r, 'daemon.' + path, 'echo.' + path)} |")
    rss = [max(rep["daemon"]["peak_rss_mib"]) for rep in r["reps"]]
    lines.append(f"| peak RSS MiB (VmHWM) | – | {statistics.median(rss):.0f} | |")
    lines += ["", "| WORKERS | flood readings/s | lost | CPU µs/reading | batch-100 readings/s "
              "| lost | CPU µs/reading | ready s |", "|---|---|---|---|---|---|---|---|"]
    for kind, label in (("daemon", "1"), ("daemon-w2", "2 (device dispatch)"),
                        ("daemon-w2-shared", "2 (shared dispatch)")):
        cells = [med(r, f"{kind}.{phase}.{m}") for phase in ("flood", "batch100")
                 for m in ("throughput", "lost", "cpu_us_per_reading")]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {med(r, kind + '.ready_s', '{:.2f}')} |")
    lines.append(f"| 2 ÷ 1 | {ratio(r, 'daemon-w2.flood.throughput', 'daemon.flood.throughput')}"
                 f" | | | {ratio(r, 'daemon-w2.batch100.throughput', 'daemon.batch100.throughput')}"
                 " | | | |")
    device_vs_shared = [ratio(r, f"daemon-w2.{phase}.throughput",
                              f"daemon-w2-shared.{phase}.throughput")
                        for phase in ("flood", "batch100")]
    lines.append("| device ÷ shared | {} | | | {} | | | |".format(*device_vs_shared))
    lines += ["", "batch-size distribution (readings per scored batch; share of batches):"]
    for phase in ("rate_100", "rate_1000", "flood", "rate_sat", "batch100"):
        h = r["reps"][-1]["daemon"].get(phase, {}).get("batch_hist")
        if h:
            lines.append(f"- {phase}: {histogram_text(h)}")
    if "detectors" in r:
        lines += ["", detectors_table(r["detectors"])]
    return "\n".join(lines)


def histogram_text(h: dict[str, float]) -> str:
    count = h.get("count", 0.0)
    if not count:
        return "no batches"
    edges = sorted((float(k), v) for k, v in h.items() if k not in ("sum", "count"))
    parts, prev = [], 0.0
    for le, cum in edges:
        if cum - prev > 0:
            label = f"≤{le:g}" if le != float("inf") else f">{edges[-2][0]:g}"
            parts.append(f"{label}: {100 * (cum - prev) / count:.0f}%")
        prev = cum
    return f"{count:.0f} batches, mean {h['sum'] / count:.1f}; " + ", ".join(parts)


def detectors_table(d: dict[str, Any]) -> str:
    sizes = d["sizes"]
    head = "| scorer | " + " | ".join(f"n={s}" for s in sizes) + " |"
    lines = ["scoring time per batch, ms (median of repeats; readings/s at the largest size)",
             "", head, "|---|" + "---|" * len(sizes)]
    for name, times in d["ms"].items():
        cells = [f"{t:.3f}" if t < 1 else f"{t:.1f}" for t in times]
        cells[-1] += f" ({sizes[-1] / times[-1] * 1000:,.0f}/s)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
