"""The command line's side of device control and model reload: ``anomalyd devices``,
``rewarm``, ``silence``, ``ack``, ``forget`` and ``reload`` talking to a running daemon's
HTTP port (the daemon's side is ``daemon.control`` and ``daemon.reload``). Each command
returns its exit code (``daemon.exit_codes``); ``daemon.cli`` parses the arguments."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson

from daemon.control import MAX_SILENCE_S, RELOAD_TIMEOUT_S
from daemon.exit_codes import EXIT_FAILURE, EXIT_OK
from daemon.watch import flapping_note
from daemon.worker_http import Workers

if TYPE_CHECKING:
    from daemon.config import Settings


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``2h`` or ``1d``; a silence's range is
    checked (more than 0, at most ``MAX_SILENCE_S``). ValueError says what is wrong."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    try:
        seconds = float(t[:-1] if unit else t) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration (e.g. 90s, 30m, 2h, 1d): {text!r}") from None
    if not 0 < seconds <= MAX_SILENCE_S:  # NaN fails too
        raise ValueError(f"must be more than 0 and at most {MAX_SILENCE_S / 86400:g} days, "
                         f"got {text!r}")
    return seconds


def device_table(devices: list[dict[str, Any]]) -> str:
    """One line per device for ``anomalyd devices``, in columns as wide as their widest
    entry needs (a long device id or input name does not shift the columns after it)."""
    rows = [("DEVICE", "WARM-UP", "THRESHOLD", "DRIFT", "ALERT")]
    for d in devices:
        if not d.get("warmup_readings"):
            warm = "off"
        else:
            warm = f"{d.get('warmup_seen', 0)}/{d['warmup_readings']}"
            warm += " warming" if d.get("warming_up") else ""
        thr = d.get("baseline_threshold")
        drift = d.get("drift")
        moved = "-" if drift is None else f"{drift['spreads']:+.1f} {drift['input']}"
        a = d["alert"]
        alert = f"{a['severity']} since {a['raised_at']}" if a["active"] else "-"
        if d.get("warmup_alerts") is False:  # a device unlike the fleet, while warming up
            # (an alert raised before the detector was found to flag most of its warm-up
            # stays as it is: "page no one" read as a contradiction beside it)
            alert += " (unlike the training fleet: its warm-up verdicts now feed no alert)"
        if a["active"] and a.get("flapping"):
            alert += flapping_note(a.get("resolve_after"))
        if a.get("acknowledged"):
            alert += f" (acknowledged by {a['acknowledged']['by'] or 'someone'})"
        if a.get("silenced_until"):
            alert += f" (silenced until {a['silenced_until']})"
        if d.get("quiet"):
            alert += f" (quiet: last reading {d['last_seen']})"
        name = d["device_id"] + (f" (worker {d['worker']})" if "worker" in d else "")
        rows.append((name, warm, "-" if thr is None else f"{thr:.3g}", moved, alert))
    widths = [max(minimum, *(len(r[i]) for r in rows))
              for i, minimum in enumerate((24, 12, 10, 30))]
    return "\n".join(" ".join([*(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)), r[-1]])
                     for r in rows)


# -- the commands ------------------------------------------------------------------------
#
# Read-only ones (``devices``) ask every worker; under device dispatch an entry on a worker
# that does not own the device (a stray, see ``Workers.is_stray``) is left out and named on
# stderr. A command that changes a device goes to the workers ``Workers.holders`` names;
# ``silence`` and ``forget`` also drop a stray entry where one is held.


def show_devices(
    settings: Settings, device_id: str | None, *, as_json: bool, alerts_only: bool = False
) -> int:
    """``anomalyd devices [ID] [--alerts]``: every worker's devices as a table (or JSON),
    only those in alert, or one device."""
    workers = Workers(settings)
    if device_id is None:
        found = [
            {**d, **({"worker": w["worker"]} if "worker" in w else {})}
            for w in workers.ask("GET", "/devices")
            for d in w["devices"]
        ]
    else:
        found = workers.ask("GET", f"/devices/{_path(device_id)}")
    strays = [d for d in found if workers.is_stray(d)]
    devices = [d for d in found if not workers.is_stray(d)]
    for d in strays:
        _note_stray(workers, d)
    if device_id is None:
        devices = [d for d in devices if d["alert"]["active"] or not alerts_only]
        if as_json:
            sys.stdout.buffer.write(orjson.dumps(devices, option=orjson.OPT_INDENT_2) + b"\n")
        else:
            print(device_table(devices))
        return EXIT_OK
    if not devices:
        print(f"error: the daemon does not know device {device_id!r}{_owned(workers, device_id)}",
              file=sys.stderr)
        return EXIT_FAILURE
    for d in devices:
        sys.stdout.buffer.write(orjson.dumps(d, option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def rewarm(settings: Settings, device_id: str) -> int:
    """``anomalyd rewarm ID``."""
    workers = Workers(settings)
    done = workers.ask("POST", f"/devices/{_path(device_id)}/rewarm",
                       only=workers.holders(device_id))
    if not done:
        print(f"error: the daemon does not know device {device_id!r}{_owned(workers, device_id)}",
              file=sys.stderr)
        return EXIT_FAILURE
    for d in done:
        cleared = "; its active alert was cleared" if d["alert_cleared"] else ""
        n = d["warmup_readings"]
        then = (f"its next {n} readings warm up again" if n else
                "baselines are off (baseline.warmup_readings = 0), so there is no warm-up")
        print(f"{d['device_id']}{_on_worker(d)}: window, baseline and alert state forgotten; "
              f"{then}{cleared}")
    return EXIT_OK


def forget(settings: Settings, device_id: str) -> int:
    """``anomalyd forget ID``."""
    workers = Workers(settings)
    done = workers.ask("POST", f"/devices/{_path(device_id)}/forget",
                       only=workers.holders(device_id))
    if not any(d["known"] for d in done):
        print(f"note: the daemon does not know device {device_id!r}{_owned(workers, device_id)} "
              "(a typo?); its retained messages were deleted anyway", file=sys.stderr)
    failed = False
    for d in done:
        # (under shared dispatch each worker deletes the retained messages; only those
        # that held the device forgot anything)
        what = "forgotten" if d["known"] or len(done) == 1 else "not held by this worker"
        if d["retained_cleared"]:
            print(f"{d['device_id']}{_on_worker(d)}: {what}; its retained alert and "
                  "presence were deleted")
        else:
            failed = True
            print(f"{d['device_id']}{_on_worker(d)}: forgotten, but the daemon stopped before "
                  "the broker took the deletion of its retained messages", file=sys.stderr)
    _drop_strays(workers, device_id, "forget")
    return EXIT_FAILURE if failed else EXIT_OK


def silence(settings: Settings, device_id: str, seconds: float) -> int:
    """``anomalyd silence ID --for D`` (``seconds`` 0: ``--off``). A device not seen yet is
    silenced all the same (a maintenance may start before it reports): under device
    dispatch on its owner only, the one worker that will judge it."""
    workers = Workers(settings)
    done = workers.ask("POST", f"/devices/{_path(device_id)}/silence/{seconds!r}",
                       only=workers.holders(device_id))
    if not any(d["known"] for d in done):
        owner = workers.layout.owner(device_id)
        who = "the daemon" if owner is None else f"worker {owner}, which owns it,"
        print(f"note: {who} has not seen device {device_id!r} yet (a typo?); done anyway",
              file=sys.stderr)
    for d in done:
        was = d.get("was_silenced_until")
        if d["silenced_until"] is None:
            print(f"{d['device_id']}{_on_worker(d)}: silence lifted; its verdicts count "
                  "towards its alert again")
        else:
            active = "; its active alert stays raised" if d["alert_active"] else ""
            replaced = f"; it replaces the silence until {was}" if was else ""
            print(f"{d['device_id']}{_on_worker(d)}: alerts silenced until "
                  f"{d['silenced_until']} (verdicts are still published){active}{replaced}")
    _drop_strays(workers, device_id, "silence/0.0")
    return EXIT_OK


def acknowledge(settings: Settings, device_id: str, by: str | None, note: str | None) -> int:
    """``anomalyd ack ID [--by NAME] [--note TEXT]``: fails if no worker holds an active
    alert for the device."""
    workers = Workers(settings)
    query = urlencode({k: v for k, v in (("by", by), ("note", note)) if v})
    path = f"/devices/{_path(device_id)}/ack" + (f"?{query}" if query else "")
    done = workers.ask("POST", path, only=workers.holders(device_id))
    if not done:
        print(f"error: the daemon does not know device {device_id!r}{_owned(workers, device_id)}",
              file=sys.stderr)
        return EXIT_FAILURE
    acked = [d for d in done if d["alert_active"]]
    if not acked:
        print(f"error: device {device_id!r} has no active alert to acknowledge",
              file=sys.stderr)
        return EXIT_FAILURE
    failed = False
    for d in acked:
        who = d["acknowledged"]["by"] or "someone"
        if d["published"]:
            print(f"{d['device_id']}{_on_worker(d)}: {d['severity']} alert acknowledged by "
                  f"{who} at {d['acknowledged']['at']}; it still escalates and resolves")
        else:
            failed = True
            print(f"{d['device_id']}{_on_worker(d)}: acknowledged, but the daemon stopped "
                  "before the broker took the acknowledged alert", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def reload(settings: Settings) -> int:
    """``anomalyd reload``: every worker; one's refusal does not hide what the others did."""
    errors: list[str] = []
    done = Workers(settings).ask("POST", "/models/reload", RELOAD_TIMEOUT_S + 5, errors)
    for d in done:
        where = f"worker {d['worker']}: " if "worker" in d else ""
        # (counted apart: a device may have an alert state and no window, or the reverse;
        # a device only silenced has neither, and its silence is always kept)
        print(f"{where}model {d['old_version']} -> {d['new_version']}; kept the windows "
              f"and baselines of {d['devices_kept']} device(s) and "
              f"{d['alert_states_kept']} alert state(s)")
        for problem in d["problems"]:
            print(f"  {where}discarded: {problem}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_FAILURE if errors else EXIT_OK


def _drop_strays(workers: Workers, device_id: str, action: str) -> None:
    """Under device dispatch, run ``action`` (``forget``, or lifting a silence) on the
    workers other than the owner that hold an entry for ``device_id``: strays, which only a
    silence sent to the wrong worker leaves (a non-owner never judges the device, and
    rewarm and ack need a device the worker knows). Best effort: a worker that does not
    answer is named, the command's outcome stands."""
    others = workers.others(device_id)
    if not others:
        return
    errors: list[str] = []
    for d in workers.ask("GET", f"/devices/{_path(device_id)}", errors=errors, only=others):
        if workers.ask("POST", f"/devices/{_path(device_id)}/{action}", errors=errors,
                       only=[d["worker"]]):
            print(f"note: dropped the stray entry worker {d['worker']} held for "
                  f"{device_id!r}{_owned(workers, device_id)}", file=sys.stderr)
    for error in errors:
        print(f"note: could not check for a stray entry: {error}", file=sys.stderr)


def _note_stray(workers: Workers, d: dict[str, Any]) -> None:
    held = d["alert"].get("silenced_until")
    what = f"a silence until {held}" if held else "an entry"
    print(f"note: worker {d['worker']} also holds {what} for {d['device_id']!r}"
          f"{_owned(workers, d['device_id'])}, left by a command that reached the wrong "
          "worker; it has no effect there and is not shown (`anomalyd silence` or `forget` "
          "of the device drops it)", file=sys.stderr)


def _owned(workers: Workers, device_id: str) -> str:
    owner = workers.layout.owner(device_id)
    return "" if owner is None else f" (worker {owner} owns it)"


def _path(device_id: str) -> str:
    return quote(device_id, safe="")


def _on_worker(answer: dict[str, Any]) -> str:
    return f" on worker {answer['worker']}" if "worker" in answer else ""
