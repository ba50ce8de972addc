"""W3C trace context, always; OpenTelemetry spans when `tracing.otlp_endpoint` is set.

Always, tracing off included: a caller's valid `traceparent` goes upstream unchanged, with its
`tracestate`, and its trace id goes on the access line. An invalid one is not forwarded (W3C:
the trace restarts), and a request without a valid one sends none upstream: the gateway records
nothing then, and a context of its own would either name a parent span that exists nowhere or,
unsampled, tell upstream not to trace what it might have.

With an endpoint, gateway/otel.py (the `otel` extra, imported only then) records spans: one
server span per chat request, children for the quota reservation, the upstream call and the
settlement. The pipeline tells this module what happens at four points, and nothing else:

    the edge (app.py)      begin(request, record) ... finished(record)   the request span
    proxy._admit           with trace.reserving() as span: span.outcome(reservation)
    proxy.chat             trace.upstream(agent_id)  → the W3C headers to send upstream
    Admission.settle       with trace.settling(...)  the settlement; usage on the request span

With tracing off those are `NO_TRACE`'s no-ops (or a caller's context passed through): no
OpenTelemetry import, and no work per request beyond reading the header and passing on a
valid one.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.config import Config
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.logs import AccessRecord
    from gateway.quota import Reservation
    from gateway.usage import Usage

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CHAT_ROUTE = "chat"
"""The route name of `POST /v1/agents/{agent_id}/chat`: the requests that get spans."""
OTEL_EXTRA = "pip install 'thinnest-gateway[otel]'"
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")

# version-traceid-parentid-flags. A version above 00 may append fields ("-..."); ff is invalid.
_TRACEPARENT = re.compile(
    r"(?!ff)([0-9a-f]{2})-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-[\x21-\x7e]*)?"
)
_MAX_TRACEPARENT = 512
# A tracestate list-member: key=value, the key simple or multi-tenant (tenant@system).
_TRACESTATE_MEMBER = re.compile(
    r"((?:[a-z][_0-9a-z*/-]{0,255})|(?:[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13}))"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_MAX_TRACESTATE_MEMBERS = 32
_NOTHING: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A caller's trace context that passed W3C's checks, exactly as it was sent."""

    traceparent: str
    tracestate: str | None

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    @property
    def span_id(self) -> str:
        return self.traceparent[36:52]

    @property
    def flags(self) -> int:
        return int(self.traceparent[53:55], 16)

    def headers(self) -> dict[str, str]:
        """What goes upstream: the caller's context, unchanged."""
        if self.tracestate is None:
            return {TRACEPARENT: self.traceparent}
        return {TRACEPARENT: self.traceparent, TRACESTATE: self.tracestate}


def caller_context(headers: CIMultiDictProxy[str]) -> TraceContext | None:
    """The caller's W3C trace context, or None when it sent none or an invalid one.

    A `traceparent` sent twice is invalid; `tracestate` sent in several headers is one list,
    joined by commas; an invalid `tracestate` is dropped on its own (W3C allows either)."""
    traceparent = headers.get(TRACEPARENT)
    if traceparent is None:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if (
        match is None
        or len(traceparent) > _MAX_TRACEPARENT
        or (match.group(1) == "00" and match.group(2) is not None)
        or len(headers.getall(TRACEPARENT)) > 1
    ):
        return None
    states = headers.getall(TRACESTATE, ())
    tracestate = ",".join(states) if states else None
    if tracestate is not None and not _valid_tracestate(tracestate):
        tracestate = None
    return TraceContext(traceparent, tracestate)


def _valid_tracestate(value: str) -> bool:
    keys = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue  # empty list-members are allowed
        if not _TRACESTATE_MEMBER.fullmatch(member):
            return False
        key = member.partition("=")[0]
        if key in keys:
            return False
        keys.add(key)
    return len(keys) <= _MAX_TRACESTATE_MEMBERS


# --- what the pipeline calls -------------------------------------------------------------


class Span:
    """A stage's span, as the pipeline sees it; this one records nothing (tracing off)."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def outcome(self, reservation: Reservation) -> None:
        """The quota's answer to a reservation."""


NO_SPAN = Span()


class RequestTrace:
    """One request's trace, told what happens along the pipeline. This base records nothing
    and sends nothing upstream: it is tracing off for a request without a valid context."""

    __slots__ = ()

    def upstream(self, agent_id: str) -> Mapping[str, str]:
        """The upstream call begins: the W3C trace context headers to send with it."""
        return _NOTHING

    def reserving(self) -> Span:
        """Around the quota reservation."""
        return NO_SPAN

    def settling(
        self,
        *,
        usage: Usage | None,
        tokens: int | None,
        status: int | None,
        error: BaseException | None,
    ) -> Span:
        """Around the settlement, once per admitted request: `tokens` charged (None for a
        refund), what upstream reported it cost, its status, and how the request ended."""
        return NO_SPAN

    def finished(self, record: AccessRecord) -> None:
        """The caller's response is over (its access line is being written)."""


NO_TRACE = RequestTrace()


class PassThrough(RequestTrace):
    """Tracing off (or a request the gateway does not record): the caller's valid context
    goes upstream as it came."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers

    def upstream(self, agent_id: str) -> Mapping[str, str]:
        return self._headers


class Tracer(Protocol):
    """The app's tracing: `Propagation` (off), or gateway/otel.py's `OtelTracing`."""

    def begin(self, request: web.Request, record: AccessRecord) -> RequestTrace:
        """A request arrives: its trace (and `record.trace_id`, when it has one)."""
        ...

    async def flush(self) -> None:
        """Export every span ended so far (tests; nothing to do when off)."""
        ...

    async def close(self) -> None:
        """At exit: export what is left, within a bound."""
        ...


class Propagation:
    """Tracing off: a caller's valid trace context goes upstream unchanged, nothing more."""

    def begin(self, request: web.Request, record: AccessRecord) -> RequestTrace:
        context = caller_context(request.headers)
        if context is None:
            return NO_TRACE
        record.trace_id = context.trace_id
        return PassThrough(context.headers())

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None


def open_tracing(config: Config) -> Tracer:
    """`Propagation`, or with `tracing.otlp_endpoint` the SDK-backed tracing (the `otel`
    extra; its absence is a ConfigError naming the setting)."""
    if config.tracing.otlp_endpoint is None:
        return Propagation()
    require_sdk(config)
    from gateway.otel import OtelTracing

    return OtelTracing(config.tracing, config.upstream.base_url)


def require_sdk(config: Config) -> None:
    """With `tracing.otlp_endpoint` set, the OpenTelemetry SDK and OTLP exporter must be
    installed: say so at start-up and in check-config, not at the first span."""
    if config.tracing.otlp_endpoint is None:
        return
    for module in OTEL_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"{config.source}: tracing.otlp_endpoint is set, but the OpenTelemetry SDK is "
                f"not installed ({exc.name or module} is missing): {OTEL_EXTRA}, or remove "
                "tracing.otlp_endpoint to run without spans"
            ) from None


def describe(config: Config) -> str:
    """check-config's line about tracing."""
    tracing = config.tracing
    if tracing.otlp_endpoint is None:
        return "  tracing off (W3C trace context passed upstream)"
    return (
        f"  tracing to {tracing.otlp_endpoint} (OTLP/HTTP), sample ratio {tracing.sample_ratio:g}"
    )
