"""The command line's side of device control and model reload: ``anomalyd devices``,
``rewarm``, ``silence``, ``ack``, ``forget`` and ``reload`` talking to a running daemon's
HTTP port (the daemon's side is ``daemon.control`` and ``daemon.reload``). Each command
returns its exit code (``daemon.exit_codes``); ``daemon.cli`` parses the arguments."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson

from daemon.control import COMMAND_TIMEOUT_S, MAX_SILENCE_S, RELOAD_TIMEOUT_S, ControlError
from daemon.errors import ConfigError
from daemon.exit_codes import EXIT_FAILURE, EXIT_OK
from daemon.watch import flapping_note

if TYPE_CHECKING:
    from daemon.config import Settings


class DaemonUnreachableError(ControlError):
    """Nothing answered on the daemon's HTTP port."""


def worker_urls(settings: Settings) -> list[str]:
    """The base URL of the daemon's HTTP port, or of each worker's with WORKERS=N."""
    http = settings.http
    if http.port == 0:
        raise ConfigError(
            "http.port is 0 (a random port): set http.port or HEALTH_PORT to "
            "the port the daemon listens on"
        )
    host = http.host
    if host in ("", "0.0.0.0"):  # noqa: S104 (bound to all interfaces: loopback reaches it)
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    n = settings.service.workers
    return [f"http://{host}:{http.port + i}" for i in range(n)]


