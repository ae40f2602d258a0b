"""The lifecycle: wire everything, start, run until a signal, drain within a time bound.

The first SIGTERM/SIGINT asks for a graceful stop: stop taking readings, score and publish
what is queued, wait for the broker to acknowledge every output, acknowledge the inputs,
publish ``offline``, disconnect, exit 0. A second signal forces the stop; whatever was left
is logged, and the broker still holds every reading that was not acknowledged.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import structlog

from daemon import __version__, oversize, partition, sessions, spool, state
from daemon.acks import Inbound
from daemon.batching import next_batch
from daemon.config import Settings
from daemon.control import Command, ControlQueue, DeviceControl
from daemon.errors import StoppedWhileStartingError
from daemon.fleet import describe_warmup_change
from daemon.http import HttpServer
from daemon.metrics import Metrics
from daemon.models import ModelBundle
from daemon.mqtt import MqttAdapter
from daemon.mqtt_link import password_in_clear
from daemon.partition import TopicOwnership
from daemon.payloads import Outbound, iso
from daemon.pipeline import BatchStats, RawMessage
from daemon.presence import PresenceEvent
from daemon.reload import (
    ModelReloader,
    build_scoring,
    publish_model_info,
    rate_limiter,
    unread_time_fields,
)
from daemon.sessions import intake_client_id, subscriptions
from daemon.status import ServiceStatus
from daemon.summary import ScoredSummary
from daemon.topics import TopicMatcher

log = structlog.get_logger("anomalyd")

#: How often the scorer looks for devices gone quiet (``alerts.quiet_after_s``).
PRESENCE_CHECK_S = 1.0
#: How often every device's drift is compared with ``baseline.drift_warn_spreads``: a
#: centre moves by at most 1 % of a reading's distance per reading, so a minute is plenty.
DRIFT_CHECK_S = 60.0
#: A warning when nothing at all has arrived on the readings' subscription for this long.
NO_READINGS_WARN_S = 300.0
#: At most one ``result_oversize`` warning this often (each is counted in the metrics).
OVERSIZE_LOG_S = 10.0
#: How long an operator's command or the shutdown waits for the state file to be written
#: (at 10,000 devices with baselines, encoding and writing take ~0.2 s).
STATE_FLUSH_TIMEOUT_S = 10.0
#: After an alert transition the state is saved within this long (not over a save going on).
ALERT_SAVE_S = 1.0
#: How often the scorer looks whether the readings taken over in a handover are judged.
HANDOVER_CHECK_S = 1.0
#: How often a worker looks whether its supervisor is still there.
SUPERVISOR_CHECK_S = 0.5


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread died of an exception (e.g. paho's network thread): log it as an event;
    /health reports the dead thread."""
    log.error("thread_crashed", thread=args.thread.name if args.thread else None,
              exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _payload_size(msg: Inbound) -> int:
    return len(msg.payload)


class Service:
    def __init__(
        self,
        settings: Settings,
        bundle: ModelBundle,
        metrics: Metrics | None = None,
        worker_index: int | None = None,
        supervisor_pid: int | None = None,
    ) -> None:
        self.settings = settings
        self._supervisor_pid = supervisor_pid  # a worker's: it stops if that one is gone
        self.bundle = bundle
        self.metrics = metrics or Metrics()
        self.started_at = time.time()
        s = settings
        self.subscription, stale = subscriptions(s)
        self.decoder, self.pipeline = build_scoring(s, bundle, self.subscription, rate_limiter(s),
                                                    unread_time_fields(self.metrics))
        self._worker_index = worker_index
        self.state_path = state.state_file(s.state.dir, worker_index)
        self.state_writer = state.StateWriter(self.state_path, self._state_save_failed,
                                              self._state_written)
        self._state_save_error: str | None = None  # the last save's failure, if it failed
        self._state_saved_at = time.monotonic()
        self._alerts_unsaved = False  # an alert changed since the last snapshot was taken
        self._state_lock: int | None = None  # the state directory's lock (a single daemon)
        # readings taken over from a previous layout's session (daemon.spool), until judged
        self._spooled: list[Inbound] = []
        self._spool_path = spool.spool_file(self.state_path.parent, worker_index)
        self._handover_checked_at = 0.0
        self._presence_checked_at = 0.0
        self._drift_checked_at = 0.0
        self._retained_restored_for = 0  # the lost sessions whose retained state is re-sent
        self._oversize_logged = float("-inf")
        self._silence_warned = False
        # Bounded by batch.queue_size: when full, the intake's network thread waits (the
        # PUBACKs our publishes need arrive on the other connection), so the broker keeps
        # the readings. SimpleQueue: a C queue, ~20x cheaper per message than queue.Queue.
        self.queue: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.queue_bound = s.batch.queue_size
        client_id = intake_client_id(s, worker_index)
        port = s.http.port
        if worker_index is not None:
            port = port + worker_index if port else 0
        owns = None
        if worker_index is not None and s.service.dispatch == "device":
            matcher = TopicMatcher(self.subscription, s.limits.device_id_pattern)
            owns = TopicOwnership(matcher, worker_index, s.service.workers).owns
        self.mqtt = MqttAdapter(
            s.mqtt, self.subscription, s.topics.status, self.metrics, self._deliver, client_id,
            owns=owns, stale_subscriptions=stale,
            skip_retained=s.readings.retained == "skip",
        )
        # Operators' device commands, run by the scorer between batches (daemon.control).
        self.control = ControlQueue(self.metrics)
        workers = s.service.workers
        self.device_control = DeviceControl(
            self.pipeline, self.metrics, self._publish_now, self.save_state,
            owner=(lambda device: partition.owner(device, workers)) if owns else None,
            index=worker_index,
        )
        self.reloader = ModelReloader(self)  # swaps bundle, decoder and pipeline
        self.http = HttpServer(
            s.http.host, port, ServiceStatus(self), self.metrics.registry, s.http.secret(),
            control=self.control, device_id_pattern=s.limits.device_id_pattern,
        )
        self._worker = threading.Thread(target=self._work, name="scorer", daemon=True)
        self._stopping = threading.Event()
        self._starting = True  # until start() has started the links and the scorer
        self._scored = ScoredSummary()
        self._forced = threading.Event()
        self._signalled = threading.Event()
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.worker_crashed: str | None = None
        publish_model_info(self.metrics, bundle, self.pipeline.default_detector)

    # -- intake (the intake connection's network thread) -------------------------------

    def _deliver(self, msg: Inbound) -> None:
        """Queue a received message; wait while the queue is full (backpressure)."""
        q = self.queue
        if q.qsize() >= self.queue_bound:
            self.metrics.intake_waits.inc()
            while q.qsize() >= self.queue_bound and not self._forced.is_set():
                time.sleep(0.001)
        q.put(msg)

    # -- scoring worker ----------------------------------------------------------------

    def _work(self) -> None:
        b = self.settings.batch
        max_wait = b.max_wait_ms / 1000.0
        try:
            while True:
                batch = next_batch(self.queue, b.max_batch_size, max_wait,
                                   weight=_payload_size, max_weight=b.max_batch_bytes)
                self.metrics.queue_depth.set(self.queue.qsize())
                if batch:
                    self._handle(batch)
                    self._save_state_every(self.settings.state.save_interval_s)
                elif self._stopping.is_set():
                    self._say_scored(force=True)  # the last period's, before the stop
                    return
                self._say_scored()
                self.control.drain(self._execute)
                self._check_presence()
                self._check_drift()
                self._restore_retained()
                self._finish_handover()
                self.state_writer.step()  # a periodic save's next slice, if one is going
                self._save_alert_changes()
        except Exception as exc:
            self.worker_crashed = repr(exc)
            log.exception("worker_crashed")
        finally:
            self.control.close("the scorer has stopped (the daemon is stopping or failed)")

    def _say_scored(self, force: bool = False) -> None:
        """The INFO summary (``daemon.summary``), when due, also when no batch came since
        the period ended; ``force``: what is left of the period, at a stop."""
        now = time.monotonic()
        if self._scored.due(now) or (force and self._scored.batches):
            log.info("scored", **self._scored.take(now))

    def _execute(self, command: Command) -> dict[str, Any]:
        if command.action == "reload":
            return self.reloader.reload()
        return self.device_control.execute(command)

    def _handle(self, batch: list[Inbound]) -> None:
        t0 = time.perf_counter()
        raws = [RawMessage(m.topic, m.payload, m.received_wall) for m in batch]
        try:
            outputs, stats = self.pipeline.process(raws, time.time())
        except Exception:
            # A bug, not bad input (that is dead-lettered by the decoder): dead-letter the
            # whole batch with the reason, so nothing disappears silently, and carry on.
            log.exception("batch_failed", size=len(batch))
            self.metrics.callback_errors.labels("pipeline").inc()
            outputs, stats = self.pipeline.internal_error(raws, time.time())
        stop = self._forced.is_set
        for msg, outs in zip(batch, outputs, strict=True):
            for out in outs:
                for part in self._fitted(out):
                    if not self.mqtt.publish(
                        part.topic, part.payload, msg, retain=part.retain, should_stop=stop
                    ):
                        return
            self.mqtt.acks.release(msg)
        self.metrics.last_reading.set(batch[-1].received_wall)
        if stats.alert_transitions:
            self._alerts_unsaved = True
        self._record(stats, time.perf_counter() - t0)

    def _check_presence(self) -> None:
        """Announce the devices that have gone quiet, and say when nothing at all arrives
        (at most once a second)."""
        mono = time.monotonic()
        if mono - self._presence_checked_at < PRESENCE_CHECK_S:
            return
        self._presence_checked_at = mono
        self._check_silence(mono)
        pipeline = self.pipeline
        if not pipeline.presence.enabled:
            return
        if not self.mqtt.connected:  # cut off: no device can be heard, none is declared quiet
            pipeline.presence.hold(time.time())
            return
        for event in pipeline.fleet.newly_quiet(time.time()):
            self.metrics.presence_changes.labels("quiet").inc()
            log.warning("device_quiet", device_id=event.device_id,
                        last_seen=iso(event.last_seen))
            self._publish_now(pipeline.payloads.presence(event))
        self.metrics.quiet_devices.set(len(pipeline.presence.quiet))

    def _restore_retained(self) -> None:
        """After the broker lost this daemon's session (``broker_session_lost``: restarted
        without its database, most likely), it has lost the retained alerts and presence
        too, and a dashboard subscribing now would see no alert where one is raised:
        publish each active alert again as it stands (the same message, so its ``key``
        lets a consumer drop the copy) and each device known to be quiet."""
        lost = self.mqtt.lost_sessions
        if lost == self._retained_restored_for:
            return
        self._retained_restored_for = lost
        p = self.pipeline
        active = [(d, st) for d, st in list(p.alert_states.devices.items()) if st.active]
        for device_id, st in active:
            if not self._publish_now(p.payloads.current_alert(device_id, st)):
                return  # stopping
        now = time.time()
        seen = p.presence.last_seen
        quiet = sorted(d for d in p.presence.quiet if d in seen)
        for device_id in quiet:
            event = PresenceEvent(device_id, "quiet", seen[device_id], now)
            if not self._publish_now(p.payloads.presence(event)):
                return
        log.info("retained_state_published_again", alerts=len(active), quiet_devices=len(quiet),
                 reason="the broker lost this daemon's session, and with it the retained "
                        "messages")

    def _check_drift(self) -> None:
        """Say which devices' baselines have absorbed more change than the operator allows
        (``baseline.drift_warn_spreads``), at most every ``DRIFT_CHECK_S``."""
        limit = self.settings.baseline.drift_warn_spreads
        mono = time.monotonic()
        if limit <= 0 or mono - self._drift_checked_at < DRIFT_CHECK_S:
            return
        self._drift_checked_at = mono
        pipeline = self.pipeline
        new, beyond = pipeline.devices.drifted(limit)
        names = pipeline.bundle.model_features
        for d in new:
            log.warning("baseline_drifted", device_id=d.device_id, input=names[d.input],
                        spreads=round(d.spreads, 2), limit=limit,
                        hint="its normal has moved this far since its warm-up and the "
                             "baseline now takes it for normal: if that is not the device's "
                             f"new normal, look at it; if it is, `anomalyd rewarm {d.device_id}`")
        self.metrics.drifted_devices.set(beyond)

    def _check_silence(self, mono: float) -> None:
        """Warn once when no message at all has arrived on the readings' subscription for
        ``NO_READINGS_WARN_S`` while connected: devices that all stopped, a subscription
        that matches nothing, or a broker that lets this user subscribe but not read
        (Mosquitto 2.0 grants such a subscription and delivers nothing)."""
        heard = self.mqtt.heard_at
        if heard is None or not self.mqtt.connected or mono - heard < NO_READINGS_WARN_S:
            self._silence_warned = False
            return
        if not self._silence_warned:
            self._silence_warned = True
            log.warning("no_readings", subscription=self.subscription,
                        silent_s=round(mono - heard),
                        hint=f"no message has arrived on {self.subscription} for "
                             f"{NO_READINGS_WARN_S:.0f} s: are devices publishing there, and "
                             "may this daemon's user read it? (Mosquitto grants a "
                             "subscription its ACL forbids, then delivers nothing)")

    def _publish_now(self, out: Outbound) -> bool:
        """Publish a message no reading caused (an operator's command; scorer thread)."""
        return all([self.mqtt.publish(part.topic, part.payload, None, retain=part.retain,
                                      should_stop=self._forced.is_set)
                    for part in self._fitted(out)])

    def _fitted(self, out: Outbound) -> list[Outbound]:
        """``out``, or what replaces it within the broker's packet size limit
        (``daemon.oversize``): a result the broker would not take would cost the
        connection at each attempt and hold every later acknowledgement."""
        max_packet = self.mqtt.max_packet
        if max_packet is None or oversize.fits(out, max_packet):
            return [out]
        fitted, action = oversize.fit(out, max_packet, self.pipeline.payloads.dead_letter_topic,
                                      time.time())
        self.metrics.oversize_results.labels(out.kind, action).inc()
        now = time.monotonic()
        if action == "dropped" or now - self._oversize_logged >= OVERSIZE_LOG_S:
            self._oversize_logged = now
            (log.error if action == "dropped" else log.warning)(
                "result_oversize", kind=out.kind, topic=out.topic, size_bytes=len(out.payload),
                max_packet_bytes=max_packet, action=action, messages=len(fitted))
        return fitted

    def _record(self, stats: BatchStats, elapsed: float) -> None:
        self.metrics.record_batch(stats)
        self.metrics.devices.set(len(self.pipeline.devices.devices))
        log.debug(
            "batch",
            messages=stats.messages,
            readings=stats.readings,
            anomalies=stats.anomalies,
            rejected=stats.rejected,
            models=sorted(stats.by_detector),
            latency_ms=round(elapsed * 1000, 3),
        )
        self._scored.add(stats, elapsed)
        for device_id in stats.clock_resets:
            log.warning("device_clock_reset", device_id=device_id,
                        newest=iso(self.pipeline.devices.newest(device_id)),
                        note="every reading was late for readings.late_after_s: the "
                             "device's clock is taken to have moved back")

    # -- lifecycle ---------------------------------------------------------------------

    def _restore_state(self) -> None:
        try:
            snapshot = state.load(self.state_path)
        except state.StateError as exc:
            # Starting fresh costs every device a new warm-up; refusing to start would
            # cost all verdicts. The file is set aside, not overwritten by the next save.
            kept = state.set_aside(self.state_path)
            log.warning("state_discarded", path=str(self.state_path), error=str(exc),
                        kept_as=None if kept is None else str(kept),
                        note="every device warms up again, and an alert the broker holds "
                             "as raised is not resolved by this daemon")
            return
        if snapshot is None:
            return
        self.mqtt.expects_session = True  # it ran before: the broker should keep its session
        fleet = self.pipeline.fleet
        devices, alerts, problems = fleet.restore(snapshot)
        for problem in problems:
            log.warning("state_partly_discarded", path=str(self.state_path), error=problem,
                        note="those devices warm up again")
        change = fleet.warmup_change
        if change is not None:  # [baseline] warmup_readings changed since the state was saved
            (log.warning if change.restarted else log.info)(
                "state_warmup_changed", path=str(self.state_path),
                saved_warmup_readings=change.saved, warmup_readings=change.now,
                baselines_kept=change.fitted, warmups_continued=change.continued,
                warmups_restarted=len(change.restarted),
                restarted=change.restarted[:20], note=describe_warmup_change(change))
        log.info("state_restored", path=str(self.state_path), devices=devices,
                 alert_states=alerts)

    def save_state(self, wait: bool = True) -> None:
        """Take a snapshot of the per-device state (scorer thread, or after it stopped) and
        have it written; ``wait``: return once it is on disk (operators' commands, the
        shutdown), else at once: the scorer encodes it a slice per loop and a thread
        writes it (the periodic save; ``daemon.state.StateWriter``)."""
        self.state_writer.submit(self.pipeline.fleet.snapshot())
        self._state_saved_at = time.monotonic()
        self._alerts_unsaved = False
        if wait and not self.state_writer.flush(STATE_FLUSH_TIMEOUT_S):
            log.warning("state_save_slow", path=str(self.state_path),
                        timeout_s=STATE_FLUSH_TIMEOUT_S,
                        note="the state file is still being written; scoring goes on")

    def _state_save_failed(self, exc: Exception) -> None:
        """The writer thread could not write the state file (it tries again next time)."""
        self._state_save_error = repr(exc)
        log.error("state_save_failed", path=str(self.state_path), error=repr(exc))
        self.metrics.callback_errors.labels("state").inc()

    def _state_written(self) -> None:
        self._state_save_error = None
        self.metrics.state_saved.set_to_current_time()

    def _save_alert_changes(self) -> None:
        """Save soon after an alert was raised, escalated or resolved (at most every
        ``ALERT_SAVE_S``, and not over a save still being encoded, which a new one would
        start over): the readings that changed it are acknowledged already, so a daemon
        killed before the periodic save would forget a raised alert whose retained state
        the broker keeps, and never resolve it."""
        if (self._alerts_unsaved and not self.state_writer.encoding
                and time.monotonic() - self._state_saved_at >= ALERT_SAVE_S):
            self.save_state(wait=False)

    def _save_state_every(self, interval_s: float) -> None:
        if time.monotonic() - self._state_saved_at >= interval_s:
            self.save_state(wait=False)

    def start(self) -> None:
        state.check_writable(self.state_path.parent)  # before anything is judged
        if self._worker_index is None:  # workers: the supervisor did it before starting them
            self._state_lock = sessions.take_over(self.settings, self.state_path.parent, 1,
                                                  self._stopping)
        self._restore_state()
        self._take_over_handover()
        try:
            self.http.start()
        except BaseException:
            self._release_state()
            raise
        log.info("http_listening", host=self.settings.http.host, port=self.http.port)
        if self.settings.mqtt.protocol == "5" and not self.settings.mqtt.session_expiry_s:
            log.warning("mqtt_session_not_kept", session_expiry_s=0,
                        note="the broker ends this daemon's session when it disconnects: "
                             "readings published while it is away (a restart, a network "
                             "cut) are lost. Set mqtt.session_expiry_s to how long an "
                             "absence to cover (default 86400)")
        if password_in_clear(self.settings.mqtt):
            log.warning("mqtt_password_in_clear", host=self.settings.mqtt.host,
                        note="the broker username and password cross the network "
                             "unencrypted: set mqtt.tls.enabled (MQTT_TLS=true)")
        try:
            # readings taken over are judged before the intake connects: live ones wait at
            # the broker, not in the intake's network thread (which would miss keepalives)
            self.mqtt.start(intake=not self._spooled, cancel=self._stopping)
        except BaseException:
            self.http.stop()
            self._release_state()
            raise
        self._worker.start()
        self._starting = False
        shadow = self.pipeline.shadow
        log.info("started", version=__version__, model_version=self.bundle.version,
                 subscription=self.subscription, detector=self.pipeline.default_detector,
                 shadow_model_version=None if shadow is None else shadow.version,
                 # where the device state goes: the default, "state", is relative to the
                 # working directory, and a new directory was said nowhere else
                 state_file=str(self.state_path.absolute()))
        for advice in self.bundle.outdated:
            log.warning("model_outdated", model_version=self.bundle.version, advice=advice)

    def request_stop(self, force: bool = False) -> None:
        if force or self._stopping.is_set():
            self._forced.set()
        self._stopping.set()
        self._signalled.set()

    def _hand_over_signal(self, signum: int, frame: FrameType | None) -> None:
        """The handler run() installs: it only hands the signal to the ``signals`` thread.

        Python runs a handler on the main thread between two of its bytecodes, possibly
        while that thread holds a lock: a log line's, or an event's. Logging or setting an
        event here would then wait forever for a lock its own thread holds (seen: a second
        SIGTERM that arrived while the first one's log line was being written hung the
        daemon until SIGKILL). ``SimpleQueue.put`` is safe there."""
        self._signals.put(signum)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop (a second one forces the stop), SIGHUP reloads the model
        set. Call from the main thread."""
        threading.Thread(target=self._take_signals, name="signals", daemon=True).start()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._hand_over_signal)

    def _take_signals(self) -> None:
        while True:
            signum = self._signals.get()
            try:
                if signum == signal.SIGHUP:
                    self._on_reload_signal(signum)
                else:
                    self._on_stop_signal(signum)
            except Exception:  # this thread must outlive a failure: the next signal counts
                log.exception("signal_handling_failed", signal=signum)

    def _on_stop_signal(self, signum: int) -> None:
        first = not self._stopping.is_set()
        log.warning("signal", signal=signal.Signals(signum).name,
                    action="graceful stop" if first else "forced stop")
        self.request_stop(force=not first)

    def _watch_supervisor(self, supervisor: int) -> None:
        """A worker whose supervisor is gone (SIGKILLed, by the OOM killer say: it had no
        time to stop its workers) stops as on SIGTERM. Left running it would keep its
        client ids, its HTTP port and the state directory's lock, inherited from the
        supervisor, and every next start would be refused as a second anomalyd."""
        while os.getppid() == supervisor:
            if self._stopping.wait(SUPERVISOR_CHECK_S):
                return
        log.error("supervisor_gone", supervisor_pid=supervisor, action="graceful stop",
                  note="this worker's supervisor ended without stopping it")
        self.request_stop()

    def _on_reload_signal(self, signum: int) -> None:
        """SIGHUP: queue a model reload for the scorer, which logs its outcome."""
        queued = self.control.submit(Command("reload"))
        log.info("signal", signal=signal.Signals(signum).name,
                 action="reload the model set" if queued else "ignored: stopping")

    def run(self) -> int:
        """Start, serve until a signal, shut down. Returns the process exit code."""
        threading.excepthook = _log_thread_crash
        # Three busy threads (two network loops and the scorer) share the GIL; Python's
        # default 5 ms switch interval makes each wait up to 5 ms for it. See BENCHMARKS.md.
        sys.setswitchinterval(self.settings.service.gil_switch_interval_ms / 1000.0)
        # Everything allocated so far (modules, models, configuration) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise walk it all
        # and show up as latency spikes.
        gc.collect()
        gc.freeze()
        self.install_signal_handlers()
        if self._supervisor_pid is not None:
            threading.Thread(target=self._watch_supervisor, args=(self._supervisor_pid,),
                             name="supervisor-watch", daemon=True).start()
        try:
            self.start()
        except StoppedWhileStartingError as exc:  # nothing was taken: nothing to drain
            log.info("stopped", note=f"{exc}: before any reading was taken")
            return 0
        while not self._signalled.wait(1.0):
            if self.worker_crashed or not self.mqtt.loop_alive:
                log.error("component_died", worker=self.worker_crashed,
                          mqtt_loop=self.mqtt.loop_crashed)
                self.shutdown()
                return 1
        return 0 if self.shutdown() else 1

    def shutdown(self) -> bool:
        """Drain and stop within ``shutdown_timeout_s``; True if nothing was left and the
        devices' state was saved."""
        timeout = self.settings.service.shutdown_timeout_s
        deadline = time.monotonic() + timeout
        self.mqtt.pause_intake()
        self._stopping.set()
        self._worker.join(max(0.0, deadline - time.monotonic()))
        redeliver = self._abandon_queued() if not self._worker.is_alive() else 0
        while (len(self.mqtt.window) or len(self.mqtt.acks)) and time.monotonic() < deadline:
            if self._forced.is_set() or not self.mqtt.connected:
                break
            if not len(self.mqtt.window) and self.mqtt.refusal is not None:
                # Every publish is answered; what is left waits on results the broker
                # refuses, which waiting will not change: leave those readings to it.
                break
            time.sleep(0.01)
        if not self._worker.is_alive():
            redeliver += self._abandon_queued()
            # judged since the scorer last looked (once a second): its file goes now
            self._drop_judged_handover()
        if redeliver:
            log.info("left_for_redelivery", readings=redeliver,
                     note="received while stopping; unacknowledged, so the broker resends them")
        left = {"queued": self.queue.qsize(), "awaiting_broker": len(self.mqtt.window),
                "unacked_inputs": len(self.mqtt.acks)}
        clean = not self._worker.is_alive() and not any(left.values())
        if not self._worker.is_alive():  # else the scorer may still be changing the state
            self.save_state()
            self.state_writer.close(max(1.0, deadline - time.monotonic()))
        self.mqtt.stop(max(1.0, deadline - time.monotonic()))
        self.http.stop()
        if self.state_writer.idle:  # else a save still being written keeps the directory
            self._release_state()
        if not clean:
            log.warning("stopped_with_work_left", **left,
                        note="unacknowledged readings stay at the broker for redelivery")
        elif self._state_save_error is not None:  # a service manager should see it failed
            log.error("stopped_without_saving_state", path=str(self.state_path),
                      error=self._state_save_error,
                      note="every reading was judged, but the devices' state since the last "
                           "save is lost: after a restart they warm up again, and an alert "
                           "raised since then is never resolved at the broker. Make room in "
                           "state.dir, or mend what the error names, before starting again")
            return False
        else:
            log.info("stopped", uptime_s=round(time.time() - self.started_at, 1))
        return clean

    def _take_over_handover(self) -> None:
        """Queue, before any live reading, the readings a previous layout's session had
        queued for this daemon's devices (``daemon.spool``)."""
        queued = spool.take(self.state_path.parent, self._worker_index)
        now = time.monotonic()
        self._spooled = [Inbound(0, 0, q.topic, q.payload, now, q.received) for q in queued]
        for msg in self._spooled:  # QoS 0 to the acks: there is no broker message to ack
            self.queue.put(msg)
        if self._spooled:
            log.info("handover_judging", readings=len(self._spooled),
                     path=str(self._spool_path))

    def _finish_handover(self) -> None:
        """Once every reading taken over is judged and its results safe with the broker
        (looked at once a second), its file goes and the intake connects. A broker that
        cannot be reached then (BrokerError) stops the daemon as at its start."""
        if not self._spooled or time.monotonic() - self._handover_checked_at < HANDOVER_CHECK_S:
            return
        self._handover_checked_at = time.monotonic()
        if self._drop_judged_handover():
            # a stop asked for meanwhile: the shutdown has nothing of the intake's to drain
            with contextlib.suppress(StoppedWhileStartingError):
                self.mqtt.start_intake(self._stopping)

    def _drop_judged_handover(self) -> bool:
        """Whether every reading taken over is judged with its results safe with the
        broker; its file then goes (else the next start would judge them all again)."""
        if not self._spooled or not all(msg.done for msg in self._spooled):
            return False
        self._spool_path.unlink(missing_ok=True)
        log.info("handover_judged", readings=len(self._spooled))
        self._spooled = []
        return True

    def _release_state(self) -> None:
        """Let the state directory go (``state.lock``), if this daemon took it."""
        fd, self._state_lock = self._state_lock, None
        if fd is not None:
            os.close(fd)

    def _abandon_queued(self) -> int:
        """Readings that arrived while the scorer was finishing: leave them unacknowledged
        (the broker redelivers them to the next session) without holding up the acks."""
        n = 0
        while True:
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return n
            self.mqtt.acks.forget(msg)
            n += 1

    # -- read by daemon.status (HTTP threads) ------------------------------------------

    @property
    def scorer_alive(self) -> bool:
        return self._worker.is_alive() and self.worker_crashed is None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def starting(self) -> bool:
        """Still starting (handing sessions over, waiting for the broker): alive, not
        ready."""
        return self._starting
