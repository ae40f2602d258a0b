"""The HTTP port under clients that hold connections: idle ones are closed, and beyond a
limit new ones are refused, so such clients cannot take a thread and a file descriptor
each without end (the daemon's state saves and broker connections need descriptors)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import structlog

from daemon import http
from daemon.config import HttpConfig
from daemon.errors import ConfigError
from tests.test_device_control import bare_server, request

pytestmark = pytest.mark.integration

PARTIAL = b"GET /health HTTP/1.1\r\nHost: x\r\n"  # headers never finished


def _held(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(PARTIAL)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """True once the server closes the connection without answering (the client's own
    timeout, 15 s, is only a guard)."""
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_a_connection_that_never_finishes_its_request_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "CLIENT_TIMEOUT_S", 0.5)
    with bare_server("127.0.0.1") as server:
        with _held(server.port) as idle:
            assert _closed_by_server(idle)
        assert request(server.port, "GET", "/health")[0] == 200


def test_connections_beyond_the_limit_are_refused_until_some_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    with bare_server("127.0.0.1") as server, structlog.testing.capture_logs() as logs:
        first, second = _held(server.port), _held(server.port)
        with _held(server.port) as third:
            assert _closed_by_server(third)
        first.close()
        second.close()
        # their threads end once the server sees them closed
        for _ in range(50):
            try:
                status = request(server.port, "GET", "/health")[0]
                break
            except ConnectionError:  # refused: the slots are not free yet
                time.sleep(0.1)
        assert status == 200
    (busy,) = [e for e in logs if e["event"] == "http_busy"]
    assert busy["connections"] == 2 and busy["refused"] >= 1


def test_without_a_token_beyond_loopback_it_says_what_is_open() -> None:
    everywhere = "0.0.0.0"  # noqa: S104 (what is tested: a bind beyond loopback)
    with structlog.testing.capture_logs() as logs, bare_server(everywhere):
        pass
    assert [e["event"] for e in logs if e["event"] == "http_without_token"] == [
        "http_without_token"]
    with structlog.testing.capture_logs() as logs, bare_server(everywhere, token="t" * 32):
        pass
    assert not [e for e in logs if e["event"] == "http_without_token"]


@pytest.mark.parametrize("value", ["", "  \n"])
def test_an_empty_token_is_refused_not_taken_for_none(value: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http\.token \(HEALTH_TOKEN\) is empty"):
        HttpConfig(token=value).secret()  # type: ignore[arg-type]
    path = tmp_path / "token"
    path.write_text(value)
    with pytest.raises(ConfigError, match=r"http\.token_file \(HEALTH_TOKEN_FILE\) .* is empty"):
        HttpConfig(token_file=path).secret()


def test_a_tokenless_loopback_port_answers_loopback_names_only() -> None:
    """DNS rebinding: a web page whose name was made to resolve to 127.0.0.1 reaches the
    port, but its requests carry its own name as Host."""
    with bare_server("127.0.0.1") as server:
        port = server.port
        status, body, _ = request(port, "GET", "/devices", Host=f"evil.example:{port}")
        assert status == 403 and "Host header" in body["error"]
        assert request(port, "GET", "/health", Host="evil.example")[0] == 200
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                     socket.gethostname()):
            assert request(port, "GET", "/devices", Host=host)[0] != 403, host
    with bare_server("127.0.0.1", token="t" * 32) as server:  # the token guards instead
        status = request(server.port, "GET", "/devices", token="t" * 32,
                         Host="evil.example")[0]
        assert status != 403
