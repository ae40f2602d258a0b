"""Fault injection under load, through real Mosquitto processes and a real daemon process.

Each case runs a paced QoS 1 load (unique seq per reading), injects one fault, lets the
system settle and counts per reading: lost (the broker acknowledged it, no verdict),
duplicated (more than one verdict), recovered (the publisher never saw the broker's ack,
judged anyway). ``ANOMALYD_FAULTS_REPORT=<file>`` keeps each tally for docs/reliability.md
(render with ``python -m tests.faults <file>``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.broker import Broker, free_port
from tests.faults import (
    DATA,
    NORMAL,
    DaemonProcess,
    LoadPublisher,
    Probe,
    Proxy,
    Tally,
    VerdictCounter,
    http_get,
    metric,
    record,
    tally,
)

pytestmark = pytest.mark.integration

RATE = 200.0  # readings/s: steady, well below the daemon's ceiling
KEEPALIVE_S = 5  # tests/data/faults.toml
SHUTDOWN_TIMEOUT_S = 10.0  # the default service.shutdown_timeout_s


@dataclass
class Rig:
    broker: Broker
    daemon: DaemonProcess
    pub: LoadPublisher
    counter: VerdictCounter
    probe: Probe
    proxy: Proxy | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def steady(self, verdicts: int = 200, timeout: float = 30.0) -> None:
        """Wait until the load flows end to end (``verdicts`` more verdicts seen)."""
        target = self.counter.count() + verdicts
        deadline = time.monotonic() + timeout
        while self.counter.count() < target:
            assert time.monotonic() < deadline, "load is not flowing: " + self.daemon.log_tail()
            time.sleep(0.05)

    def finish(self, name: str, killed_at: float | None = None, **extra: object) -> Tally:
        """Tally and record. ``killed_at``: note how long before it the lost readings had
        been acknowledged by the broker (the broker SIGKILL loss window)."""
        t = tally(name, self.pub, self.counter)
        if killed_at is not None:
            acks = self.pub.ack_times()
            ages = sorted(killed_at - acks[s] for s in t.lost_seqs if s in acks)
            t.notes["lost_acked_s_before_kill"] = [round(a, 3) for a in ages]
        for k, v in extra.items():
            if k in ("detect_s", "recover_s"):
                setattr(t, k, v)
            else:
                t.notes[k] = v
        record(t)
        print(t)
        return t


@pytest.fixture
def rig(trained_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def build(config: Path = DATA / "faults.toml", proxied: bool = False,
              protocol: str | None = None) -> Rig:
        broker = Broker().start()
        proxy = Proxy(broker.host, broker.port) if proxied else None
        port = proxy.port if proxy else broker.port
        daemon = DaemonProcess(broker.host, port, trained_model_dir, tmp_path, config)
        if protocol:
            daemon.protocol = protocol
        daemon.start()
        counter = VerdictCounter(broker.host, broker.port)
        pub = LoadPublisher(broker.host, broker.port, RATE).start()
        r = Rig(broker, daemon, pub, counter, Probe(daemon), proxy)
        made.append(r)
        return r

    yield build
    for r in made:
        r.probe.close()
        r.pub.close()
        r.counter.close()
        r.daemon.close()
        if r.proxy:
            r.proxy.close()
        r.broker.stop(signal.SIGKILL)


def test_broker_sigterm_for_10s_loses_nothing(rig: Callable[..., Rig]) -> None:
    """Mosquitto stopped cleanly (it saves its database) and back 10 s later."""
    r = rig()
    r.steady()
    t_fault = time.monotonic()
    r.broker.stop(signal.SIGTERM)
    detect = r.probe.first(t_fault, ready=503)
    time.sleep(10)  # the outage itself
    r.broker.start()
    t_back = time.monotonic()
    recover = r.probe.first(t_back, ready=200)
    r.steady()
    t = r.finish("broker SIGTERM, 10 s down", detect_s=detect, recover_s=recover,
                 health=sorted(map(str, r.probe.health_seen(t_fault, t_back + recover))))
    assert t.lost == 0, t.lost_seqs
    assert r.probe.health_seen(t_fault, t_back + recover) == {200}, r.probe.summary(t_fault)
    assert recover < 2.5


def test_broker_sigkill_loses_at_most_the_autosave_window(rig: Callable[..., Rig]) -> None:
    """Mosquitto killed: what it acknowledged after its last autosave (1 s) may be gone.

    Asserted: nothing the broker acknowledged more than 2 s (autosave interval + 1 s for
    the save itself) before the kill is lost. The measured loss is recorded.
    """
    r = rig()
    r.steady(400)
    t_fault = time.monotonic()
    r.broker.kill()
    detect = r.probe.first(t_fault, ready=503)
    r.broker.start()
    t_back = time.monotonic()
    recover = r.probe.first(t_back, ready=200)
    r.steady()
    t = r.finish("broker SIGKILL, restarted at once", killed_at=t_fault, detect_s=detect,
                 recover_s=recover)
    assert all(a < 2.0 for a in t.notes["lost_acked_s_before_kill"]), t.notes


def test_broker_sigkill_with_a_backlog_loses_only_the_last_autosave(
    rig: Callable[..., Rig],
) -> None:
    """The loss window itself: readings queued at the broker for an absent daemon when the
    broker is killed. Those acknowledged before the last autosave (1 s) come back; those
    after it are gone. Asserted: nothing acknowledged more than 2 s before the kill is lost."""
    r = rig()
    r.steady()
    r.daemon.signal(signal.SIGTERM)
    assert r.daemon.wait(SHUTDOWN_TIMEOUT_S + 5) == 0
    time.sleep(3)  # a backlog builds up at the broker
    t_fault = time.monotonic()
    r.broker.kill()
    r.broker.start()
    r.daemon.start()
    r.steady()
    t = r.finish("broker SIGKILL with a 3 s backlog queued for the daemon", killed_at=t_fault)
    assert all(a < 2.0 for a in t.notes["lost_acked_s_before_kill"]), t.notes


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_daemon_sigkill_mid_batch_loses_nothing(rig: Callable[..., Rig], protocol: str) -> None:
    """The daemon killed with work in hand; its persistent session brings it all back."""
    r = rig(protocol=protocol)
    r.steady()
    deadline = time.monotonic() + 10
    while True:  # kill while readings are held unacknowledged
        info = r.daemon.info()
        if info["unacked_inputs"] or info["awaiting_broker"] or info["queue_depth"]:
            break
        assert time.monotonic() < deadline, "never caught the daemon with work in hand"
    r.daemon.kill()
    t_dead = time.monotonic()  # polls begun from here cannot reach the killed process
    r.daemon.start(wait=False)
    recover = r.probe.first(t_dead, ready=200, timeout=60)
    r.steady()
    t = r.finish(f"daemon SIGKILL mid-batch (MQTT {protocol})", recover_s=recover,
                 in_hand_at_kill={k: info[k] for k in
                                  ("unacked_inputs", "awaiting_broker", "queue_depth")})
    assert t.lost == 0, t.lost_seqs
    assert t.judged == t.accepted


def test_daemon_sigterm_under_load_drains_and_exits_zero(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.steady()
    t_fault = time.monotonic()
    r.daemon.signal(signal.SIGTERM)
    code = r.daemon.wait(SHUTDOWN_TIMEOUT_S + 5)
    stop_s = time.monotonic() - t_fault
    log = r.daemon.log_tail(20000)
    assert code == 0, log
    assert stop_s < SHUTDOWN_TIMEOUT_S + 2
    assert '"stopped"' in log and "stopped_with_work_left" not in log
    r.daemon.start()
    recover = time.monotonic() - t_fault
    r.steady()
    t = r.finish("daemon SIGTERM under load, restarted", recover_s=recover,
                 exit_code=code, stop_s=round(stop_s, 2))
    assert t.lost == 0, t.lost_seqs


def test_network_cut_detected_within_1_5_keepalive_and_healed_within_2s(
    rig: Callable[..., Rig],
) -> None:
    """The link daemon<->broker goes silent (a blackhole, not a reset) for 10 s."""
    r = rig(proxied=True)
    assert r.proxy is not None
    r.steady()
    t_cut = time.monotonic()
    r.proxy.blackhole()
    detect = r.probe.first(t_cut, ready=503, timeout=3 * KEEPALIVE_S)
    remaining = t_cut + 10 - time.monotonic()
    time.sleep(max(0.0, remaining))  # the outage itself
    t_heal = time.monotonic()
    r.proxy.heal()
    recover = r.probe.first(t_heal, ready=200)
    r.steady()
    t = r.finish("network cut (blackhole) 10 s, keepalive 5 s", detect_s=detect,
                 recover_s=recover,
                 health=sorted(map(str, r.probe.health_seen(t_cut, t_heal + recover))))
    assert detect <= 1.5 * KEEPALIVE_S, r.probe.summary(t_cut)
    assert recover <= 2.0, r.probe.summary(t_heal)
    assert t.lost == 0, t.lost_seqs
    assert r.probe.health_seen(t_cut, t_heal + recover) == {200}


def test_connection_reset_recovers_at_once(rig: Callable[..., Rig]) -> None:
    r = rig(proxied=True)
    assert r.proxy is not None
    r.steady()
    t_fault = time.monotonic()
    r.proxy.reset()
    detect = r.probe.first(t_fault, ready=503, timeout=5)
    recover = r.probe.first(t_fault + detect, ready=200)
    r.steady()
    t = r.finish("connection reset (RST)", detect_s=detect, recover_s=recover)
    assert t.lost == 0, t.lost_seqs
    assert recover <= 2.0


def test_slow_result_path_acks_nothing_early_and_stays_bounded(rig: Callable[..., Rig]) -> None:
    """Results leave slower than readings arrive: the bounds hold, and the broker still has
    every reading whose verdict is not safe (a SIGKILL then loses nothing)."""
    r = rig(config=DATA / "faults-small-window.toml", proxied=True)
    assert r.proxy is not None
    r.steady()
    r.proxy.throttle(chunk=512, delay=0.05)  # ~10 KB/s from daemon to broker
    peaks = {"outstanding": 0.0, "queue": 0.0, "unacked": 0.0}
    t_end = time.monotonic() + 8
    while time.monotonic() < t_end:
        text = r.daemon.metrics()
        peaks["outstanding"] = max(peaks["outstanding"],
                                   metric(text, "anomalyd_outstanding_publishes"))
        peaks["queue"] = max(peaks["queue"], metric(text, "anomalyd_queue_depth"))
        peaks["unacked"] = max(peaks["unacked"], metric(text, "anomalyd_unacked_inputs"))
        time.sleep(0.1)
    backlog_judged = r.counter.count()
    r.daemon.signal(signal.SIGKILL)
    r.proxy.reset()  # whatever the daemon wrote and the slow link still held dies with it
    r.daemon.wait(10)
    r.proxy.unthrottle()
    r.daemon.start()
    r.steady()
    t = r.finish("result path slowed to ~10 KB/s, then daemon SIGKILL", peaks=peaks,
                 judged_before_kill=backlog_judged)
    assert t.lost == 0, t.lost_seqs
    assert peaks["outstanding"] <= 20  # mqtt.max_outstanding_publishes
    assert peaks["outstanding"] > 0, "the slowed path never filled the window: test is void"
    # The intake queue holds at most batch.queue_size (1 here): beyond that the intake stops
    # reading and the broker keeps the readings, whatever its flow control does (see the
    # next test). Unacked readings are those in hand plus what the broker overshoots.
    assert peaks["queue"] <= 1


def test_mosquitto_overshoots_receive_maximum_once_acks_flow(broker: Broker) -> None:
    """Pins the broker behaviour docs/reliability.md relies on (Mosquitto 2.0.11): with
    Receive Maximum 5, the broker keeps 5 unacknowledged messages in flight until the
    client acks one, and then sends up to 5 more for each PUBACK, whatever is in flight.
    When this fails, the broker honours flow control: revisit the intake queue's bound."""
    got: list[int] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rm-{free_port()}",
                    protocol=paho.MQTTv5, manual_ack=True)
    c.on_message = lambda cl, u, m: got.append(m.mid)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 5
    topic = f"rm/{free_port()}"
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(broker.host, broker.port, 30, clean_start=True, properties=props)
    c.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2)
    try:
        c.subscribe(topic, qos=1)
        assert subscribed.wait(5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for _ in range(100):
            pub.publish(topic, b"x", qos=1)
        deadline = time.monotonic() + 5
        while len(got) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # would anything beyond the window arrive? (nothing should)
        assert len(got) == 5
        c.ack(got[0], 1)  # one slot freed...
        deadline = time.monotonic() + 5
        while len(got) < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(got) >= 9, f"{len(got)} delivered: one PUBACK released only one message"
    finally:
        for cl in (c, pub):
            cl.loop_stop()
            cl.disconnect()


@pytest.mark.slow
def test_daemon_down_60s_backlog_is_judged_on_return(rig: Callable[..., Rig]) -> None:
    r = rig()
    r.steady()
    r.daemon.signal(signal.SIGTERM)
    assert r.daemon.wait(SHUTDOWN_TIMEOUT_S + 5) == 0
    t_down = time.monotonic()
    time.sleep(60)  # devices keep publishing while the daemon is away
    backlog = len(r.pub.infos)
    r.daemon.start()
    t_up = time.monotonic()
    r.steady(backlog - r.counter.count(), timeout=120)
    drain_s = time.monotonic() - t_up
    t = r.finish("daemon down 60 s under load", recover_s=drain_s,
                 down_s=round(t_up - t_down, 1))
    assert t.lost == 0, t.lost_seqs


# -- exceptions inside the MQTT adapter (in-process daemon) -------------------------------


def _poll(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def test_a_raising_callback_costs_one_message_and_never_the_loop(
    broker: Broker, start_daemon: Any, collector_for: Any, publisher_for: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception in on_message is caught: the network thread lives, later readings are
    judged and acknowledged (the failed one does not block the ack order), /health is ok."""
    svc = start_daemon(broker)
    deliver = svc.mqtt._deliver

    def flaky(msg: Any) -> None:
        if b"boom" in msg.payload:
            raise RuntimeError("injected failure in on_message")
        deliver(msg)

    monkeypatch.setattr(svc.mqtt, "_deliver", flaky)
    col = collector_for(broker, ["anomaly/cb-raise/verdict"])
    pub = publisher_for(broker)
    pub.send("sensors/cb-raise/readings", b'{"boom": 1}')
    for seq in range(30):
        pub.send("sensors/cb-raise/readings", {**NORMAL, "seq": seq})
    col.json_on("anomaly/cb-raise/verdict", count=30)
    assert svc.metrics.callback_errors.labels("on_message")._value.get() == 1
    assert svc.mqtt.loop_alive and svc.mqtt.connected
    _poll(lambda: len(svc.mqtt.acks) == 0)  # every later reading was acknowledged
    status, _ = http_get(svc.http.port, "/health")
    assert status == 200


# the injected exception ends paho's thread, as the test means it to
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_goes_unhealthy_when_the_network_thread_dies(
    broker: Broker, start_daemon: Any, publisher_for: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho's is_connected() stays True after its thread dies; /health must not."""
    svc = start_daemon(broker)
    assert http_get(svc.http.port, "/health")[0] == 200

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected failure in paho's packet handling")

    monkeypatch.setattr(svc.mqtt.client, "_packet_handle", broken)
    publisher_for(broker).send("sensors/cb-dead/readings", {**NORMAL, "seq": 1})
    _poll(lambda: not svc.mqtt.loop_alive)
    assert svc.mqtt.client.is_connected()  # what paho still claims
    status, body = http_get(svc.http.port, "/health")
    assert status == 503
    assert json.loads(body)["checks"]["mqtt_loop"] is False
    assert http_get(svc.http.port, "/ready")[0] == 503
