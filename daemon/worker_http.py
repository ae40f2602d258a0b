"""Reaching the running daemon's HTTP port, or each of its workers' (``http.port + i``),
by the layout it runs (``daemon.layout``), for the commands of ``daemon.device_client``."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import orjson

from daemon import layout
from daemon.control import COMMAND_TIMEOUT_S, ControlError
from daemon.errors import ConfigError

if TYPE_CHECKING:
    from daemon.config import Settings


class DaemonUnreachableError(ControlError):
    """Nothing answered on the daemon's HTTP port."""


def worker_urls(settings: Settings, workers: int) -> list[str]:
    """The base URL of the daemon's HTTP port, or of each of its ``workers``' (worker i
    listens on ``http.port + i``)."""
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
    return [f"http://{host}:{http.port + i}" for i in range(workers)]


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


class Workers:
    """The running daemon's HTTP ports, by the layout it runs (``daemon.layout.running``:
    its ``layout.json``, which may disagree with this shell's ``WORKERS``; said once on
    stderr)."""

    def __init__(self, settings: Settings) -> None:
        self.layout, note = layout.running(settings)
        if note:
            print(f"note: {note}", file=sys.stderr)
        self.urls = worker_urls(settings, self.layout.workers)
        self.token = settings.http.secret()

    def holders(self, device_id: str) -> list[int]:
        """The workers a command about ``device_id`` goes to: under device dispatch its
        owner only (any other would set a silence, say, that is never used, since only
        the owner judges the device); under shared dispatch every worker, each of which
        may judge its next reading and keeps its own state of it."""
        owner = self.layout.owner(device_id)
        return list(range(self.layout.workers)) if owner is None else [owner]

    def others(self, device_id: str) -> list[int]:
        """Under device dispatch, the workers that do not own ``device_id``."""
        owner = self.layout.owner(device_id)
        return [] if owner is None else [i for i in range(self.layout.workers) if i != owner]

    def ask(
        self,
        method: str,
        path: str,
        timeout: float = COMMAND_TIMEOUT_S + 5,
        errors: list[str] | None = None,
        only: list[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Send the request to every worker (or those ``only`` names); the 200 answers, with
        ``worker`` set when there are several.

        An unknown-device 404 means that worker does not hold the device (it is left out);
        any other error answer raises ControlError with the daemon's message (or
        DaemonUnreachableError); given an ``errors`` list, either is appended to it instead
        and the other workers are still asked.
        """
        answers = []
        for i in range(len(self.urls)) if only is None else only:
            base = self.urls[i]
            try:
                status, body = ask(base, method, path, self.token, timeout)
            except DaemonUnreachableError as exc:
                if errors is None:
                    raise
                errors.append(str(exc))
                continue
            if status == 200:
                if len(self.urls) > 1:
                    body["worker"] = i
                answers.append(body)
            elif not (status == 404 and isinstance(body, dict) and "device_id" in body):
                error = body.get("error") if isinstance(body, dict) else body
                message = f"{base}{path} answered {status}: {error}"
                if status == 401:
                    message += (" (give the daemon's token as it is given to the daemon: "
                                "HEALTH_TOKEN or HEALTH_TOKEN_FILE, or http.token / "
                                "http.token_file in --config)")
                if errors is None:
                    raise ControlError(message)
                errors.append(message)
        return answers

    def is_stray(self, entry: dict[str, Any]) -> bool:
        """Whether a worker's entry is for a device another worker owns (device dispatch):
        left by a command that reached the wrong worker (before the layout was read from
        ``layout.json``); that worker never judges the device, so the entry does nothing
        but get merged into the owner's state at a change of layout."""
        owner = self.layout.owner(entry["device_id"])
        return owner is not None and entry.get("worker", 0) != owner
