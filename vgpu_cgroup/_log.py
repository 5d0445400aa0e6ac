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


class Throttle:
    """At most ``burst`` lines per key (a slice) and ``interval`` seconds;
    the rest are counted, and :meth:`due` hands back one summary per key
    once its interval is over.

    So a slice that opens connections as fast as it can costs the log a
    few lines per interval, not one per connection: a log flood would drown
    the lines that matter, and journald drops a unit's lines past its rate
    limit, whichever they are. Pure: the caller passes the time and logs.
    At most ``max_keys`` keys are tracked; past that, new keys share one
    (``"*"``), so a tenant that can make many cgroups cannot grow this.
    """

    OVERFLOW = "*"

    def __init__(self, interval: float, burst: int = 1, max_keys: int = 1024) -> None:
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        #: key -> [window start, lines allowed, {what: suppressed}]
        self._keys: dict[str, tuple[float, list[int], dict[str, int]]] = {}

    def allow(self, key: str, now: float, what: str = "") -> bool:
        """Whether a line about ``key`` may be logged now; if not, it is
        counted under ``what`` for the summary."""
        ent = self._keys.get(key)
        if ent is None:
            if len(self._keys) >= self.max_keys:
                key = self.OVERFLOW
                ent = self._keys.get(key)
            if ent is None:
                self._keys[key] = (now, [1], {})
                return True
        used, suppressed = ent[1], ent[2]
        if used[0] < self.burst:
            used[0] += 1
            return True
        suppressed[what] = suppressed.get(what, 0) + 1
        return False

    def due(self, now: float) -> list[tuple[str, dict[str, int]]]:
        """Keys whose interval is over, with what was suppressed in it (only
        those where something was); those keys start afresh."""
        out: list[tuple[str, dict[str, int]]] = []
        for key in [k for k, e in self._keys.items() if now - e[0] >= self.interval]:
            _, _, suppressed = self._keys.pop(key)
            if suppressed:
                out.append((key, suppressed))
        return out

    def __len__(self) -> int:
        return len(self._keys)
