"""The HTTP edge: health, readiness, metrics, models and info, the operators' device
commands (``GET /devices``, ``GET /devices/{id}``, ``POST /devices/{id}/rewarm``,
``POST /devices/{id}/silence/{seconds}``, ``POST /devices/{id}/ack?by=...&note=...``,
``POST /devices/{id}/forget``) and the model reload (``POST /models/reload``), on one port.

A bearer token, when configured, guards every path but ``/health``. Requests that change
state (POST) need that token, or, when none is configured, a server bound to a loopback
address: otherwise anyone who can reach the port could reset devices' baselines. A POST
carrying an ``Origin`` header (sent by browsers, not by the command line or curl) is
refused, so a web page cannot reach a token-less loopback port either. Device
commands and the reload run on the scorer thread through ``daemon.control``; errors are JSON.
"""

from __future__ import annotations

import hmac
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from daemon.control import (
    COMMAND_TIMEOUT_S,
    RELOAD_TIMEOUT_S,
    Command,
    ControlError,
    ControlFailedError,
    ControlQueue,
    ControlUnavailableError,
    NotOwnerError,
    ReloadFailedError,
    UnknownDeviceError,
    check_ack_text,
    check_silence,
)
from daemon.errors import ConfigError
from daemon.hosts import is_loopback

log = structlog.get_logger("anomalyd.http")

JSON = "application/json"
MAX_BODY = 65536  # POST bodies are ignored; a larger one is refused, not read
POST_REFUSED = (
    "changing device state or the model set over HTTP needs a bearer token when the server "
    "is not bound to a loopback address: set http.token or http.token_file (HEALTH_TOKEN, "
    "HEALTH_TOKEN_FILE)"
)
FOREIGN_HOST = (
    "a server bound to loopback without a token answers requests for localhost, a "
    "loopback address or this machine's name only (the Host header); set http.token to be "
    "reached by another name"
)
#: This machine's name: Debian resolves it to 127.0.1.1, a loopback address.
_HOSTNAME = socket.gethostname().lower()
FROM_BROWSER = (
    "requests from a web page (with an Origin header) may not change device state or the "
    "model set: use anomalyd rewarm / reload, curl or another client that is not a browser"
)
Response = tuple[int, str, bytes]


