"""OpenTelemetry spans, exported over OTLP/HTTP: tracing on (`tracing.otlp_endpoint`).

Imported only when an endpoint is configured, and only with the `otel` extra installed
(gateway/tracing.py checks first). The SDK is used as-is: a `TracerProvider` of the app's own
(never the global one), sampled by `ParentBased(TraceIdRatioBased(sample_ratio))` (a caller's
sampled flag decides for its traces, the ratio for those the gateway starts), spans batched by
`BatchSpanProcessor` on its own thread and posted by `OTLPSpanExporter` (protobuf over HTTP).

Spans of one sampled chat request (parents are explicit: no context variables are set):

    POST /v1/agents/{agent_id}/chat   SERVER  tenant, key, agent, status, gen_ai.* and usage
     ├── gateway.quota.reserve        INTERNAL  backend, allowed or the limit that refused
     ├── POST                         CLIENT  the upstream call, from sending to its answer read
     └── gateway.quota.settle         INTERNAL  tokens charged, or refunded

Token counts go on the request span only (`gen_ai.usage.input_tokens`, `output_tokens`), so a
backend summing them over a trace counts each request once. The request span ends when its
response is over or, for an exchange a drain finished, when that drain settles it. Never an
attribute: a gateway or upstream key, a message or an answer, an end user's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from opentelemetry.trace import Span as OtelSpan
from opentelemetry.util.types import AttributeValue
from yarl import URL

from gateway import __version__
from gateway.config import Tracing
from gateway.errors import GatewayError
from gateway.tracing import (
    CHAT_ROUTE,
    NO_TRACE,
    TRACEPARENT,
    TRACESTATE,
    PassThrough,
    RequestTrace,
    Span,
    TraceContext,
    caller_context,
)

if TYPE_CHECKING:
    from gateway.logs import AccessRecord
    from gateway.quota import Reservation
    from gateway.usage import Usage

log = structlog.get_logger("gateway.tracing")

SERVICE_NAME = "thinnest-gateway"
REQUEST_SPAN = "POST /v1/agents/{agent_id}/chat"
PROVIDER = "thinnestai"
OPERATION = "invoke_agent"
CLOSE_TIMEOUT = 5.0
"""Seconds the exit waits for the last spans to be exported (a dead collector must not hold a
shutdown for the exporter's retries)."""


class OtelTracing:
    """The app's tracer: spans for chat requests, the rest as tracing off."""

    def __init__(
        self, config: Tracing, upstream: URL, *, close_timeout: float = CLOSE_TIMEOUT
    ) -> None:
        assert config.otlp_endpoint is not None
        self.endpoint = config.otlp_endpoint
        self._close_timeout = close_timeout
        resource = Resource.create({"service.version": __version__})
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES may name the service; else it is ours.
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=resource,
            shutdown_on_exit=False,  # closed by the app's cleanup, within CLOSE_TIMEOUT
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=str(self.endpoint)))
        )
        self.tracer = self._provider.get_tracer("gateway", __version__)
        self.upstream_prefix = str(upstream).rstrip("/") + "/v1/agents/"
        self.upstream_attributes: dict[str, AttributeValue] = {
            "http.request.method": "POST",
            "server.address": upstream.host or "",
            "server.port": upstream.port or 0,
        }

    def begin(self, request: web.Request, record: AccessRecord) -> RequestTrace:
        caller = caller_context(request.headers)
        if request.match_info.route.name != CHAT_ROUTE:
            if caller is None:
                return NO_TRACE
            record.trace_id = caller.trace_id
            return PassThrough(caller.headers())
        span = self.tracer.start_span(
            REQUEST_SPAN,
            context=None if caller is None else _remote_parent(caller),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": "/v1/agents/{agent_id}/chat",
                "url.path": request.path,
                "url.scheme": request.scheme,
                "gateway.request_id": record.request_id,
                "gen_ai.operation.name": OPERATION,
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.system": PROVIDER,  # the older name, which some backends still read
            },
        )
        context = span.get_span_context()
        record.trace_id = format(context.trace_id, "032x")
        if not span.is_recording():
            # Not sampled: no spans. The caller's context goes on as it came; without one, the
            # gateway's decision (flags 00), so upstream does not sample what we did not.
            return PassThrough(caller.headers() if caller is not None else _headers(span))
        return _Recorded(self, span)

    async def flush(self) -> None:
        await asyncio.to_thread(self._provider.force_flush)

    async def close(self) -> None:
        """Export what is queued and stop, waiting at most `close_timeout` seconds: the SDK's
        own shutdown may wait out the exporter's retries, so it runs on a daemon thread."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is already gone
                    loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(done)
        except TimeoutError:
            log.warning(
                "tracing: spans not exported at exit were dropped",
                otlp_endpoint=str(self.endpoint),
                waited_s=self._close_timeout,
            )


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _remote_parent(caller: TraceContext) -> Context:
    parent = SpanContext(
        trace_id=int(caller.trace_id, 16),
        span_id=int(caller.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(caller.flags & TraceFlags.SAMPLED),
        trace_state=TraceState.from_header([caller.tracestate]) if caller.tracestate else None,
    )
    return set_span_in_context(NonRecordingSpan(parent))


def _headers(span: OtelSpan) -> Mapping[str, str]:
    """W3C headers naming `span` as the parent."""
    context = span.get_span_context()
    headers = {
        TRACEPARENT: f"00-{context.trace_id:032x}-{context.span_id:016x}-"
        f"{int(context.trace_flags):02x}"
    }
    if context.trace_state:
        headers[TRACESTATE] = context.trace_state.to_header()
    return headers


class _Recorded(RequestTrace):
    """A sampled chat request: its span and its children."""

    __slots__ = ("_context", "_edge_done", "_open", "_span", "_tracing", "_upstream")

    def __init__(self, tracing: OtelTracing, span: OtelSpan) -> None:
        self._tracing = tracing
        self._span = span
        self._context = set_span_in_context(span)
        self._upstream: OtelSpan | None = None
        self._open = False  # admitted, not yet settled: the span waits for the settlement
        self._edge_done = False

    def _child(self, name: str, *, refunded: bool = False, tokens: int | None = None) -> OtelSpan:
        attributes: dict[str, AttributeValue] | None = None
        if refunded:
            attributes = {"gateway.quota.refunded": True}
        elif tokens is not None:
            attributes = {"gateway.tokens_charged": tokens}
        return self._tracing.tracer.start_span(name, context=self._context, attributes=attributes)

    def reserving(self) -> Span:
        return _ReserveSpan(self, self._child("gateway.quota.reserve"))

    def admitted(self) -> None:
        self._open = True

    def upstream(self, agent_id: str) -> Mapping[str, str]:
        tracing = self._tracing
        span = self._upstream = self._tracing.tracer.start_span(
            "POST",
            context=self._context,
            kind=SpanKind.CLIENT,
            attributes={
                **tracing.upstream_attributes,
                "url.full": f"{tracing.upstream_prefix}{agent_id}/chat",
            },
        )
        return _headers(span)

    def settling(
        self,
        *,
        usage: Usage | None,
        tokens: int | None,
        status: int | None,
        error: BaseException | None,
    ) -> Span:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            _end_upstream(upstream, status, error)
        if tokens is None:
            return _SettleSpan(self, self._child("gateway.quota.settle", refunded=True))
        charged: dict[str, AttributeValue] = {
            "gateway.tokens_charged": tokens,
            "gateway.tokens_estimated": usage is None and tokens > 0,
        }
        if usage is not None and usage.input is not None:
            charged["gen_ai.usage.input_tokens"] = usage.input
        if usage is not None and usage.output is not None:
            charged["gen_ai.usage.output_tokens"] = usage.output
        self._span.set_attributes(charged)
        settle = self._child("gateway.quota.settle", tokens=tokens)
        return _SettleSpan(self, settle)

    def settled(self) -> None:
        self._open = False
        if self._edge_done:
            self._span.end()  # a drain settled after the caller's response was over

    def finished(self, record: AccessRecord) -> None:
        span = self._span
        span.set_attributes(_request_attributes(record))
        if record.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        self._edge_done = True
        if not self._open:
            span.end()


def _request_attributes(record: AccessRecord) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {"http.response.status_code": record.status}
    if record.tenant is not None:
        attributes["gateway.tenant"] = record.tenant
        attributes["gateway.key_name"] = record.key_name or ""
    if record.agent is not None:
        attributes["gen_ai.agent.id"] = record.agent
        attributes["gateway.stream"] = record.stream
    if record.error is not None:
        attributes["error.type"] = record.error
    if record.upstream_error is not None:
        attributes["gateway.upstream_error"] = record.upstream_error
    if record.client_closed:
        attributes["gateway.client_closed"] = True
    return attributes


def _end_upstream(span: OtelSpan, status: int | None, error: BaseException | None) -> None:
    if status is not None and status < 400:
        span.set_attribute("http.response.status_code", status)
    elif status is not None:
        span.set_attributes({"http.response.status_code": status, "error.type": str(status)})
        span.set_status(Status(StatusCode.ERROR))
    elif error is not None:
        # No answer: the gateway's code for it (upstream_timeout, ...), else the class.
        kind = error.code if isinstance(error, GatewayError) else type(error).__name__
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR))
    span.end()


class _ReserveSpan(Span):
    __slots__ = ("_span", "_trace")

    def __init__(self, trace: _Recorded, span: OtelSpan) -> None:
        self._trace = trace
        self._span = span

    def outcome(self, reservation: Reservation) -> None:
        attributes: dict[str, AttributeValue] = {
            "gateway.quota.backend": reservation.backend,
            "gateway.quota.allowed": reservation.allowed,
        }
        if reservation.allowed:
            self._trace.admitted()
        elif reservation.rejected_by is not None:
            attributes["gateway.quota.limit"] = reservation.rejected_by
        self._span.set_attributes(attributes)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: object,
    ) -> None:
        _end(self._span, error)


class _SettleSpan(Span):
    __slots__ = ("_span", "_trace")

    def __init__(self, trace: _Recorded, span: OtelSpan) -> None:
        self._trace = trace
        self._span = span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: object,
    ) -> None:
        _end(self._span, error)
        self._trace.settled()


def _end(span: OtelSpan, error: BaseException | None) -> None:
    if error is not None and not isinstance(error, asyncio.CancelledError):
        span.set_attribute("error.type", type(error).__name__)
        span.set_status(Status(StatusCode.ERROR))
    span.end()
