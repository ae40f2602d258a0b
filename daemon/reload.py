"""Replacing the model set of a running daemon: build the scoring objects for a bundle, and
reload the configured ``model.dir`` without a restart.

A reload runs on the scorer thread only, between micro-batches (a ``Command("reload")`` on
``daemon.control``'s queue, put there by ``POST /models/reload``, ``anomalyd reload`` or
SIGHUP), so no batch is scored half by one model set and half by the other. Everything new
is built first: if loading, verifying or building fails, nothing has changed and the old
model set keeps serving. Per-device state moves over with ``Fleet.restore``: alert
states always survive; windows and baselines only for the same features, window and warm-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import structlog

from daemon.control import ReloadFailedError
from daemon.errors import ModelLoadError
from daemon.models import ModelBundle, load_bundle
from daemon.pipeline import Pipeline
from daemon.ratelimit import DeviceRateLimiter
from daemon.readings import Decoder, UnreadTimeFields
from daemon.shadow import ShadowMismatchError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from daemon.config import Settings
    from daemon.control import DeviceControl
    from daemon.metrics import Metrics

log = structlog.get_logger("anomalyd.reload")

def rate_limiter(settings: Settings) -> DeviceRateLimiter | None:
    lim = settings.limits
    return DeviceRateLimiter(lim.device_rate_per_s, lim.device_burst) if (
        lim.device_rate_per_s > 0
    ) else None


def build_scoring(
    settings: Settings,
    bundle: ModelBundle,
    subscription: str,
    limiter: DeviceRateLimiter | None,
    unread_time: UnreadTimeFields | None = None,
) -> tuple[Decoder, Pipeline]:
    """The decoder (it reads the model's features; it tells ``unread_time`` of readings
    whose time is in a field it does not read) and the pipeline for ``bundle``, with
    the shadow model set of ``model.shadow_dir`` loaded, if one is configured
    (ModelLoadError if it cannot be loaded, or, from the pipeline, cannot shadow
    ``bundle``)."""
    s = settings
    shadow = None if s.model.shadow_dir is None else load_bundle(s.model.shadow_dir)
    decoder = Decoder(
        bundle.features,
        bundle.detector_names,
        subscription=subscription,
        max_payload_bytes=s.limits.max_payload_bytes,
        max_batch_readings=s.limits.max_batch_readings,
        device_id_pattern=s.limits.device_id_pattern,
        unread_time=unread_time,
    )
    try:
        pipeline = Pipeline(
            bundle, decoder, s.topics, s.alerts, s.model.default_detector,
            s.limits.max_payload_bytes, limiter, warmup=s.baseline.warmup_readings,
            shadow=shadow, max_devices=s.limits.max_devices,
            threshold_margin=s.baseline.threshold_margin, readings=s.readings,
        )
    except ShadowMismatchError as exc:
        raise ShadowMismatchError(
            f"{exc}. Point model.shadow_dir (MODEL_SHADOW_DIR) at a candidate trained on the "
            f"same features and window, or leave it out (a restart) to serve this set "
            f"without a shadow") from None
    return decoder, pipeline


def unread_time_fields(metrics: Metrics) -> UnreadTimeFields:
    """Logs and counts, once per device, readings whose time field is not read."""

    def say(device: str, field: str) -> None:
        metrics.unread_time_fields.labels(field).inc()
        log.warning("time_field_not_read", device_id=device, field=field,
                    note="readings are stamped on receipt: anomalyd reads a reading's time "
                         "from 'timestamp' only (ISO 8601, or epoch seconds); rename the "
                         "field at the gateway. Said once per device")

    return UnreadTimeFields(say)


def publish_model_info(metrics: Metrics, bundle: ModelBundle, default_detector: str) -> None:
    metrics.model_info.info(
        {"version": bundle.version, "features": ",".join(bundle.features),
         "default_detector": default_detector}
    )


class Scoring(Protocol):
    """What a reload replaces: the service's model set and the objects built from it."""

    settings: Settings
    subscription: str
    metrics: Metrics
    bundle: ModelBundle
    decoder: Decoder
    pipeline: Pipeline
    device_control: DeviceControl

    def save_state(self) -> None: ...


class ModelReloader:
    """Reloads ``settings.model.dir`` into a running :class:`Scoring` (scorer thread only)."""

    def __init__(
        self, target: Scoring, load: Callable[[Path], ModelBundle] = load_bundle
    ) -> None:
        self.target = target
        self.load = load

    def reload(self) -> dict[str, Any]:
        """Load, verify and swap in the configured model set; what was kept.

        Raises ReloadFailedError (logged, counted) with nothing changed if the new set
        cannot be loaded or built. Nobody may wait for the answer (SIGHUP), hence the log.
        """
        t = self.target
        old = t.pipeline
        model_dir = t.settings.model.dir
        try:
            bundle = self.load(model_dir)
            # The rate limiter is not the model's: devices keep their budgets.
            decoder, pipeline = build_scoring(t.settings, bundle, t.subscription, old.limiter,
                                              t.decoder.unread_time)
            devices, alerts, problems = pipeline.fleet.restore(old.fleet.snapshot())
        except Exception as exc:
            self._failed(model_dir, t.bundle.version, exc)
            raise ReloadFailedError(
                f"the model set in {model_dir} was not loaded ({exc}); model "
                f"{t.bundle.version} is still serving"
            ) from exc
        # The swap: plain assignments on the thread that scores, between batches. Readings
        # already queued were decoded by nobody yet, so the new decoder reads them (with the
        # new features if they changed): they are scored by the model now in place.
        old_version = t.bundle.version
        t.bundle, t.decoder, t.pipeline = bundle, decoder, pipeline
        t.device_control.pipeline = pipeline
        publish_model_info(t.metrics, bundle, pipeline.default_detector)
        t.metrics.model_reloads.labels("ok").inc()
        t.save_state()
        for problem in problems:
            log.warning("state_partly_discarded", reason="model reload", error=problem,
                        note="those devices warm up again")
        log.info("model_reloaded", model_dir=str(model_dir), old_version=old_version,
                 shadow_version=None if pipeline.shadow is None else pipeline.shadow.version,
                 new_version=bundle.version, features=list(bundle.features),
                 devices_kept=devices, alert_states_kept=alerts)
        for advice in bundle.outdated:
            log.warning("model_outdated", model_version=bundle.version, advice=advice)
        return {
            "reloaded": True,
            "old_version": old_version,
            "new_version": bundle.version,
            "features": list(bundle.features),
            "default_detector": pipeline.default_detector,
            "shadow_version": None if pipeline.shadow is None else pipeline.shadow.version,
            "devices_kept": devices,
            "alert_states_kept": alerts,
            "problems": problems,
        }

    def _failed(self, model_dir: Path, serving: str, exc: Exception) -> None:
        self.target.metrics.model_reloads.labels("failed").inc()
        if isinstance(exc, ModelLoadError):  # the operator's to fix: no traceback
            log.error("model_reload_failed", model_dir=str(model_dir), error=str(exc),
                      still_serving=serving)
        else:
            log.exception("model_reload_failed", model_dir=str(model_dir), error=repr(exc),
                          still_serving=serving)
