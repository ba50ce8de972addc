"""The headers every response on the caller port carries, set in one place.

aiohttp's `on_response_prepare` runs for every response just before its headers leave: JSON
answers, errors the edge rendered, streams the handler prepared itself. So `X-Request-ID` and
the caller's own rate-limit headers are added here and nowhere else; the pipeline only records
the tenant's bucket states on the request (`LIMITS`) as it learns them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from aiohttp import hdrs, web

from gateway.quota import REQUESTS_PER_MINUTE, BucketState, is_token_bucket
from gateway.state import ACCESS, LIMITS


def rate_limit_headers(buckets: Sequence[BucketState]) -> dict[str, str]:
    """The caller's own limits: its tightest requests-per-minute bucket and token bucket."""
    headers: dict[str, str] = {}
    # The tightest of its levels: a key limited inside its tenant sees whichever runs out first.
    requests = min(
        (b for b in buckets if b.name.endswith(REQUESTS_PER_MINUTE)),
        key=lambda b: b.remaining,
        default=None,
    )
    if requests is not None:
        remaining = max(requests.remaining, 0)
        reset = math.ceil(requests.reset)
        headers["X-RateLimit-Limit"] = str(requests.limit)
        headers["X-RateLimit-Remaining"] = str(remaining)
        # Epoch seconds, as upstream's own X-RateLimit-Reset; the IETF fields carry the delta.
        headers["X-RateLimit-Reset"] = str(math.ceil(time.time() + requests.reset))
        headers["RateLimit-Policy"] = f'"requests";q={requests.limit};w=60'
        headers["RateLimit"] = f'"requests";r={remaining};t={reset}'
    tokens = [b for b in buckets if is_token_bucket(b.name)]
    if tokens:
        headers["X-RateLimit-Remaining-Tokens"] = str(max(min(b.remaining for b in tokens), 0))
    return headers


def buckets_of(usage: Mapping[str, object]) -> tuple[BucketState, ...]:
    """The bucket states of a `QuotaService.usage()` report."""
    buckets = usage["buckets"]
    assert isinstance(buckets, list)
    return tuple(BucketState(**bucket) for bucket in buckets)


SERVER = "thinnest-gateway"
"""The `Server` header on both ports: a name, never versions (aiohttp's default names Python's
and its own, which only helps whoever looks for a known flaw)."""


async def name_server(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` of both apps: aiohttp sets its own `Server` only when none is."""
    response.headers[hdrs.SERVER] = SERVER


async def add_caller_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` of the caller app."""
    response.headers[hdrs.SERVER] = SERVER
    record = request.get(ACCESS)
    if record is None:  # refused before the edge saw it
        return
    buckets = request.get(LIMITS)
    if buckets:
        response.headers.update(rate_limit_headers(buckets))
    response.headers["X-Request-ID"] = record.request_id
