"""Log output: JSON lines off a terminal, and no local variables (payloads, secrets) ever."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from daemon import logs


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_local_variables(fmt: str) -> None:
    buf = io.StringIO()
    logs.configure("INFO", fmt, buf)
    try:
        secret_payload = b"s3cret-payload-bytes"  # a local of the failing frame
        raise ValueError(f"failed on a payload of {len(secret_payload)} bytes")
    except ValueError:
        structlog.get_logger().exception("batch_failed")
    finally:
        structlog.reset_defaults()
    out = buf.getvalue()
    assert "batch_failed" in out
    assert "ValueError" in out  # the traceback is there
    assert "s3cret-payload-bytes" not in out


def test_json_lines_when_not_on_a_terminal() -> None:
    buf = io.StringIO()
    logs.configure("INFO", "auto", buf)
    try:
        structlog.get_logger().info("batch", size=3)
        structlog.get_logger().debug("hidden")
    finally:
        structlog.reset_defaults()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "batch"
    assert record["size"] == 3
    assert record["level"] == "info"


class _Writes(io.StringIO):
    """A stream that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, s: str) -> int:
        self.calls.append(s)
        return super().write(s)


def test_each_line_is_one_write_with_its_newline_and_says_its_worker() -> None:
    """The workers of WORKERS=N share one stderr: a line written in two parts (text, then
    newline) let another worker's line in between, gluing two JSON documents into one
    line (seen in a test's log)."""
    stream = _Writes()
    logs.configure("INFO", "json", stream, worker=1)
    try:
        structlog.get_logger().info("batch", size=3)
        structlog.get_logger().warning("signal", action="graceful stop")
    finally:
        structlog.reset_defaults()
    assert len(stream.calls) == 2 and all(c.endswith("}\n") for c in stream.calls)
    assert [json.loads(c)["worker"] for c in stream.calls] == [1, 1]