class StatusSource(Protocol):
    """What the HTTP server asks the running service."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def ready(self) -> tuple[bool, dict[str, Any]]: ...
    def models(self) -> dict[str, Any]: ...
    def info(self) -> dict[str, Any]: ...


class Router:
    """Method and path to a response; no sockets (the handler below does the I/O)."""

    def __init__(
        self,
        source: StatusSource,
        registry: CollectorRegistry,
        control: ControlQueue,
        device_id_pattern: str,
        timeout: float = COMMAND_TIMEOUT_S,
        reload_timeout: float = RELOAD_TIMEOUT_S,
    ) -> None:
        self.gets: dict[str, Callable[[], Response]] = {
            "/health": lambda: _status(*source.health()),
            "/ready": lambda: _status(*source.ready()),
            "/models": lambda: (200, JSON, orjson.dumps(source.models())),
            "/info": lambda: (200, JSON, orjson.dumps(source.info())),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
        }
        self.control = control
        self.device_id = re.compile(device_id_pattern)
        self.timeout = timeout
        self.reload_timeout = reload_timeout

    def route(self, method: str, path: str, query: str = "") -> tuple[Response, str | None]:
        """The response, and for a 405 the methods the path allows (``query``: what
        follows the path's ``?``, read by ``/devices/{id}/ack`` only)."""
        if path in self.gets:
            return (self.gets[path](), None) if method == "GET" else _not_allowed("GET")
        if path == "/models/reload":
            if method != "POST":
                return _not_allowed("POST")
            return self._run(Command("reload"), self.reload_timeout), None
        parts = path.split("/")  # "/devices/pump-1/rewarm" -> ["", "devices", "pump-1", "rewarm"]
        if parts[:2] != ["", "devices"] or len(parts) > 5 or (len(parts) > 2 and not parts[2]):
            return _error(404, "not found"), None
        if len(parts) == 2:
            return (self._run(Command("list")), None) if method == "GET" else _not_allowed("GET")
        action = parts[3] if len(parts) > 3 else ""  # "": the device itself
        # /devices/{id}, /devices/{id}/rewarm, /devices/{id}/forget,
        # /devices/{id}/silence/{seconds}, /devices/{id}/ack[?by=...&note=...]
        unknown = len(parts) > 3 and action not in ("rewarm", "forget", "silence", "ack")
        if unknown or (len(parts) == 5) != (action == "silence"):
            return _error(404, "not found"), None
        device = unquote(parts[2])
        if not self.device_id.fullmatch(device):
            return _error(400, f"device id {device[:80]!r} does not match "
                               "limits.device_id_pattern"), None
        if not action:
            if method != "GET":
                return _not_allowed("GET")
            return self._run(Command("show", device)), None
        if method != "POST":
            return _not_allowed("POST")
        if action == "rewarm":
            return self._run(Command("rewarm", device)), None
        if action == "forget":
            return self._run(Command("forget", device)), None
        if action == "ack":
            try:  # refused here with the same words, without a round trip to the scorer
                by, note = _ack_query(query)
                check_ack_text(by, note)
            except ControlError as exc:
                return _error(400, str(exc)), None
            return self._run(Command("ack", device, by=by, note=note)), None
        length = unquote(parts[4])
        try:  # refused here with the same words, without a round trip to the scorer
            seconds = check_silence(_number(length), length)
        except ControlError as exc:
            return _error(400, str(exc)), None
        return self._run(Command("silence", device, seconds)), None

    def _run(self, command: Command, timeout: float | None = None) -> Response:
        try:
            result = self.control.call(command, self.timeout if timeout is None else timeout)
            return 200, JSON, orjson.dumps(result)
        except UnknownDeviceError as exc:
            return _error(404, str(exc), device_id=exc.device_id)
        except ControlUnavailableError as exc:
            return _error(503, str(exc))
        except ReloadFailedError as exc:  # the model set on disk is at fault, not anomalyd
            return _error(409, str(exc), reloaded=False)
        except NotOwnerError as exc:
            return _error(409, str(exc), owner=exc.owner)
        except ControlFailedError as exc:
            return _error(500, str(exc))
        except ControlError as exc:  # the request asked for something the command refuses
            return _error(400, str(exc))


#: A connection that sends nothing for this long is closed (a client that opens
#: connections and never finishes a request would otherwise hold a thread each).
CLIENT_TIMEOUT_S = 10.0
#: Connections served at once; more are closed at once, unanswered.
MAX_CONNECTIONS = 64
#: At most one ``http_busy`` log line this often.
BUSY_LOG_S = 60.0


def _cannot_serve(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}; choose another "
        "http.port (HEALTH_PORT) or http.host (HEALTH_HOST), or stop what holds it")


