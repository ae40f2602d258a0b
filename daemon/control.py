"""Operator commands on per-device state: list devices, show one, restart its warm-up,
silence its alerts for a while, acknowledge its active alert, forget one taken out of
service; and the queue that also carries the model reload (run by ``daemon.reload``).

The scorer thread owns the pipeline's per-device state (``daemon.fleet``: trackers that
``Fleet.restore`` replaces); HTTP threads never
touch it. They put a :class:`Command` on a :class:`ControlQueue` and wait, bounded, for its
result; the scorer drains the queue between micro-batches (an idle scorer wakes at least
every 0.1 s: ``daemon.batching.next_batch``'s poll) and runs each command with
:class:`DeviceControl`.

Reads go through the queue too, not through a shared snapshot: the scorer inserts devices
into those dicts and updates baselines' arrays in place, so a read from another thread
could fail mid-iteration or see a half-fitted baseline; a snapshot kept fresh for readers
would cost every batch on the hot path for a request an operator makes now and then.

The command line's side (``anomalyd devices`` / ``rewarm`` / ``silence`` / ``ack`` /
``forget``) is ``daemon.device_client``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog

from daemon.alerts import Acknowledgement
from daemon.errors import AnomalydError
from daemon.payloads import Outbound, Payloads, acknowledgement, iso

if TYPE_CHECKING:
    from daemon.alerts import AlertState
    from daemon.metrics import Metrics
    from daemon.pipeline import Pipeline

log = structlog.get_logger("anomalyd.control")

#: How long an HTTP request waits for the scorer to take and run its command.
COMMAND_TIMEOUT_S = 5.0
#: How long ``POST /models/reload`` waits: loading and verifying take ~0.5-1 s.
RELOAD_TIMEOUT_S = 30.0
#: The longest silence an operator may set (a forgotten one ends by itself).
MAX_SILENCE_S = 7 * 24 * 3600.0
#: The longest "by" and "note" of an acknowledgement (characters).
ACK_TEXT_LIMITS = {"by": 64, "note": 500}
CLEARED_TEXT = (
    "cleared by an operator's re-warm-up: the device's baseline and alert state were reset"
)


class ControlError(AnomalydError):
    """A device command could not be carried out (the message says why)."""


def check_silence(seconds: float, as_given: str) -> float:
    """``seconds`` if it is a silence's length (0 lifts one); else ControlError naming
    the range and the value ``as_given``."""
    if not 0 <= seconds <= MAX_SILENCE_S:  # NaN fails too
        raise ControlError(f"a silence lasts 0 (lift it) to {MAX_SILENCE_S:g} seconds, "
                           f"not {as_given[:40]!r}")
    return seconds


def check_ack_text(by: str | None, note: str | None) -> None:
    """ControlError unless ``by`` and ``note`` fit an acknowledgement (``check_ack_field``)."""
    check_ack_field("by", by)
    check_ack_field("note", note)


def check_ack_field(name: str, text: str | None) -> None:
    """ControlError unless ``text`` (None: not given) fits the acknowledgement's field
    ``name``: at most ``ACK_TEXT_LIMITS[name]`` characters, none a control character."""
    if text is None:
        return
    limit = ACK_TEXT_LIMITS[name]
    if len(text) > limit:
        raise ControlError(f"an acknowledgement's {name!r} has at most {limit} characters, "
                           f"not {len(text)}")
    if not text.isprintable():
        raise ControlError(f"an acknowledgement's {name!r} holds a control character "
                           "(a line break, a tab, ...)")


class UnknownDeviceError(ControlError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"unknown device {device_id!r}")
        self.device_id = device_id


class ControlUnavailableError(ControlError):
    """The scorer did not run the command: stopped, or busy past the time bound."""


class ControlFailedError(ControlError):
    """The command raised inside anomalyd (a bug; logged with its traceback)."""


class NotOwnerError(ControlError):
    """A silence for a device another worker judges (device dispatch): set here, it would
    never be used, and the device would page during it."""

    def __init__(self, device_id: str, owner: int) -> None:
        super().__init__(f"device {device_id!r} is judged by worker {owner}: a silence set "
                         f"here would not silence it (anomalyd silence finds the worker)")
        self.owner = owner


class ReloadFailedError(ControlError):
    """The new model set was not taken; the old one keeps serving (the message says why)."""


@dataclass(frozen=True, slots=True)
class Command:
    action: Literal["list", "show", "rewarm", "silence", "ack", "forget", "reload"]
    device_id: str = ""
    seconds: float = 0.0  # "silence": for how long from now (0 lifts a silence)
    by: str | None = None  # "ack": who acknowledges, and a note
    note: str | None = None


class _Pending:
    """One submitted command; whoever claims it first (scorer or a timed-out caller) wins."""

    __slots__ = ("_claimed", "_lock", "command", "done", "error", "result")

    def __init__(self, command: Command) -> None:
        self.command = command
        self.done = threading.Event()
        self.result: Any = None
        self.error: ControlError | None = None
        self._lock = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        with self._lock:
            claimed, self._claimed = self._claimed, True
            return not claimed

    def finish(self, result: Any = None, error: ControlError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class ControlQueue:
    """Commands from HTTP threads to the scorer thread, each answered once."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._queue: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed: str | None = None
        self._metrics = metrics

    def call(self, command: Command, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        """Run ``command`` on the scorer thread and return its result (any thread).

        Raises the ControlError the command raised (e.g. UnknownDeviceError), or
        ControlUnavailableError if the scorer has stopped or did not take the command within
        ``timeout`` (it is then never run).
        """
        pending = _Pending(command)
        with self._lock:  # so close() cannot miss a command put after it drained
            if self._closed is not None:
                raise ControlUnavailableError(self._closed)
            self._queue.put(pending)
        if not pending.done.wait(timeout):
            if pending.claim():
                raise ControlUnavailableError(
                    f"the scorer did not take the command within {timeout:g} s (busy, or "
                    "held up by the broker); nothing was changed"
                )
            # The scorer took it just now: it changes memory at once, only publishing can
            # take long (a full publish window), so wait once more, then say so.
            if not pending.done.wait(timeout):
                raise ControlUnavailableError(
                    "the command started but did not finish in time (publishing to the "
                    "broker is held up); see the daemon's log"
                )
        if pending.error is not None:
            raise pending.error
        return pending.result

    def submit(self, command: Command) -> bool:
        """Queue ``command`` without waiting for it (a signal handler); False if refused.

        Never blocks: no lock, so safe in a signal handler (``SimpleQueue.put`` is
        reentrant). A command that slips in after ``close`` is simply never run, which is
        harmless for a command nobody waits for; its executor logs the outcome.
        """
        if self._closed is not None:
            return False
        self._queue.put(_Pending(command))
        return True

    def drain(self, execute: Callable[[Command], Any]) -> int:
        """Run every queued command with ``execute`` (scorer thread); how many ran."""
        ran = 0
        while not self._queue.empty():
            pending = self._queue.get_nowait()  # the scorer is the only consumer
            if not pending.claim():
                continue  # its caller gave up waiting
            try:
                pending.finish(result=execute(pending.command))
            except ControlError as exc:
                pending.finish(error=exc)
            except Exception:
                # A bug in a command must not stop the scorer: log, count, answer 500.
                log.exception(
                    "control_command_failed",
                    action=pending.command.action,
                    device_id=pending.command.device_id,
                )
                if self._metrics is not None:
                    self._metrics.callback_errors.labels("control").inc()
                pending.finish(
                    error=ControlFailedError("the command failed inside anomalyd; see its log")
                )
            ran += 1
        return ran

    def close(self, reason: str) -> None:
        """Refuse further commands and answer the queued ones (the scorer has stopped)."""
        with self._lock:
            self._closed = reason
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            if pending.claim():
                pending.finish(error=ControlUnavailableError(reason))


class DeviceControl:
    """Runs commands against the pipeline's per-device state (the scorer thread only)."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        publish: Callable[[Outbound], bool],
        save: Callable[[], None],
        clock: Callable[[], float] = time.time,
        owner: Callable[[str], int] | None = None,
        index: int | None = None,
    ) -> None:
        """``owner`` and ``index``: under device dispatch, which worker judges a device,
        and this worker's index."""
        self.owner, self.index = owner, index
        self.pipeline = pipeline
        self.metrics = metrics
        self.publish = publish
        self.save = save
        self.clock = clock

    def execute(self, command: Command) -> dict[str, Any]:
        if command.action == "list":
            known = sorted(self._heard_of() | self.pipeline.alert_states.silences.keys())
            return {"devices": [self.show(d) for d in known]}
        if command.action == "show":
            return self.show(command.device_id)
        if command.action == "silence":
            if command.seconds and self.owner is not None:
                judge = self.owner(command.device_id)
                if judge != self.index:  # lifting one (a stray) stays allowed
                    raise NotOwnerError(command.device_id, judge)
            return self.silence(command.device_id, command.seconds)
        if command.action == "ack":
            return self.acknowledge(command.device_id, command.by, command.note)
        if command.action == "forget":
            return self.forget(command.device_id)
        return self.rewarm(command.device_id)

    def _heard_of(self) -> set[str]:
        """The devices whose readings were judged and of which something is kept (state,
        alert state, presence): those listed, but for the ones only silenced."""
        p = self.pipeline  # its trackers are looked up per call: restore replaces them
        return (p.devices.devices.keys() | p.alert_states.devices.keys()
                | p.presence.last_seen.keys())

    def show(self, device_id: str) -> dict[str, Any]:
        """Warm-up progress, baseline threshold, alert state and, with
        ``alerts.quiet_after_s`` set, when its last reading was judged; no arrays."""
        p = self.pipeline
        device = p.devices.summary(device_id)
        alert = p.alert_states.summary(device_id)
        until = p.alert_states.silenced_until(device_id, self.clock())
        seen = p.presence.summary(device_id)
        if device is None and alert is None and until is None and seen is None:
            raise UnknownDeviceError(device_id)
        if alert is None:
            alert = {"active": False}
        else:
            if alert["raised_at"] is not None:
                alert["raised_at"] = iso(alert["raised_at"])
            if alert["acknowledged"] is not None:
                alert["acknowledged"]["at"] = iso(alert["acknowledged"]["at"])
        alert["silenced_until"] = None if until is None else iso(until)
        shown = {"device_id": device_id, **(device or p.devices.unseen_summary()),
                 "alert": alert}
        if shown.get("newest_timestamp") is not None:
            shown["newest_timestamp"] = iso(shown["newest_timestamp"])
        if shown.get("drift") is not None:  # the input by its name
            drift = shown["drift"]
            shown["drift"] = {**drift, "input": p.bundle.model_features[drift["input"]]}
        if p.presence.enabled:
            shown["last_seen"] = None if seen is None else iso(seen["last_seen"])
            shown["quiet"] = seen is not None and seen["quiet"]
        return shown

    def silence(self, device_id: str, seconds: float) -> dict[str, Any]:
        """Silence the device's alerts for ``seconds`` from now (0: lift the silence):
        its verdicts are still published, but raise, escalate and resolve nothing until
        then. The state file is written at once.

        A device this process has not seen yet may be silenced too (``known`` says
        whether it has): a maintenance may start before the device reports, and with
        ``WORKERS=N`` under shared dispatch any worker may receive its next reading (under
        device dispatch ``anomalyd silence`` asks the device's owner only).
        """
        check_silence(seconds, f"{seconds:g}")
        alerts = self.pipeline.alert_states
        now = self.clock()
        was = alerts.silenced_until(device_id, now)
        known = device_id in self._heard_of()
        until = now + seconds if seconds else None
        alerts.silence(device_id, until)
        self.save()
        self.metrics.silences.labels("set" if until else "lifted").inc()
        result = {
            "device_id": device_id,
            "silenced_until": None if until is None else iso(until),
            "was_silenced_until": None if was is None else iso(was),
            "alert_active": alerts.is_active(device_id),
            "known": known,
        }
        log.info("device_silenced" if until else "device_silence_lifted", **result)
        return result

    def acknowledge(self, device_id: str, by: str | None, note: str | None) -> dict[str, Any]:
        """Acknowledge the device's active alert: someone is on it. Its retained alert is
        published again with ``state: "acknowledged"`` and who, when and the note; the
        alert still escalates (which drops the acknowledgement) and resolves as usual.
        A device without an active alert is answered with ``alert_active: false`` and
        nothing changes (with ``WORKERS=N`` another worker may hold its alert). The state
        file is written at once."""
        check_ack_text(by, note)
        self.show(device_id)  # UnknownDeviceError unless listed (as rewarm): one "known"
        p = self.pipeline
        ack = Acknowledgement(self.clock(), by, note)
        st = p.alert_states.acknowledge(device_id, ack)
        if st is None:
            return {"device_id": device_id, "alert_active": False, "acknowledged": None,
                    "published": False}
        published = self.publish(p.payloads.acknowledged_alert(device_id, st, ack, ack.at))
        self.save()
        self.metrics.acknowledgements.inc()
        result = {"device_id": device_id, "alert_active": True, "severity": st.severity,
                  "acknowledged": acknowledgement(ack), "published": published}
        log.info("alert_acknowledged", **result)
        return result

    def rewarm(self, device_id: str) -> dict[str, Any]:
        """Forget the device's window, baseline and alert state; its next reading starts a
        new warm-up. An active alert is replaced at the broker by a retained "cleared"
        state, so subscribers do not keep a raised alert nothing will resolve. The state
        file is written at once."""
        before = self.show(device_id)
        p = self.pipeline
        p.devices.forget(device_id, keep_seqs=True)  # a redelivery is still a repeat
        old_alert = p.alert_states.forget(device_id)
        cleared = False
        if old_alert is not None and old_alert.active:
            out = cleared_alert(
                p.payloads, device_id, old_alert, self.clock(), warming_up=p.devices.warmup > 0
            )
            cleared = self.publish(out)
            if not cleared:
                log.warning(
                    "rewarm_alert_not_cleared",
                    device_id=device_id,
                    note="stopping before the broker took the cleared alert state",
                )
        self.save()
        self.metrics.rewarms.inc()
        self.metrics.devices.set(len(p.devices.devices))  # else stale until the next batch
        log.info(
            "device_rewarmed",
            device_id=device_id,
            warmup_seen=before.get("warmup_seen"),
            baseline_threshold=before.get("baseline_threshold"),
            drift=before.get("drift"),  # what its baseline had absorbed since its warm-up
            alert_was_active=before["alert"]["active"],
            alert_cleared=cleared,
        )
        return {
            "device_id": device_id,
            "rewarmed": True,
            "warmup_readings": p.devices.warmup,
            "alert_cleared": cleared,
            "before": before,
        }


    def forget(self, device_id: str) -> dict[str, Any]:
        """Drop everything kept of a device taken out of service (window, baseline, alert
        state, silence, last seen), which also makes room under ``limits.max_devices``,
        and delete its retained alert and presence messages at the broker (an empty
        retained message deletes one), so dashboards stop showing it. A device this
        process does not know is forgotten all the same (``known`` says so): its retained
        messages may outlive the state of a worker that knew it. The state file is written
        at once. Its next reading, if any, makes it a new device."""
        p = self.pipeline
        try:
            before: dict[str, Any] | None = self.show(device_id)
        except UnknownDeviceError:
            before = None
        p.fleet.forget(device_id)
        cleared = all([self.publish(out) for out in p.payloads.clear_retained(device_id)])
        if not cleared:
            log.warning("forget_retained_not_cleared", device_id=device_id,
                        note="stopping before the broker took the empty retained messages")
        self.save()
        self.metrics.forgets.inc()
        self.metrics.devices.set(len(p.devices.devices))
        result = {"device_id": device_id, "known": before is not None,
                  "retained_cleared": cleared, "before": before}
        log.info("device_forgotten", device_id=device_id, known=before is not None,
                 alert_was_active=before is not None and before["alert"]["active"],
                 retained_cleared=cleared)
        return result


def cleared_alert(
    payloads: Payloads, device_id: str, previous: AlertState, now: float, warming_up: bool
) -> Outbound:
    """The retained alert state saying a re-warm-up cleared the device's alert.

    ``Payloads.alert``'s shape where it applies, with ``state: "cleared"`` and
    ``reason: "rewarm"``; no verdict caused it, so the verdict's own fields (key, seq,
    scores, model) are absent.
    """
    at = iso(now)
    body: dict[str, Any] = {
        **payloads.alert_of_state(device_id, previous),
        "state": "cleared",
        "active": False,
        "reason": "rewarm",
        "timestamp": at,
        "resolved_at": at,
        "published_at": at,
        "anomalous_in_window": 0,
        "warming_up": warming_up,
        "explanation": CLEARED_TEXT,
        "contributions": [],
    }
    return payloads.alert(device_id, body)
