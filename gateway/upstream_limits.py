"""Upstream's own rate limit per upstream key, kept for every replica in the quota store.

api.thinnest.ai limits each key (20 or 60 requests a minute, by tier) and every tenant without
an agent key of its own shares the platform key: left alone, one busy tenant would have
upstream answer 429 to everybody. So each upstream key that has a limit gets a request bucket
in the same quota backend as the tenants (exact across replicas): the keys are bucket owners of
their own kind, beside the tenants in the tenancy in force (gateway/tenancy.py). A request that
finds it empty waits for the refill if that is within `upstream.rate_limits.max_wait` (and its
own deadline), else gets the gateway's 429 at once, before upstream sees it.

Buckets are named after a digest of the key, so agents that share a key share its bucket; the
digest is one-way and short, so the name says nothing about the key.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from gateway.config import Config, Limit, TenantLimits
from gateway.errors import RateLimited
from gateway.logs import AccessRecord
from gateway.quota import QuotaService, Reservation
from gateway.upstream import Deadline

log = structlog.get_logger("gateway.upstream")

# No tenant name can start so (config's NAME_PATTERN has no ':'), so the buckets never meet.
BUCKET_PREFIX = "upstream:"


def _bucket_name(key: str) -> str:
    return BUCKET_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """Which bucket each agent's requests draw from, and each bucket's limit: what one
    configuration says (a reload builds a new one with the rest of the tenancy)."""

    max_wait: float
    by_agent: Mapping[str, str]  # agents whose key (own or platform) has a limit
    platform: str | None  # the platform key's bucket, if it has a limit
    own_key: frozenset[str]  # agents with a key of their own, limited or not
    owners: Mapping[str, TenantLimits]  # bucket → its limit: quota owners beside the tenants

    @classmethod
    def of(cls, config: Config) -> UpstreamLimits:
        upstream = config.upstream
        buckets: dict[str, Limit] = {}
        by_agent: dict[str, str] = {}
        for agent in config.agents.values():
            key = agent.api_key or upstream.api_key
            limit = agent.rate_limits or upstream.rate_limits.requests
            if key is not None and _limited(limit):
                by_agent[agent.id] = _bucket_name(key.reveal())
                buckets.setdefault(by_agent[agent.id], limit)
        platform: str | None = None
        if upstream.api_key is not None and _limited(upstream.rate_limits.requests):
            platform = _bucket_name(upstream.api_key.reveal())
            buckets.setdefault(platform, upstream.rate_limits.requests)
        return cls(
            max_wait=upstream.rate_limits.max_wait,
            by_agent=by_agent,
            platform=platform,
            own_key=frozenset(a.id for a in config.agents.values() if a.api_key is not None),
            owners={name: TenantLimits(requests=limit) for name, limit in buckets.items()},
        )

    def bucket_for(self, agent_id: str) -> str | None:
        bucket = self.by_agent.get(agent_id)
        if bucket is None and agent_id not in self.own_key:
            bucket = self.platform  # unconfigured agents go out with the platform key
        return bucket


class UpstreamLimiter:
    def __init__(self, limits: Callable[[], UpstreamLimits]) -> None:
        """`limits` reads the upstream limits in force, at every try: a reload applies from
        the next one, and a request waiting for a slot never asks for a bucket gone since."""
        self._limits = limits

    def bucket_for(self, agent_id: str) -> str | None:
        return self._limits().bucket_for(agent_id)

    async def admit(
        self, quota: QuotaService, agent_id: str, record: AccessRecord, deadline: Deadline
    ) -> Reservation | None:
        """Take one request from the agent's upstream key, waiting at most `max_wait`; the
        reservation taken (to refund if the request then never goes out), or None when the
        key has no limit."""
        limits = self._limits()
        loop = asyncio.get_running_loop()
        give_up = min(loop.time() + limits.max_wait, deadline.at)
        while True:
            bucket = limits.bucket_for(agent_id)
            if bucket is None:
                return None
            taken = await quota.reserve(bucket, record.request_id, tokens=0, stream=False)
            if taken.allowed:
                return taken
            wait = taken.retry_after  # whole seconds, like the tenant buckets'
            if loop.time() + wait > give_up:
                limit = f"upstream {taken.rejected_by}"
                record.quota, record.quota_limit = "rejected", limit
                raise RateLimited(
                    f"rate limit exceeded: {limit} for this agent's upstream key, shared by all "
                    f"callers; retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            log.debug("upstream slot awaited", request_id=record.request_id, wait_s=wait)
            await asyncio.sleep(wait)
            limits = self._limits()


def _limited(limit: Limit) -> bool:
    return limit.per_minute is not None or limit.per_day is not None