def check_port_free(host: str, port: int) -> None:
    """ConfigError, as the server's own bind would say it, if ``host:port`` cannot be
    served now: the supervisor asks before it re-cuts the state and hands the broker
    sessions over for workers that would then fail on their port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _cannot_serve(host, port, exc) from exc


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``MAX_CONNECTIONS`` of them; a connection's
    failure is one log line, not a traceback on stderr."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:  # an IPv6 address (``::1``, ``::``)
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        self._refused_logged_at = -math.inf

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            now = time.monotonic()
            if now - self._refused_logged_at >= BUSY_LOG_S:
                self._refused_logged_at = now
                log.warning("http_busy", connections=MAX_CONNECTIONS, refused=self.refused,
                            note="connections beyond the limit are closed unanswered")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        log.info("http_connection_failed", client=str(client_address[0]),
                 error=type(error).__name__, detail=str(error)[:200])


class HttpServer:
    """A small threaded HTTP server running in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        source: StatusSource,
        registry: CollectorRegistry,
        token: str | None = None,
        *,
        control: ControlQueue,
        device_id_pattern: str,
        control_timeout_s: float = COMMAND_TIMEOUT_S,
        reload_timeout_s: float = RELOAD_TIMEOUT_S,
    ) -> None:
        expected = f"Bearer {token}".encode() if token else None
        router = Router(source, registry, control, device_id_pattern, control_timeout_s,
                        reload_timeout_s)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "anomalyd"
            sys_version = ""
            timeout = CLIENT_TIMEOUT_S

            def _handle(self) -> None:
                if not self._discard_body():
                    return
                path, _, query = self.path.partition("?")
                given = self.headers.get("Authorization")
                if expected is not None and path != "/health" and not _authorized(
                    given, expected
                ):
                    why = ("a bearer token is required" if given is None
                           else "the bearer token given is not the daemon's")
                    self._send(_error(401, why), {"WWW-Authenticate": 'Bearer realm="anomalyd"'})
                    return
                if expected is None and outer.loopback and path != "/health" and not (
                    _loopback_host(self.headers.get("Host"))
                ):
                    # A page whose name was made to resolve to 127.0.0.1 (DNS rebinding)
                    # would send its own name: it may not read a token-less port.
                    self._send(_error(403, FOREIGN_HOST))
                    return
                if self.command == "POST" and expected is None and not outer.loopback:
                    self._send(_error(403, POST_REFUSED))
                    return
                if self.command == "POST" and self.headers.get("Origin") is not None:
                    # A page in a browser on this host could otherwise send a "simple"
                    # cross-origin POST to a token-less loopback port.
                    self._send(_error(403, FROM_BROWSER))
                    return
                try:
                    response, allow = router.route(self.command, path, query)
                except Exception:
                    log.exception("http_handler_failed", path=self.path)
                    response, allow = _error(500, "internal"), None
                self._send(response, {"Allow": allow} if allow else None)

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def do_PUT(self) -> None:  # 405 with the allowed method, not the stdlib's 501
                self._handle()

            def do_DELETE(self) -> None:
                self._handle()

            def do_PATCH(self) -> None:
                self._handle()

            def _discard_body(self) -> bool:
                """Read (and ignore) a small body, so the client sees our answer."""
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    self._send(_error(400 if length < 0 else 413, "bad or too large body"))
                    return False
                if length:
                    self.rfile.read(length)
                return True

            def _send(self, response: Response, headers: dict[str, str] | None = None) -> None:
                status, ctype, body = response
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_error(
                self, code: int, message: str | None = None, explain: str | None = None
            ) -> None:
                # The standard library's own refusals (malformed request, unknown method)
                # in the same JSON shape as ours.
                self.close_connection = True
                self._send(_error(code, message or HTTPStatus(code).phrase))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are not logged: /metrics is scraped every few seconds

        try:
            self._server = _Server((host, port), Handler)
        except OSError as exc:  # the port taken (a second anomalyd?), or no such address
            raise _cannot_serve(host, port, exc) from exc
        #: bound to a loopback address: POST without a token is then allowed
        self.loopback = is_loopback(str(self._server.server_address[0]))
        if expected is None and not self.loopback:
            log.warning("http_without_token", host=host,
                        note="anyone who can reach this port can read the devices, "
                             "models and metrics; requests that change state are refused. "
                             "Set http.token_file (HEALTH_TOKEN_FILE)")
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _ack_query(query: str) -> tuple[str | None, str | None]:
    """``by`` and ``note`` from an acknowledgement's query string (each at most once)."""
    try:
        fields = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query),
                          max_num_fields=4)
    except ValueError as exc:
        raise ControlError(f"a bad query string: {exc}") from None
    unknown = fields.keys() - {"by", "note"}
    if unknown:
        raise ControlError(f"an acknowledgement takes 'by' and 'note', not {sorted(unknown)}")
    if any(len(v) > 1 for v in fields.values()):
        raise ControlError("'by' and 'note' may each be given once")
    by, note = fields.get("by", [None])[0], fields.get("note", [None])[0]
    return by or None, note or None


def _number(text: str) -> float:
    """``text`` as a number; NaN if it is none (every range check then fails)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _authorized(header: str | None, expected: bytes) -> bool:
    return header is not None and hmac.compare_digest(header.encode(), expected)


def _loopback_host(header: str | None) -> bool:
    """Whether a request's ``Host`` names this machine's loopback (``localhost``,
    ``127.x.y.z``, ``::1``, with any port); a request without one (HTTP/1.0) passes."""
    if header is None:
        return True
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host == _HOSTNAME or is_loopback(host)


def _status(ok: bool, body: dict[str, Any]) -> Response:
    return (200 if ok else 503), JSON, orjson.dumps(body)


def _error(status: int, message: str, **extra: Any) -> Response:
    return status, JSON, orjson.dumps({"error": message, **extra})


def _not_allowed(allow: str) -> tuple[Response, str]:
    return _error(405, f"method not allowed; this path allows {allow}"), allow
