"""structlog set-up: JSON lines when not on a terminal, readable console output on one."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure(
    level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None,
    worker: int | None = None,
) -> None:
    """Configure structlog (and stdlib logging, which paho and others use) once per process.

    ``worker``: this process is worker ``worker`` of ``WORKERS=N``; every line says so
    (the workers share one log)."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    numeric = logging.getLevelName(level.upper())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        *([] if worker is None else [_add_worker(worker)]),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if use_json:
        processors += [
            # Tracebacks as data, without local variables: locals hold payloads and
            # secrets, which must never reach a log line.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [structlog.dev.ConsoleRenderer(
            colors=stream.isatty(),
            exception_formatter=structlog.dev.plain_traceback,  # rich's shows locals
        )]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line, newline included (print() writes the newline apart): the
        # workers of WORKERS=N share one stderr, and two lines written at once must not
        # be glued into one that no JSON reader can parse (seen).
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _add_worker(index: int) -> Any:
    def add(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", index)
        return event

    return add
