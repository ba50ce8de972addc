"""Every typed key for state on the aiohttp app and on requests: the only such keys."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway.config import Config
from gateway.drains import Drains
from gateway.logs import AccessRecord
from gateway.metrics import Metrics
from gateway.pacing import Pacer
from gateway.quota import BucketState, QuotaService
from gateway.tenancy import TenancyHolder
from gateway.tls import ServerCertificate
from gateway.tracing import RequestTrace, Tracer
from gateway.upstream import UpstreamClient
from gateway.upstream_limits import UpstreamLimiter

# The configuration the app was started with: what a reload does not change (sockets, the
# upstream's address and timeouts, the quota backend, limits, logging). Tenants, agents and
# upstream keys in force are the tenancy's.
CONFIG = web.AppKey("config", Config)
TENANCY = web.AppKey("tenancy", TenancyHolder)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
QUOTA = web.AppKey("quota", QuotaService)
DRAINS = web.AppKey("drains", Drains)
# Live streams frame a big chunk of upstream's in slices, taking turns (gateway/pacing.py).
STREAM_PACER = web.AppKey("stream_pacer", Pacer)
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("upstream_limiter", UpstreamLimiter)
# The caller port's certificate, when `listen.tls` is set: a reload reads its files again.
CERTIFICATE = web.AppKey("certificate", ServerCertificate)
# W3C trace context passed on, and with tracing.otlp_endpoint spans (gateway/tracing.py).
TRACING: web.AppKey[Tracer] = web.AppKey("tracing")


class Lifecycle:
    """Whether this process should still take new work (flips once, at shutdown)."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False


CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
WALL_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("wall_clock")
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)

# On the admin app: the gateway app whose metrics and readiness it serves.
GATEWAY = web.AppKey("gateway", web.Application)

ACCESS = web.RequestKey("access", AccessRecord)
# The caller's bucket states as last learned (reservation, refund, or a read for a request
# refused before admission): what gateway/headers.py puts in the response's rate-limit headers.
LIMITS: web.RequestKey[tuple[BucketState, ...]] = web.RequestKey("limits")
# The request's trace, begun at the edge: what the pipeline's stages tell (gateway/tracing.py).
TRACE = web.RequestKey("trace", RequestTrace)
