"""Structured logs: structlog configured once, one access line per request.

Standard-library loggers (aiohttp, redis, asyncio) are routed through the same processors so
everything the process prints is one format. No line ever carries a key or message text.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import Logging
from gateway.usage import Usage

access_logger = structlog.get_logger("gateway.access")


class LogStream(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def isatty(self) -> bool: ...


def configure_logging(config: Logging, stream: LogStream | None = None) -> None:
    """Process-wide, to `stream` (default stderr); called by the CLI, never by create_app.

    Our own loggers render and write directly (an access line costs ~13 µs, against ~58 µs
    through the standard library's records, handlers and locks); standard-library loggers
    (aiohttp, redis, asyncio) go through a handler with the same processors and renderer, so
    the process prints one format either way.
    """
    out = sys.stderr if stream is None else stream
    level = logging.getLevelNamesMapping()[config.level.upper()]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if config.format == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    # One list, changed in place: a logger cached on first use keeps the list it was given,
    # so a later configuration (and structlog's own capture_logs) reaches it too.
    processors = structlog.get_config()["processors"]
    processors[:] = [*shared, structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=processors,
        logger_factory=_NamedWriteLoggerFactory(out),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _NoRawRequestBytes) for f in server.filters):
        server.addFilter(_NoRawRequestBytes())


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's direct writer, with the name `add_logger_name` reports."""

    def __init__(self, file: LogStream, name: str) -> None:
        super().__init__(file)  # type: ignore[arg-type]
        self.name = name


class _NamedWriteLoggerFactory:
    def __init__(self, file: LogStream) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "")


class _NoRawRequestBytes(logging.Filter):
    """aiohttp's parser errors quote the raw request head, Authorization header included:
    log that a malformed request was refused, and what kind, never its bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "malformed HTTP request refused: %s", (type(exc).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


@dataclass(slots=True)
class AccessRecord:
    """What one request did, filled in along the pipeline and logged once at its end."""

    request_id: str
    method: str
    path: str
    started: float
    status: int = 0
    trace_id: str | None = None  # the W3C trace this request belongs to, if any
    tenant: str | None = None
    key_name: str | None = None
    agent: str | None = None
    stream: bool = False
    upstream_status: int | None = None
    upstream_ttfb: float | None = None
    upstream_wait: float = 0.0  # seconds spent waiting on upstream: overhead is the rest
    usage: Usage | None = None
    usage_complete: bool = True
    quota: str | None = None  # "allowed" | "rejected"
    quota_limit: str | None = None
    quota_backend: str | None = None
    tokens_charged: int | None = None
    tokens_estimated: bool = False
    error: str | None = None
    client_closed: bool = False
    upstream_error: str | None = None
    heartbeats: int = 0  # keep-alive comments written into a stream while upstream was silent

    def fields(self, finished: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round((finished - self.started) * 1000, 3),
        }
        if self.trace_id is not None:
            fields["trace_id"] = self.trace_id
        if self.tenant is not None:
            fields.update(tenant=self.tenant, key_name=self.key_name)
        if self.agent is not None:
            fields.update(agent=self.agent, stream=self.stream)
        if self.upstream_status is not None:
            fields["upstream_status"] = self.upstream_status
        if self.upstream_ttfb is not None:
            fields["upstream_ttfb_ms"] = round(self.upstream_ttfb * 1000, 3)
        if self.usage is not None:
            fields["tokens"] = {
                "input": self.usage.input,
                "output": self.usage.output,
                "total": self.usage.total,
            }
        if not self.usage_complete:
            fields["usage_complete"] = False
        if self.quota is not None:
            fields["quota"] = self.quota
            fields["quota_backend"] = self.quota_backend
            if self.quota_limit is not None:
                fields["quota_limit"] = self.quota_limit
        if self.tokens_charged is not None:
            fields["tokens_charged"] = self.tokens_charged
            if self.tokens_estimated:
                fields["tokens_estimated"] = True
        for name in ("error", "upstream_error"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.client_closed:
            fields["client_closed"] = True
        if self.heartbeats:
            fields["heartbeats"] = self.heartbeats
        return fields