# Never through an http_proxy from the environment: the daemon is local, the token private.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ask(
    base: str, method: str, path: str, token: str | None, timeout: float = COMMAND_TIMEOUT_S + 5
) -> tuple[int, Any]:
    """One request to a running daemon: (status, JSON body). DaemonUnreachableError if no answer."""
    req = urllib.request.Request(  # noqa: S310 (an http:// URL from worker_urls)
        base + path, method=method, data=b"" if method == "POST" else None
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError as exc:  # URLError, refused, timed out
        reason = getattr(exc, "reason", exc)
        raise DaemonUnreachableError(
            f"cannot reach the daemon at {base} ({reason}); is it running, and do "
            "http.host/http.port (HEALTH_HOST/HEALTH_PORT) match its configuration?"
        ) from exc
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, {"error": raw[:200].decode("utf-8", "replace")}


def ask_workers(
    settings: Settings,
    method: str,
    path: str,
    timeout: float = COMMAND_TIMEOUT_S + 5,
    errors: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Send the request to the daemon (every worker with WORKERS=N); the 200 answers.

    An unknown-device 404 means that worker does not hold the device (it is left out);
    any other error answer raises ControlError with the daemon's message (or
    DaemonUnreachableError); given an ``errors`` list, either is appended to it instead and
    the other workers are still asked.
    """
    urls = worker_urls(settings)
    token = settings.http.secret()
    answers = []
    for i, base in enumerate(urls):
        try:
            status, body = ask(base, method, path, token, timeout)
        except DaemonUnreachableError as exc:
            if errors is None:
                raise
            errors.append(str(exc))
            continue
        if status == 200:
            if len(urls) > 1:
                body["worker"] = i
            answers.append(body)
        elif not (status == 404 and isinstance(body, dict) and "device_id" in body):
            error = body.get("error") if isinstance(body, dict) else body
            message = f"{base}{path} answered {status}: {error}"
            if errors is None:
                raise ControlError(message)
            errors.append(message)
    return answers


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
    """One line per device for ``anomalyd devices``."""
    lines = [f"{'DEVICE':<24} {'WARM-UP':<12} {'THRESHOLD':<10} {'DRIFT':<30} ALERT"]
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
            alert += " (warm-up verdicts page no one)"
        if a["active"] and a.get("flapping"):
            alert += flapping_note(a.get("resolve_after"))
        if a.get("acknowledged"):
            alert += f" (acknowledged by {a['acknowledged']['by'] or 'someone'})"
        if a.get("silenced_until"):
            alert += f" (silenced until {a['silenced_until']})"
        if d.get("quiet"):
            alert += f" (quiet: last reading {d['last_seen']})"
        name = d["device_id"] + (f" (worker {d['worker']})" if "worker" in d else "")
        lines.append(f"{name:<24} {warm:<12} {'-' if thr is None else f'{thr:.3g}':<10} "
                     f"{moved:<30} {alert}")
    return "\n".join(lines)


# -- the commands ------------------------------------------------------------------------


def show_devices(
    settings: Settings, device_id: str | None, *, as_json: bool, alerts_only: bool = False
) -> int:
    """``anomalyd devices [ID] [--alerts]``: every worker's devices as a table (or JSON),
    only those in alert, or one device."""
    if device_id is None:
        devices = [
            {**d, **({"worker": w["worker"]} if "worker" in w else {})}
            for w in ask_workers(settings, "GET", "/devices")
            for d in w["devices"]
            if d["alert"]["active"] or not alerts_only
        ]
        if as_json:
            sys.stdout.buffer.write(orjson.dumps(devices, option=orjson.OPT_INDENT_2) + b"\n")
        else:
            print(device_table(devices))
        return EXIT_OK
    found = ask_workers(settings, "GET", f"/devices/{_path(device_id)}")
    if not found:
        print(f"error: the daemon does not know device {device_id!r}", file=sys.stderr)
        return EXIT_FAILURE
    for d in found:
        sys.stdout.buffer.write(orjson.dumps(d, option=orjson.OPT_INDENT_2) + b"\n")
    return EXIT_OK


def rewarm(settings: Settings, device_id: str) -> int:
    """``anomalyd rewarm ID``."""
    done = ask_workers(settings, "POST", f"/devices/{_path(device_id)}/rewarm")
    if not done:
        print(f"error: the daemon does not know device {device_id!r}", file=sys.stderr)
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
    done = ask_workers(settings, "POST", f"/devices/{_path(device_id)}/forget")
    if not any(d["known"] for d in done):
        print(f"note: the daemon does not know device {device_id!r} (a typo?); its retained "
              "messages were deleted anyway", file=sys.stderr)
    failed = False
    for d in done:
        # (with several workers, each deletes the retained messages; only the one that
        # held the device forgot anything)
        what = "forgotten" if d["known"] or len(done) == 1 else "not held by this worker"
        if d["retained_cleared"]:
            print(f"{d['device_id']}{_on_worker(d)}: {what}; its retained alert and "
                  "presence were deleted")
        else:
            failed = True
            print(f"{d['device_id']}{_on_worker(d)}: forgotten, but the daemon stopped before "
                  "the broker took the deletion of its retained messages", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def silence(settings: Settings, device_id: str, seconds: float) -> int:
    """``anomalyd silence ID --for D`` (``seconds`` 0: ``--off``)."""
    done = ask_workers(settings, "POST", f"/devices/{_path(device_id)}/silence/{seconds!r}")
    if not any(d["known"] for d in done):
        print(f"note: the daemon has not seen device {device_id!r} yet (a typo?); done anyway",
              file=sys.stderr)
    for d in done:
        if d["silenced_until"] is None:
            print(f"{d['device_id']}{_on_worker(d)}: silence lifted; its verdicts count "
                  "towards its alert again")
        else:
            active = "; its active alert stays raised" if d["alert_active"] else ""
            print(f"{d['device_id']}{_on_worker(d)}: alerts silenced until "
                  f"{d['silenced_until']} (verdicts are still published){active}")
    return EXIT_OK


def acknowledge(settings: Settings, device_id: str, by: str | None, note: str | None) -> int:
    """``anomalyd ack ID [--by NAME] [--note TEXT]``: fails if no worker holds an active
    alert for the device."""
    query = urlencode({k: v for k, v in (("by", by), ("note", note)) if v})
    path = f"/devices/{_path(device_id)}/ack" + (f"?{query}" if query else "")
    done = ask_workers(settings, "POST", path)
    if not done:
        print(f"error: the daemon does not know device {device_id!r}", file=sys.stderr)
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
    done = ask_workers(settings, "POST", "/models/reload", RELOAD_TIMEOUT_S + 5, errors)
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


def _path(device_id: str) -> str:
    return quote(device_id, safe="")


def _on_worker(answer: dict[str, Any]) -> str:
    return f" on worker {answer['worker']}" if "worker" in answer else ""
