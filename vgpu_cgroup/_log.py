"""Structured logging for vgpud.

JSON lines when stderr is not a terminal (journald, container logs), a
readable console format when it is.  Context (``slice``, ``pid``,
``client``, ``dev``) is bound on the logger of each connection so every line
about a client says which one.  Nothing logs on hot paths (per reserve, per
tick): a log line there would cost more than the operation.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

FORMATS = ("auto", "json", "console")


def configure(fmt: str = "auto", *, stream: TextIO | None = None,
              level: int = logging.INFO) -> None:
    """Set up structlog once for the process; ``fmt`` is auto, json or console."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger named ``vgpud`` with ``bound`` context on every line."""
    log: FilteringBoundLogger = structlog.get_logger("vgpud")
    return log.bind(**bound) if bound else log
