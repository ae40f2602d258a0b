"""The HTTP edge: health, readiness, metrics, models and info on one port."""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("anomalyd.http")


class StatusSource(Protocol):
    """What the HTTP server asks the running service."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...
    def ready(self) -> tuple[bool, dict[str, Any]]: ...
    def models(self) -> dict[str, Any]: ...
    def info(self) -> dict[str, Any]: ...


class HttpServer:
    """A small threaded HTTP server running in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        source: StatusSource,
        registry: CollectorRegistry,
        token: str | None = None,
    ) -> None:
        expected = f"Bearer {token}".encode() if token else None
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/health": lambda: _json(*source.health()),
            "/ready": lambda: _json(*source.ready()),
            "/models": lambda: (200, "application/json", orjson.dumps(source.models())),
            "/info": lambda: (200, "application/json", orjson.dumps(source.info())),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
        }

        class Handler(BaseHTTPRequestHandler):
            server_version = "anomalyd"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                route = routes.get(path)
                if expected is not None and path != "/health" and not _authorized(
                    self.headers.get("Authorization"), expected
                ):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="anomalyd"')
                    self.send_header("Content-Type", "application/json")
                    body = b'{"error":"a bearer token is required"}'
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if route is None:
                    status, ctype, body = 404, "application/json", b'{"error":"not found"}'
                else:
                    try:
                        status, ctype, body = route()
                    except Exception:
                        log.exception("http_handler_failed", path=self.path)
                        status, ctype, body = 500, "application/json", b'{"error":"internal"}'
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are not logged: /metrics is scraped every few seconds

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
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


def _authorized(header: str | None, expected: bytes) -> bool:
    return header is not None and hmac.compare_digest(header.encode(), expected)


def _json(ok: bool, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return (200 if ok else 503), "application/json", orjson.dumps(body)
