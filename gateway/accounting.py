"""A request's quota from reservation to settlement, and the drains that finish abandoned streams.

Token cost is known only afterwards, so a request reserves an estimate first and settles to what
upstream reported. Settling happens exactly once however the request ends, and a stream's
concurrency lease is released with it. A caller that leaves mid-stream does not get free tokens:
the upstream stream is read on in the background to its `done` event (bounded in time and in
number), and only past those bounds is the charge estimated from the text seen.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence

import aiohttp
import structlog
from aiohttp import ClientResponse

from gateway.errors import RateLimited
from gateway.logs import AccessRecord
from gateway.metrics import Metrics
from gateway.quota import BucketState, QuotaService, QuotaUnavailable, Reservation
from gateway.relay import EventRelay
from gateway.usage import StreamTally, Usage

log = structlog.get_logger("gateway.accounting")

CHARS_PER_TOKEN = 4
REQUESTS_PER_MINUTE = "requests per minute"


def estimate_tokens(text_chars: int) -> int:
    return math.ceil(text_chars / CHARS_PER_TOKEN)


def rate_limit_headers(buckets: Sequence[BucketState]) -> dict[str, str]:
    """The caller's own limits: its requests-per-minute bucket and its tightest token bucket."""
    headers: dict[str, str] = {}
    requests = next((b for b in buckets if b.name == REQUESTS_PER_MINUTE), None)
    if requests is not None:
        remaining = max(requests.remaining, 0)
        reset = math.ceil(requests.reset)
        headers["X-RateLimit-Limit"] = str(requests.limit)
        headers["X-RateLimit-Remaining"] = str(remaining)
        # Epoch seconds, as upstream's own X-RateLimit-Reset; the IETF fields carry the delta.
        headers["X-RateLimit-Reset"] = str(math.ceil(time.time() + requests.reset))
        headers["RateLimit-Policy"] = f'"requests";q={requests.limit};w=60'
        headers["RateLimit"] = f'"requests";r={remaining};t={reset}'
    tokens = [b for b in buckets if b.name.startswith("tokens")]
    if tokens:
        headers["X-RateLimit-Remaining-Tokens"] = str(max(min(b.remaining for b in tokens), 0))
    return headers


def refusal(reservation: Reservation) -> RateLimited:
    headers = {
        **rate_limit_headers(reservation.buckets),
        "Retry-After": str(reservation.retry_after),
    }
    return RateLimited(
        f"rate limit exceeded: {reservation.rejected_by}; retry in {reservation.retry_after} s",
        headers=headers,
    )


class Account:
    """One admitted request's quota: settled exactly once, lease released with it."""

    __slots__ = ("_metrics", "_quota", "_record", "_settled", "detached", "reservation")

    def __init__(
        self,
        quota: QuotaService,
        reservation: Reservation,
        record: AccessRecord,
        metrics: Metrics,
    ) -> None:
        self._quota = quota
        self._record = record
        self._metrics = metrics
        self._settled = False
        self.reservation = reservation
        # True once a drain owns the upstream response and will settle this account itself.
        self.detached = False

    async def settle(self, tokens: int, *, usage: Usage | None = None) -> None:
        """Charge `usage.total` when upstream reported it, else the estimate `tokens`."""
        if self._settled:
            return
        self._settled = True
        record = self._record
        charged = usage.total if usage is not None else tokens
        record.tokens_charged = charged
        record.tokens_estimated = usage is None and tokens > 0
        self._metrics.settled(
            self.reservation.tenant,
            record.agent,
            usage,
            estimated=tokens if record.tokens_estimated else None,
        )
        try:
            await self._quota.settle(self.reservation, charged)
        finally:
            await self._quota.release_stream(self.reservation)


class Drains:
    """Background reads of streams whose caller left, so their `done` event is still charged."""

    def __init__(self, timeout: float, limit: int) -> None:
        self._timeout = timeout
        self._limit = limit
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = 0
        self._finished = 0
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(
        self,
        response: ClientResponse,
        relay: EventRelay,
        account: Account,
        fields: Mapping[str, object],
    ) -> bool:
        """Take over `response`; False when no drain slot is free (the caller settles now)."""
        if len(self._tasks) >= self._limit:
            return False
        task = asyncio.create_task(self._drain(response, relay, account, dict(fields)))
        self.started += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _drain(
        self,
        response: ClientResponse,
        relay: EventRelay,
        account: Account,
        fields: dict[str, object],
    ) -> None:
        tally = relay.tally
        try:
            async with asyncio.timeout(self._timeout):
                while not tally.done:
                    chunk = await response.content.readany()
                    if not chunk:
                        break
                    relay.drain(chunk)
        except (TimeoutError, aiohttp.ClientError):
            pass
        finally:
            response.close()
            await settle_stream(account, tally)
            async with self._changed:
                self._finished += 1
                self._changed.notify_all()
        log.info("drain finished", complete=tally.done, **fields)

    async def wait_finished(self, count: int) -> None:
        """Until `count` drains have settled since start-up."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._finished >= count)

    async def close(self) -> None:
        """At shutdown: stop reading and settle what each drain has seen."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def current_limits(quota: QuotaService, tenant: str) -> dict[str, str]:
    """Rate-limit headers for a response that took nothing from the buckets (one read)."""
    try:
        return usage_headers(await quota.usage(tenant))
    except QuotaUnavailable:
        return {}


def usage_headers(usage: Mapping[str, object]) -> dict[str, str]:
    """Rate-limit headers from a `QuotaService.usage()` report."""
    buckets = usage["buckets"]
    assert isinstance(buckets, list)
    return rate_limit_headers([BucketState(**bucket) for bucket in buckets])


async def settle_stream(account: Account, tally: StreamTally) -> None:
    await account.settle(estimate_tokens(tally.content_chars), usage=tally.usage)
