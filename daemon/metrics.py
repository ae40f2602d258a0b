"""Every Prometheus metric anomalyd exposes, defined once; the registry is passed in.

The score-margin histogram and the input-shift gauges are accumulated per batch with numpy
and collected at scrape time: ``daemon.score_stats``, registered here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from daemon.score_stats import ScoreStats

if TYPE_CHECKING:
    from daemon.pipeline import BatchStats

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    """The daemon's metrics. Build one per process (tests build one per registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "anomalyd_messages_received", "MQTT messages received on the readings subscription",
            registry=r,
        )
        self.others_messages = Counter(
            "anomalyd_messages_for_other_workers",
            "Messages received for devices another worker owns (WORKERS > 1, device "
            "dispatch): acknowledged unread", registry=r,
        )
        self.qos0_readings = Counter(
            "anomalyd_qos0_readings",
            "Messages on the readings subscription that their device published at QoS 0 "
            "(judged; but the broker keeps none for anomalyd while it is away)",
            registry=r,
        )
        self.retained_skipped = Counter(
            "anomalyd_retained_readings_skipped",
            "Readings delivered with the retain flag (the broker's stored copy, sent at each "
            "subscription), acknowledged unjudged (readings.retained = \"skip\")",
            registry=r,
        )
        self.empty_skipped = Counter(
            "anomalyd_empty_messages_skipped",
            "Zero-length messages on the readings subscription (what a client publishes to "
            "clear a retained reading), acknowledged unjudged",
            registry=r,
        )
        self.readings = Counter(
            "anomalyd_readings", "Readings by outcome (normal, anomaly, rejected)",
            ["outcome"], registry=r,
        )
        self.dead_letters = Counter(
            "anomalyd_dead_letters", "Dead-letter records published, by reason",
            ["reason"], registry=r,
        )
        self.anomalies = Counter(
            "anomalyd_anomalies", "Readings judged anomalous, by detector", ["detector"],
            registry=r,
        )
        self.repeats = Counter(
            "anomalyd_repeated_readings",
            "Readings whose seq the device had sent before (redeliveries): judged again, "
            "no state changed", registry=r,
        )
        self.unread_time_fields = Counter(
            "anomalyd_unread_time_fields",
            "Devices whose readings carry their time under a name anomalyd does not read "
            "(ts, time, Zeit, ...; it reads timestamp): stamped on receipt. Counted, and "
            "logged as time_field_not_read, once per device and process, by the field",
            ["field"], registry=r,
        )
        self.late = Counter(
            "anomalyd_late_readings",
            "Readings older than their device's newest by more than readings.late_after_s: "
            "judged apart (no state changed) or, with late_policy drop, dead-lettered",
            registry=r,
        )
        self.clock_resets = Counter(
            "anomalyd_device_clock_resets",
            "Devices whose every reading was late for readings.late_after_s: their clock "
            "is taken to have moved back, and their readings are on time again",
            registry=r,
        )
        self.alerts = Counter(
            "anomalyd_alerts", "Alerts published, by severity", ["severity"], registry=r,
        )
        self.batch_size = Histogram(
            "anomalyd_batch_size", "Readings per scored micro-batch", ["detector"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.scoring_seconds = Histogram(
            "anomalyd_scoring_seconds", "Time to score one micro-batch", ["detector"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "anomalyd_end_to_end_seconds",
            "From receipt of a message to the broker's acknowledgement of its verdict",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "anomalyd_queue_depth", "Messages received and not yet scored", registry=r,
        )
        self.outstanding_publishes = Gauge(
            "anomalyd_outstanding_publishes",
            "Verdicts, alerts and dead letters published and not yet acknowledged by the broker",
            registry=r,
        )
        self.unacked_inputs = Gauge(
            "anomalyd_unacked_inputs", "Received messages not yet acknowledged to the broker",
            registry=r,
        )
        self.connected = Gauge(
            "anomalyd_broker_connected", "1 while connected to the MQTT broker", registry=r,
        )
        self.reconnects = Counter(
            "anomalyd_broker_reconnects", "Successful connections after the first", registry=r,
        )
        self.missing = Counter(
            "anomalyd_readings_missing",
            "Readings devices numbered (seq) that never arrived: seq values skipped and not "
            "filled in by a late reading within 64 of the highest", registry=r,
        )
        self.last_reading = Gauge(
            "anomalyd_last_reading_timestamp_seconds",
            "When the newest message this daemon judged was received (0: none since start)",
            registry=r,
        )
        self.sessions_lost = Counter(
            "anomalyd_broker_sessions_lost",
            "Connections on which the broker no longer had the daemon's session: readings "
            "published meanwhile were not kept for it", registry=r,
        )
        self.connection_errors = Counter(
            "anomalyd_broker_connection_errors", "Failed or refused connection attempts, by reason",
            ["reason"], registry=r,
        )
        self.oversize_results = Counter(
            "anomalyd_oversize_results",
            "Results larger than the broker's packet size limit, by kind and what was done "
            "(split, truncated, shortened, replaced, dropped)", ["kind", "action"], registry=r,
        )
        self.publish_refusals = Counter(
            "anomalyd_publish_refusals",
            "Verdicts, alerts and dead letters the broker refused (MQTT 5 PUBACK reason, e.g."
            " its ACL), each refusal counted; every one is published again until accepted",
            ["reason"], registry=r,
        )
        self.callback_errors = Counter(
            "anomalyd_callback_errors", "Exceptions caught at an I/O edge, by where",
            ["where"], registry=r,
        )
        self.intake_waits = Counter(
            "anomalyd_intake_waits",
            "Times the intake stopped reading from the broker because the queue was full",
            registry=r,
        )
        self.rewarms = Counter(
            "anomalyd_device_rewarms",
            "Devices whose window, baseline and alert state an operator reset (POST rewarm)",
            registry=r,
        )
        self.silences = Counter(
            "anomalyd_device_silences",
            "Operator silences of a device's alerts (POST silence), set or lifted",
            ["action"], registry=r,
        )
        self.acknowledgements = Counter(
            "anomalyd_alert_acknowledgements",
            "Active alerts an operator acknowledged (POST ack)", registry=r,
        )
        self.forgets = Counter(
            "anomalyd_device_forgets",
            "Devices an operator had forgotten (POST forget): state dropped, retained alert "
            "and presence deleted", registry=r,
        )
        self.state_saved = Gauge(
            "anomalyd_state_saved_timestamp_seconds",
            "When the per-device state file was last written (Unix time; 0 = not yet): "
            "alert if it falls behind state.save_interval_s by much", registry=r,
        )
        self.devices = Gauge(
            "anomalyd_devices",
            "Devices with state (window, baseline); limits.max_devices bounds it", registry=r,
        )
        self.model_reloads = Counter(
            "anomalyd_model_reloads",
            "Model set reloads without a restart, by outcome (ok; failed: the old set kept "
            "serving)",
            ["outcome"], registry=r,
        )
        self.model_info = Info(
            "anomalyd_model", "The loaded model set", registry=r,
        )
        self.shadow_verdicts = Counter(
            "anomalyd_shadow_verdicts",
            "Readings judged by the serving and the shadow (candidate) model set, by each "
            "one's final verdict (model.shadow_dir)",
            ["serving", "candidate"], registry=r,
        )
        self.shadow_scoring_seconds = Counter(
            "anomalyd_shadow_scoring_seconds",
            "Time spent scoring readings with the shadow model set", registry=r,
        )
        self.presence_changes = Counter(
            "anomalyd_presence_changes",
            "Devices announced quiet (no reading judged for alerts.quiet_after_s) or "
            "reporting (first seen, or back)", ["state"], registry=r,
        )
        self.quiet_devices = Gauge(
            "anomalyd_quiet_devices",
            "Devices announced quiet and not reporting again (alerts.quiet_after_s)",
            registry=r,
        )
        self.drifted_devices = Gauge(
            "anomalyd_drifted_devices",
            "Devices whose adapted baseline centre has drifted more than "
            "baseline.drift_warn_spreads conditional spreads from its warm-up fit (0 when off)",
            registry=r,
        )
        self.score_stats = ScoreStats()  # anomalyd_score_margin, anomalyd_input_shift_sigma
        r.register(self.score_stats)

    def record_batch(self, stats: BatchStats) -> None:
        """Count what one micro-batch did (``Pipeline.process``'s statistics)."""
        for reason in stats.rejections:
            self.dead_letters.labels(reason).inc()
        if stats.rejected:
            self.readings.labels("rejected").inc(stats.rejected)
        for detector, (n, n_anom, secs) in stats.by_detector.items():
            self.batch_size.labels(detector).observe(n)
            self.scoring_seconds.labels(detector).observe(secs)
            if n_anom:
                self.anomalies.labels(detector).inc(n_anom)
        normal = stats.readings - stats.anomalies
        if normal:
            self.readings.labels("normal").inc(normal)
        if stats.anomalies:
            self.readings.labels("anomaly").inc(stats.anomalies)
        if stats.repeats:
            self.repeats.inc(stats.repeats)
        if stats.late:
            self.late.inc(stats.late)
        if stats.missing:
            self.missing.inc(stats.missing)
        if stats.clock_resets:
            self.clock_resets.inc(len(stats.clock_resets))
        for sev in stats.alert_severities:
            self.alerts.labels(sev).inc()
        if stats.reporting:
            self.presence_changes.labels("reporting").inc(stats.reporting)
        if stats.shadow:
            for (serving, candidate), n in stats.shadow.items():
                self.shadow_verdicts.labels(_VERDICT[serving], _VERDICT[candidate]).inc(n)
            self.shadow_scoring_seconds.inc(stats.shadow_seconds)
        for detector, margins in stats.margins.items():
            self.score_stats.observe_margins(detector, margins)
        if stats.zscores:
            z = stats.zscores[0] if len(stats.zscores) == 1 else np.concatenate(stats.zscores)
            self.score_stats.observe_inputs(stats.inputs, z)


_VERDICT = {True: "anomaly", False: "normal"}
