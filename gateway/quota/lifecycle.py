"""`open_quota`: the quota service for a configuration, and everything it holds closed on exit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.breaker import CircuitBreaker
from gateway.config import Quota
from gateway.quota.calendar import Calendar
from gateway.quota.connect import MAX_CONNECTIONS, connect, peer
from gateway.quota.memory import MemoryStore
from gateway.quota.model import Backend
from gateway.quota.owners import PlanLookup
from gateway.quota.redis import RedisStore
from gateway.quota.service import STARTUP_BUDGET, QuotaService

BREAKER_THRESHOLD = 3
BREAKER_COOLDOWN = 1.0  # seconds between probes of a dead backend: one slow request per second


@asynccontextmanager
async def open_quota(
    config: Quota,
    owners: PlanLookup,
    *,
    clock: Callable[[], float] = time.monotonic,
    lease_ttl: float,
    wall_clock: Callable[[], float] = time.time,
    settled_ttl: float | None = None,
    breaker_threshold: int = BREAKER_THRESHOLD,
    breaker_cooldown: float = BREAKER_COOLDOWN,
) -> AsyncIterator[QuotaService]:
    """`owners`: where every bucket owner's plan is looked up (an `Owners`, or the app's
    holder of the one in force, so that a reload needs no call here).
    `lease_ttl`: seconds after which a lease no longer renewed expires (the service renews the
    leases it holds every third of it, so only a crashed replica's lapse). `settled_ttl`: how
    long a settled request is remembered so that a duplicate settle changes nothing (default
    `lease_ttl`; on Redis one small key per request lives that long). `wall_clock` places
    budgets and ledger days in their periods (in `config.timezone`), and so "tokens today"
    (the ledger's day)."""
    if lease_ttl <= 0:
        raise ValueError("lease_ttl must be positive")
    remember = lease_ttl if settled_ttl is None else settled_ttl

    def memory(name: Backend) -> MemoryStore:
        return MemoryStore(
            name=name,
            clock=clock,
            lease_ttl=lease_ttl,
            settled_ttl=remember,
            retention_days=config.usage_retention_days,
        )

    calendar = Calendar(config.timezone, wall_clock)
    store: MemoryStore | RedisStore
    if config.backend == "memory":
        store = memory("memory")
        service = QuotaService(
            store, owners=owners, clock=clock, lease_ttl=lease_ttl, calendar=calendar
        )
    else:
        budget = config.timeout_ms / 1000
        store = RedisStore(
            connect(config),
            budget=budget,
            lease_ttl=lease_ttl,
            settled_ttl=remember,
            max_in_flight=None if len(config.redis_url) == 1 else MAX_CONNECTIONS,
            retention_days=config.usage_retention_days,
        )
        service = QuotaService(
            store,
            owners=owners,
            clock=clock,
            lease_ttl=lease_ttl,
            policy=config.on_backend_error,
            fallback=memory("local") if config.on_backend_error == "local" else None,
            breaker=CircuitBreaker(
                threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock
            ),
            replicas=config.expected_replicas,
            startup_budget=max(budget, STARTUP_BUDGET),
            calendar=calendar,
            peer=peer(config),
        )
    try:
        if isinstance(store, RedisStore):
            await service.check(store.prepare)
        yield service
    finally:
        await service.aclose()
