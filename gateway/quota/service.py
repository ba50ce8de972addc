"""The quota service: which store answers, within what budget, and what happens when it cannot.

Admission never waits longer than `quota.timeout_ms` on Redis. When Redis fails (or the breaker
is open) `on_backend_error` decides: `local` answers from in-process buckets sized for this
replica's share, `open` lets the request through, `closed` refuses with 503. A success through
the breaker's probe puts Redis back in charge.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, TypeVar

import structlog
from redis.exceptions import RedisError

from gateway.breaker import CircuitBreaker
from gateway.config import Tenant, TenantLimits
from gateway.quota.model import (
    BucketState,
    Decision,
    QuotaUnavailable,
    Reservation,
    Store,
)
from gateway.quota.plan import Plan, plan_for, reset_after, whole_seconds

log = structlog.get_logger("gateway.quota")

T = TypeVar("T")
Policy = Literal["local", "open", "closed"]
# What a backend in trouble raises: connection and protocol errors, socket and budget timeouts.
BACKEND_ERRORS = (RedisError, OSError, TimeoutError)
STARTUP_BUDGET = 1.0


class _Down(Exception):
    """The primary store did not answer (already counted); the policy takes over."""


class QuotaService:
    def __init__(
        self,
        tenants: Mapping[str, Tenant],
        primary: Store,
        *,
        policy: Policy = "local",
        fallback: Store | None = None,
        breaker: CircuitBreaker | None = None,
        budget: float = 0.05,
        replicas: int = 1,
    ) -> None:
        """`breaker` None means the primary cannot fail (memory): no budget, no policy."""
        if policy == "local" and breaker is not None and fallback is None:
            raise ValueError("on_backend_error local needs a fallback store")
        self._tenants = tenants
        self._primary = primary
        self._policy = policy
        self._fallback = fallback
        self._breaker = breaker
        self._budget = budget
        self._replicas = replicas
        self._plans: dict[TenantLimits, Plan] = {}  # one per distinct limits, not per tenant
        self.backend_errors = 0
        self._unique = _Ids()

    @property
    def state(self) -> Literal["ok", "degraded"]:
        """For /readyz: degraded while the breaker keeps Redis out and the policy decides."""
        return "ok" if self._breaker is None or self._breaker.state == "closed" else "degraded"

    async def reserve(
        self, tenant: str, request_id: str, *, tokens: int, stream: bool
    ) -> Reservation:
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        plan = self._plan(tenant)
        lease_wanted = stream and plan.max_streams is not None
        if not plan.buckets and not lease_wanted:
            # Nothing to count: no round trip at all.
            return Reservation(
                tenant, request_id, True, 0, None, 0, (), None, self._primary.name, self._unique()
            )
        lease = self._unique() if lease_wanted else None
        try:
            return await self._reserve_on(self._primary, plan, tenant, request_id, tokens, lease)
        except _Down:
            pass
        if self._policy == "closed":
            raise QuotaUnavailable()
        if self._policy == "open" or self._fallback is None:
            return Reservation(
                tenant, request_id, True, 0, None, 0, (), None, "open", self._unique()
            )
        local = plan.scaled(self._replicas)
        return await self._reserve_on(self._fallback, local, tenant, request_id, tokens, lease)

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Once per reservation (a duplicate changes nothing). Backend trouble is counted and
        logged, never raised: the tokens are then lost to the quota, not to the caller."""
        if actual_tokens < 0:
            raise ValueError("actual_tokens must not be negative")
        if not reservation.allowed:
            return
        store, plan = self._store_for(reservation)
        delta = actual_tokens - reservation.reserved_tokens
        try:
            await self._call(
                store,
                lambda: store.settle(
                    reservation.tenant, plan, reservation.settle_key, delta, actual_tokens
                ),
            )
        except _Down:
            log.warning("quota settle lost", tenant=reservation.tenant, tokens=actual_tokens)

    async def refund(self, reservation: Reservation) -> None:
        """TEMPORARY shim until the quota branch lands: tokens back, lease released."""
        await self.settle(reservation, 0)
        await self.release_stream(reservation)

    async def release_stream(self, reservation: Reservation) -> None:
        lease = reservation.stream_lease
        if lease is None:
            return
        store, _ = self._store_for(reservation)
        try:
            await self._call(store, lambda: store.release(reservation.tenant, lease))
        except _Down:
            # The lease expires on its own after lease_ttl.
            log.info("quota stream release lost", tenant=reservation.tenant)

    async def usage(self, tenant: str) -> dict[str, object]:
        plan = self._plan(tenant)
        store = self._primary
        try:
            snapshot = await self._call(store, lambda: store.usage(tenant, plan))
        except _Down:
            if self._policy != "local" or self._fallback is None:
                raise QuotaUnavailable() from None
            plan, store = plan.scaled(self._replicas), self._fallback
            snapshot = await store.usage(tenant, plan)
        return {
            "tenant": tenant,
            "buckets": [
                {"name": b.name, "limit": b.limit, "remaining": b.remaining, "reset": b.reset}
                for b in _bucket_states(plan, snapshot.levels)
            ],
            "tokens_today": snapshot.tokens_today,
            "concurrent_streams": {"limit": plan.max_streams, "active": snapshot.active_streams},
        }

    async def check(self, probe: Callable[[], Awaitable[object]]) -> bool:
        """Run `probe` against the primary at start-up (connect, find the cluster, load the
        scripts), allowed a second: start-up can wait, a request cannot. On failure the breaker
        opens at once, so /readyz reports it before the first request finds out."""
        if self._breaker is None:
            return True
        try:
            await self._call(self._primary, probe, budget=max(self._budget, STARTUP_BUDGET))
        except _Down:
            self._breaker.trip()
            return False
        return True

    async def aclose(self) -> None:
        await self._primary.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()

    def _plan(self, tenant: str) -> Plan:
        config = self._tenants.get(tenant)
        if config is None:
            raise ValueError(f"unknown tenant {tenant!r}")
        plan = self._plans.get(config.limits)
        if plan is None:
            plan = self._plans[config.limits] = plan_for(config.limits)
        return plan

    def use_tenants(self, tenants: Mapping[str, Tenant]) -> None:
        """A reload: new limits apply from the next reservation; bucket levels are kept (they
        live in the store, by tenant name), and requests in flight settle under their plan."""
        self._tenants = tenants

    def _store_for(self, reservation: Reservation) -> tuple[Store, Plan]:
        plan = self._plan(reservation.tenant) if reservation.plan is None else reservation.plan
        if reservation.backend == "local" and self._fallback is not None:
            return self._fallback, plan
        return self._primary, plan

    async def _reserve_on(
        self, store: Store, plan: Plan, tenant: str, request_id: str, tokens: int, lease: str | None
    ) -> Reservation:
        cost = plan.token_cost(tokens)
        decision: Decision = await self._call(
            store, lambda: store.reserve(tenant, plan, cost, lease)
        )
        return Reservation(
            tenant=tenant,
            request_id=request_id,
            allowed=decision.allowed,
            reserved_tokens=cost if decision.allowed else 0,
            rejected_by=decision.rejected_by,
            retry_after=0 if decision.allowed else whole_seconds(decision.wait),
            buckets=_bucket_states(plan, decision.levels),
            stream_lease=lease if decision.allowed else None,
            backend=store.name,
            reservation_id=self._unique(),
            plan=plan,
        )

    async def _call(
        self, store: Store, operation: Callable[[], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """Run one store call; for the primary behind a breaker, within budget or `_Down`."""
        breaker = self._breaker
        if breaker is None or store is not self._primary:
            return await operation()
        if not breaker.allow():
            raise _Down
        before = breaker.state
        try:
            async with asyncio.timeout(budget or self._budget):
                result = await operation()
        except BACKEND_ERRORS as exc:
            self.backend_errors += 1
            breaker.failure()
            # The error's type only: its text may name the server, never worth the risk.
            log.warning("quota backend failed", error=type(exc).__name__, breaker=breaker.state)
            raise _Down from exc
        breaker.success()
        if before != "closed":
            log.info("quota backend recovered")
        return result


class _Ids:
    """Reservation and lease ids: unique across replicas and restarts (a random prefix per
    service) without a system call each (a counter after it). Never shown to callers."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


def _bucket_states(plan: Plan, levels: tuple[float, ...]) -> tuple[BucketState, ...]:
    return tuple(
        BucketState(spec.name, spec.capacity, math.floor(level), reset_after(spec, level))
        for spec, level in zip(plan.buckets, levels, strict=True)
    )
