"""Fault-injection helpers: a TCP proxy that can cut a link, a paced QoS 1 load, a verdict
counter with a persistent session, the daemon as a real subprocess, a readiness probe, and
the per-reading tally (Jepsen's vocabulary: lost, duplicated, recovered).

``python -m tests.faults results.json`` prints the table that ``docs/reliability.md``
quotes from a run of ``ANOMALYD_FAULTS_REPORT=results.json pytest tests/test_faults.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.broker import REPO, free_port, free_ports
from tests.conftest_models import NORMAL_READING as NORMAL

DATA = REPO / "tests" / "data"
_LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


# -- a TCP proxy between the daemon and the broker ----------------------------------------


class _Packets:
    """MQTT packets out of a byte stream fed chunk by chunk (fixed header: the type in the
    first byte's high nibble, then the remaining length, 7 bits a byte)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The packets ``data`` completes: (type, bytes) each."""
        self.buffer += data
        packets = []
        while len(self.buffer) >= 2:
            length, shift, i = 0, 0, 1
            while i < len(self.buffer) and i <= 4:
                length |= (self.buffer[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not self.buffer[i - 1] & 0x80:
                    break
            else:
                break  # the length itself is not complete yet
            if len(self.buffer) < i + length:
                break
            packets.append((self.buffer[0] >> 4, self.buffer[:i + length]))
            self.buffer = self.buffer[i + length:]
        return packets


PUBLISH = 3  # the MQTT packet type


class _Link:
    """One proxied connection: two sockets and a pump thread per direction."""

    def __init__(self, proxy: Proxy, down: socket.socket, up: socket.socket) -> None:
        self.proxy = proxy
        self.down, self.up = down, up
        self.cut = False  # once blackholed, a link stays dead (its byte stream has a gap)
        self.closed = False
        self.packets = _Packets()  # broker->client, for hold_publishes()
        self.publishes = 0
        self.held: list[bytes] | None = None  # PUBLISH packets being held back
        self.lock = threading.Lock()  # the downward socket: the pump's and a release's

    def start(self) -> None:
        for src, dst, upward in ((self.down, self.up, True), (self.up, self.down, False)):
            threading.Thread(target=self._pump, args=(src, dst, upward), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        p = self.proxy
        try:
            while True:
                size = p.throttle_chunk if upward and p.throttle_chunk else 65536
                data = src.recv(size)
                if not data:
                    break
                if self.cut or p.mode == "blackhole":
                    self.cut = True
                    continue  # swallowed: neither side hears anything more
                if upward and p.throttle_chunk:
                    time.sleep(p.throttle_delay)
                if not upward and p.hold_s:
                    self._down(data)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        self.close()

    def _down(self, data: bytes) -> None:
        """Broker->client bytes, packet by packet, while ``Proxy.hold_publishes`` is on."""
        p = self.proxy
        for kind, packet in self.packets.feed(data):
            with self.lock:
                if kind == PUBLISH:
                    self.publishes += 1
                    if self.held is not None:
                        self.held.append(packet)
                        continue
                    if self.publishes == p.hold_after + 1 and p.hold_s:
                        self.held = [packet]
                        p.holds += 1
                        threading.Timer(p.hold_s, self._release).start()
                        continue
                self.down.sendall(packet)

    def _release(self) -> None:
        with self.lock, contextlib.suppress(OSError):
            held, self.held = self.held or [], None
            for packet in held:
                self.down.sendall(packet)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for s in (self.down, self.up):
            with contextlib.suppress(OSError):
                if reset:  # SO_LINGER 0: the socket's release sends RST instead of FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                # Wakes the pump blocked in recv() on it: until that returns, close() does
                # not release the socket (and no RST would leave until the next byte came).
                s.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
            s.close()


class Proxy:
    """Forwards 127.0.0.1:<port> to a broker. Modes:

    - ``pass``: forward bytes;
    - ``blackhole``: open links swallow every byte both ways and stay dead; new connections
      are refused with a reset (an unreachable route), so a client retries quickly;
    - ``reset()``: every open link is closed with RST at once.

    ``throttle(chunk, delay)``: daemon->broker bytes go ``chunk`` at a time, each after
    ``delay`` seconds: a slow result path.

    ``hold_publishes(after, seconds)``: on each link, the broker's PUBLISH packets after
    the first ``after`` are held back for ``seconds`` (then sent, in order), while its
    other packets (CONNACK, SUBACK, UNSUBACK, PUBACK) pass: a broker whose deliveries
    pause (busy saving its database, a packet lost on a long route) while it answers.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.mode = "pass"
        self.throttle_chunk = 0
        self.throttle_delay = 0.0
        self.hold_after = 0
        self.hold_s = 0.0
        self.holds = 0  # links that have held their publishes back
        self.links: list[_Link] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if self.mode == "blackhole":
                down.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                down.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, down, up)
            self.links = [x for x in self.links if not x.closed] + [link]
            link.start()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def heal(self) -> None:
        self.mode = "pass"

    def reset(self) -> None:
        for link in list(self.links):
            link.close(reset=True)

    def throttle(self, chunk: int, delay: float) -> None:
        self.throttle_delay, self.throttle_chunk = delay, chunk

    def unthrottle(self) -> None:
        self.throttle_chunk = 0

    def hold_publishes(self, after: int, seconds: float) -> None:
        self.hold_after, self.hold_s = after, seconds

    def close(self) -> None:
        self._listener.close()
        self.reset()


# -- load: a paced QoS 1 publisher that survives broker restarts ------------------------


class LoadPublisher:
    """Publishes one reading per tick, QoS 1, over a few devices, each numbering its own
    readings (``seq``) one by one.

    Records, per reading (by its place in the publishing order), when it was published
    and when (if ever) the broker acknowledged it. paho keeps unacknowledged QoS 1
    publishes and resends them after a reconnect.
    """

    def __init__(self, host: str, port: int, rate: float, devices: int = 4,
                 prefix: str = "fault") -> None:
        self.rate = rate
        self.devices = [f"{prefix}-{i}" for i in range(devices)]
        self.sent: dict[int, float] = {}
        self.infos: dict[int, paho.MQTTMessageInfo] = {}
        self._acks: list[tuple[int, float]] = []  # (mid, monotonic) as PUBACKs arrive
        self._stop = threading.Event()
        self._seq = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{free_port()}",
                                  protocol=paho.MQTTv311, clean_session=True)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_publish = lambda c, u, mid, rc, p: self._acks.append((mid, time.monotonic()))
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadPublisher:
        self._thread.start()
        return self

    def device_of(self, seq: int) -> str:
        return self.devices[seq % len(self.devices)]

    def key_of(self, seq: int) -> str:
        """The verdict's idempotency key for the reading published ``seq``-th: each device
        numbers its own readings one by one, as a real one does."""
        return f"{self.device_of(seq)}:{seq // len(self.devices)}"

    def _run(self) -> None:
        period = 1.0 / self.rate
        next_t = time.monotonic()
        while not self._stop.is_set():
            seq = self._seq
            self._seq += 1
            device = self.device_of(seq)
            body = orjson.dumps({**NORMAL, "seq": seq // len(self.devices)})
            self.sent[seq] = time.monotonic()
            self.infos[seq] = self.client.publish(f"sensors/{device}/readings", body, qos=1)
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def acked(self) -> set[int]:
        """Seqs the broker acknowledged. (``info.is_published()`` raises for a publish made
        while disconnected, even once it has been resent and acknowledged.)"""
        return set(self.ack_times())

    def ack_times(self) -> dict[int, float]:
        """seq -> monotonic time of the broker's PUBACK (the first one seen for its mid;
        a test sends far fewer than the 65,535 packet ids)."""
        by_mid: dict[int, float] = {}
        for mid, t in list(self._acks):
            by_mid.setdefault(mid, t)
        return {s: by_mid[i.mid] for s, i in list(self.infos.items()) if i.mid in by_mid}

    def wait_all_acked(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.acked()) == len(self.infos):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.stop()
        self.client.loop_stop()
        self.client.disconnect()


# -- the other end: a verdict counter with a persistent session --------------------------


class VerdictCounter:
    """Counts verdicts by idempotency key over a persistent session (so a broker restart
    does not make it miss what the broker kept for it)."""

    def __init__(self, host: str, port: int, prefix: str = "fault") -> None:
        self.keys: Counter[str] = Counter()
        self.dead: list[dict[str, Any]] = []
        self.first_at: dict[str, float] = {}
        self.last_at: dict[str, float] = {}  # when the key's latest verdict came
        self.marked: Counter[str] = Counter()  # verdicts that said ``repeat``, by key
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{free_port()}",
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("anomaly/+/verdict", 1), ("anomaly/dead-letter", 1)])
        self.client.connect(host, port, 30)
        self.client.loop_start()
        if not subscribed.wait(5):
            raise TimeoutError("verdict counter: subscription not acknowledged")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        with self._lock:
            if msg.topic == "anomaly/dead-letter":
                self.dead.append(body)
                return
            self.keys[body["key"]] += 1
            now = time.monotonic()
            self.first_at.setdefault(body["key"], now)
            self.last_at[body["key"]] = now
            if body.get("repeat"):
                self.marked[body["key"]] += 1

    def count(self) -> int:
        with self._lock:
            return len(self.keys)

    def wait_for(self, keys: set[str], timeout: float, quiet: float = 5.0) -> None:
        """Until every key is seen, ``timeout`` passes, or nothing new came for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                missing = sum(1 for k in keys if k not in self.keys)
                total = sum(self.keys.values())
            if not missing:
                return
            if total != last:
                last, last_change = total, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- the daemon as a subprocess ----------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class DaemonProcess:
    """``python -m daemon run`` against a broker (or a proxy), with a fixed client id."""

    def __init__(self, host: str, port: int, model_dir: Path, workdir: Path,
                 config: Path | None = None, client_id: str | None = None) -> None:
        self.host, self.port = host, port
        self.model_dir, self.workdir, self.config = model_dir, workdir, config
        self.http_port = free_ports(2)  # room for a second worker (WORKERS=2)
        self.client_id = client_id or f"anomalyd-fault-{self.http_port}"
        self.protocol: str | None = None  # MQTT_PROTOCOL: "5" (the default) or "3.1.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> DaemonProcess:
        env = dict(os.environ, MQTT_HOST=self.host, MQTT_PORT=str(self.port),
                   MODEL_DIR=str(self.model_dir), HEALTH_PORT=str(self.http_port),
                   MQTT_CLIENT_ID=self.client_id, LOG_LEVEL="INFO",
                   STATE_DIR=str(self.workdir / "state"))  # not the repo's state/
        if self.protocol:
            env["MQTT_PROTOCOL"] = self.protocol
        args = [sys.executable, "-m", "daemon"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        self.starts += 1
        log = (self.workdir / f"daemon-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen([*args, "run"], cwd=REPO, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(60)
        return self

    def status(self, path: str) -> int | None:
        """HTTP status of ``path``; None when nothing answers (or an answer is cut off: a
        daemon killed while it answered)."""
        try:
            return http_get(self.http_port, path, timeout=1.0)[0]
        except (OSError, http.client.HTTPException):
            return None

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while self.status("/ready") != 200:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            assert time.monotonic() - t0 < timeout, "daemon never became ready"
            time.sleep(0.05)
        return time.monotonic() - t0

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(http_get(self.http_port, "/info")[1])
        return result

    def metrics(self) -> str:
        return http_get(self.http_port, "/metrics")[1].decode()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_tail(self, n: int = 4000) -> str:
        p = self.workdir / f"daemon-{self.starts}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.workdir.glob("daemon-*.log")))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # a supervisor's workers run in their own session: its SIGKILL leaves them
            workers = children(self.proc.pid)
            self.proc.kill()
            self.proc.wait(10)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def children(pid: int) -> dict[int, list[bytes]]:
    """The processes whose parent is ``pid``: their command lines, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def worker_pid(supervisor: int, index: int) -> int:
    """The pid of the supervisor's child running ``--worker-index index``."""
    for pid, args in children(supervisor).items():
        if b"--worker-index" in args and \
                args[args.index(b"--worker-index") + 1] == str(index).encode():
            return pid
    raise AssertionError(f"no worker {index} under {supervisor}")


class Probe:
    """Polls /ready and /health every 50 ms and keeps each change: (t, ready, health)."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.changes: list[tuple[float, int | None, int | None]] = []
        # Every poll, by the time it started: a poll that began before a fault may still
        # answer from before it, and one blocked across a fast restart sees no change.
        self.polls: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: tuple[int | None, int | None] | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            now = (self.daemon.status("/ready"), self.daemon.status("/health"))
            self.polls.append((started, now[0]))
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            self._stop.wait(0.05)

    def first(self, after: float, ready: int | None = 200, timeout: float = 30.0) -> float:
        """Seconds from ``after`` until a poll begun after it first saw /ready = ``ready``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, r in list(self.polls):
                if t >= after and r == ready:
                    return t - after
            time.sleep(0.02)
        raise TimeoutError(f"/ready never answered {ready} after the fault: {self.summary()}")

    def health_seen(self, start: float, end: float) -> set[int | None]:
        """Every /health status seen between ``start`` and ``end``."""
        seen = {h for t, _, h in self.changes if start <= t <= end}
        before = [h for t, _, h in self.changes if t < start]
        if before:
            seen.add(before[-1])
        return seen

    def summary(self, since: float = 0.0) -> str:
        return ", ".join(f"+{t - since:.2f}s ready={r} health={h}" for t, r, h in self.changes
                         if t >= since)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# -- the tally --------------------------------------------------------------------------


@dataclass
class Tally:
    """Per reading: the publisher's view (sent, broker-acknowledged) against verdicts."""

    fault: str
    sent: int
    accepted: int  # the broker acknowledged the publish
    judged: int  # readings with at least one verdict
    lost: int  # accepted, no verdict
    duplicated: int  # more than one verdict
    recovered: int  # never acknowledged to the publisher, judged anyway
    unaccepted_unjudged: int  # never acknowledged and never judged: not a loss
    detect_s: float | None = None
    recover_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    lost_seqs: list[int] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["lost_seqs"] = d["lost_seqs"][:20]
        return d


def tally(fault: str, pub: LoadPublisher, counter: VerdictCounter, timeout: float = 60.0,
          ) -> Tally:
    """Stop the load, let everything settle, and count per reading."""
    pub.stop()
    pub.wait_all_acked(30)
    accepted = pub.acked()
    key = {s: pub.key_of(s) for s in pub.infos}
    counter.wait_for({key[s] for s in accepted}, timeout)
    # A redelivery may still be on its way: give it a moment to show up as a duplicate.
    time.sleep(0.5)
    with counter._lock:
        seen = dict(counter.keys)
    judged = {s for s in pub.infos if key[s] in seen}
    lost = sorted(accepted - judged)
    return Tally(
        fault=fault,
        sent=len(pub.infos),
        accepted=len(accepted),
        judged=len(judged),
        lost=len(lost),
        duplicated=sum(1 for s in judged if seen[key[s]] > 1),
        recovered=len(judged - accepted),
        unaccepted_unjudged=len(set(pub.infos) - accepted - judged),
        lost_seqs=lost,
    )


def record(t: Tally) -> None:
    """Append the tally to ``$ANOMALYD_FAULTS_REPORT`` (JSON lines) when it is set."""
    path = os.environ.get("ANOMALYD_FAULTS_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(t.row()) + "\n")


def render(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = ("| fault | sent | accepted | lost | duplicated | recovered | detect s | recover s |"
            "\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['fault']} | {r['sent']} | {r['accepted']} | {r['lost']} | "
                     f"{r['duplicated']} | {r['recovered']} | {fmt(r['detect_s'])} | "
                     f"{fmt(r['recover_s'])} |")
    notes = [f"- {r['fault']}: {json.dumps(_short(r['notes']))}" for r in rows if r["notes"]]
    return "\n".join([*lines, "", *notes])


def _short(notes: dict[str, Any]) -> dict[str, Any]:
    """Long lists (the age of every lost reading) as their range and count."""
    out: dict[str, Any] = {}
    for k, v in notes.items():
        if isinstance(v, list) and len(v) > 4:
            v = {"n": len(v), "min": min(v), "max": max(v)}
        out[k] = v
    return out


if __name__ == "__main__":
    print(render(Path(sys.argv[1])))
