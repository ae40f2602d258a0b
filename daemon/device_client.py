"""The command line's side of device control and model reload: ``anomalyd devices``,
``rewarm``, ``silence`` and ``reload`` talking to a running daemon's HTTP port (the
daemon's side is ``daemon.control`` and ``daemon.reload``)."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import orjson

from daemon.control import COMMAND_TIMEOUT_S, MAX_SILENCE_S, ControlError
from daemon.errors import ConfigError

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
    lines = [f"{'DEVICE':<24} {'WARM-UP':<12} {'THRESHOLD':<10} ALERT"]
    for d in devices:
        if not d.get("warmup_readings"):
            warm = "off"
        else:
            warm = f"{d.get('warmup_seen', 0)}/{d['warmup_readings']}"
            warm += " warming" if d.get("warming_up") else ""
        thr = d.get("baseline_threshold")
        a = d["alert"]
        alert = f"{a['severity']} since {a['raised_at']}" if a["active"] else "-"
        if a.get("silenced_until"):
            alert += f" (silenced until {a['silenced_until']})"
        name = d["device_id"] + (f" (worker {d['worker']})" if "worker" in d else "")
        lines.append(f"{name:<24} {warm:<12} {'-' if thr is None else f'{thr:.3g}':<10} {alert}")
    return "\n".join(lines)
