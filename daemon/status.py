"""What the HTTP edge reports about the running service: health, readiness, the model set
and a summary of the configuration. Reads only (HTTP threads); ``daemon.http`` serves it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from daemon import __version__

if TYPE_CHECKING:
    from daemon.service import Service


class ServiceStatus:
    def __init__(self, service: Service) -> None:
        self._service = service

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the MQTT network thread and the scorer are running, or the daemon is
        still starting (waiting for its broker: a probe that restarted it then would only
        start the wait again)."""
        svc = self._service
        mqtt = svc.mqtt
        checks = {
            "mqtt_loop": mqtt.loop_alive and mqtt.loop_crashed is None,
            "worker": svc.scorer_alive,
        }
        ok = all(checks.values()) or svc.starting
        return ok, {
            "status": ("starting" if svc.starting else "ok") if ok else "unhealthy",
            "models_loaded": len(svc.bundle.detector_names),
            "preprocessor_loaded": True,
            "broker_connected": mqtt.connected,
            "checks": checks,
            "timestamp": datetime.now(UTC).isoformat(),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: healthy, connected, not stopping, the broker takes our publishes (a
        refused verdict or alert holds its reading back until it is accepted) and keeps
        our links open (not closing them soon after accepting them, as it does for two
        clients with one client id) and granted the readings' subscription at QoS 1."""
        svc = self._service
        mqtt = svc.mqtt
        connected = mqtt.connected
        ok = (connected and not svc.stopping and self.health()[0] and mqtt.refusal is None
              and mqtt.dropping is None and mqtt.subscription_problem is None
              and mqtt.subscribed)
        body: dict[str, Any] = {"ready": ok, "broker_connected": connected,
                                "models_loaded": len(svc.bundle.detector_names),
                                "stopping": svc.stopping}
        if svc.mqtt.last_error:
            body["broker_error"] = svc.mqtt.last_error
        return ok, body

    def models(self) -> dict[str, Any]:
        p = self._service.pipeline  # one reference: a reload may swap it meanwhile
        described = p.bundle.describe(p.default_detector)
        tally = p.shadow_tally
        described["shadow"] = None if tally is None else tally.describe()
        return described

    def info(self) -> dict[str, Any]:
        svc = self._service
        s = svc.settings
        return {
            "version": __version__,
            "uptime_s": round(time.time() - svc.started_at, 3),
            "broker": {"host": s.mqtt.host, "port": s.mqtt.port,
                       "connected": svc.mqtt.connected, "protocol": s.mqtt.protocol},
            "subscription": svc.subscription,
            "topics": s.topics.model_dump(),
            "model_version": svc.bundle.version,
            "queue_depth": svc.queue.qsize(),
            "awaiting_broker": len(svc.mqtt.window),
            "unacked_inputs": len(svc.mqtt.acks),
            "config": s.masked(),
        }
