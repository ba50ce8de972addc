"""Token buckets in this process: the `memory` backend, and the `local` fallback for Redis.

Everything runs between two awaits, so each call is atomic on the event loop. State stays
bounded however many tenants come by: absent means full, so a tenant whose buckets have refilled
and who holds no stream lease is forgotten, and settled request ids live for a fixed time in a
capped queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from gateway.quota.model import Backend, Decision, Snapshot
from gateway.quota.plan import (
    CONCURRENT_STREAMS,
    DAY,
    BucketSpec,
    Plan,
    level_at,
    worst_wait,
)

SWEEP_PER_CALL = 2  # tenants examined per call: more than the one a call can add
SWEEP_ABOVE = 64  # tenants held before the sweep starts
MAX_SETTLED = 10_000
"""Settled ids remembered at most (each also for `settled_ttl`). In one process every request's
account settles once already; these only make a second settle of the same reservation a no-op,
so seconds of them are enough, and 100,000 (a minute at ~1,500 req/s) cost ~30 MiB of RSS."""


class _Bucket:
    """Mutable on purpose: rewritten on every call. Keeps capacity and rate so the sweep can
    tell a full bucket without knowing the tenant's plan."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, level: float, stamp: float, capacity: int, rate: float) -> None:
        self.level, self.stamp, self.capacity, self.rate = level, stamp, capacity, rate

    def full(self, now: float) -> bool:
        return self.level + max(0.0, now - self.stamp) * self.rate >= self.capacity


class _Tenant:
    __slots__ = ("buckets", "leases")

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}
        self.leases: dict[str, float] = {}  # lease id -> expiry

    def live_leases(self, now: float) -> int:
        for lease in [k for k, expiry in self.leases.items() if expiry <= now]:
            del self.leases[lease]
        return len(self.leases)


class MemoryStore:
    def __init__(
        self,
        *,
        name: Backend = "memory",
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        lease_ttl: float,
        settled_ttl: float,
        max_settled: int = MAX_SETTLED,
    ) -> None:
        self._name: Backend = name
        self._clock = clock
        self._wall_clock = wall_clock
        self._lease_ttl = lease_ttl
        self._settled_ttl = settled_ttl
        self._max_settled = max_settled
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._settled: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> expiry
        self._day = -1
        self._today: dict[str, int] = {}  # tokens per tenant, UTC day `_day` only

    @property
    def name(self) -> Backend:
        return self._name

    @property
    def tenants_held(self) -> int:
        """Tenants with state (a bucket not yet full, or a live lease), for tests."""
        return len(self._tenants)

    @property
    def settled_held(self) -> int:
        return len(self._settled)

    async def reserve(self, tenant: str, plan: Plan, tokens: int, lease: str | None) -> Decision:
        now = self._clock()
        held = self._tenants.get(tenant)
        current = [self._current(held, spec, now) for spec in plan.buckets]
        levels = tuple(level for level, _ in current)
        rejected, wait = worst_wait(plan, levels, tokens)
        if rejected is None and lease is not None and plan.max_streams is not None:
            live = held.live_leases(now) if held is not None else 0
            if live >= plan.max_streams:
                rejected, wait = CONCURRENT_STREAMS, 0.0
        if rejected is not None:
            self._sweep(now)
            return Decision(False, rejected, wait, levels)

        state = self._touch(tenant)
        after = list(levels)
        for i, (spec, (level, stamp)) in enumerate(zip(plan.buckets, current, strict=True)):
            cost = spec.cost(tokens)
            if cost:
                after[i] = level - cost
                self._put(state, spec, after[i], stamp)
        if lease is not None and plan.max_streams is not None:
            state.leases[lease] = now + self._lease_ttl
        self._sweep(now)
        return Decision(True, None, 0.0, tuple(after))

    async def settle(
        self, tenant: str, plan: Plan, settle_key: str, delta: int, actual: int
    ) -> bool:
        now = self._clock()
        if not self._first(tenant, settle_key, now):
            return False
        if delta and plan.token_buckets:
            state = self._touch(tenant)
            for spec in plan.token_buckets:
                level, stamp = self._current(state, spec, now)
                # A refund never lifts a bucket past its capacity; a debit may go below zero.
                self._put(state, spec, min(spec.capacity, level - delta), stamp)
        day = int(self._wall_clock() // DAY)
        if day != self._day:
            self._day, self._today = day, {}
        self._today[tenant] = self._today.get(tenant, 0) + actual
        self._sweep(now)
        return True

    async def refund(
        self, tenant: str, plan: Plan, settle_key: str, tokens: int, lease: str | None
    ) -> bool:
        now = self._clock()
        if lease is not None:
            self.forget_lease(tenant, lease)
        if not self._first(tenant, settle_key, now):
            return False
        state = self._touch(tenant)
        for spec in plan.buckets:
            cost = spec.cost(tokens)
            if cost:
                level, stamp = self._current(state, spec, now)
                self._put(state, spec, min(spec.capacity, level + cost), stamp)
        self._sweep(now)
        return True

    async def release(self, tenant: str, lease: str) -> None:
        self.forget_lease(tenant, lease)

    def forget_lease(self, tenant: str, lease: str) -> None:
        held = self._tenants.get(tenant)
        if held is not None:
            held.leases.pop(lease, None)

    async def renew(self, tenant: str, leases: Sequence[str]) -> None:
        state = self._touch(tenant)
        expiry = self._clock() + self._lease_ttl
        for lease in leases:
            state.leases[lease] = expiry

    def seed(
        self,
        tenant: str,
        plan: Plan,
        levels: Sequence[float],
        stamp: float,
        leases: Sequence[str],
    ) -> None:
        """Start `tenant` over from `levels` (valid at `stamp`) and exactly `leases`: the local
        fallback taking over from Redis, which knew better than full buckets."""
        state = self._touch(tenant)
        state.buckets.clear()
        for spec, level in zip(plan.buckets, levels, strict=True):
            self._put(state, spec, min(float(spec.capacity), level), stamp)
        now = self._clock()
        state.leases = {lease: now + self._lease_ttl for lease in leases}

    async def usage(self, tenant: str, plan: Plan) -> Snapshot:
        now = self._clock()
        held = self._tenants.get(tenant)
        levels = tuple(self._current(held, spec, now)[0] for spec in plan.buckets)
        live = held.live_leases(now) if held is not None else 0
        today = self._today.get(tenant, 0) if int(self._wall_clock() // DAY) == self._day else 0
        return Snapshot(levels, live, today)

    async def aclose(self) -> None:
        self._tenants.clear()
        self._settled.clear()

    def _first(self, tenant: str, settle_key: str, now: float) -> bool:
        """Marks `settle_key` done; False when it already was (a settle or a refund)."""
        while self._settled and next(iter(self._settled.values())) <= now:
            self._settled.popitem(last=False)
        if (tenant, settle_key) in self._settled:
            return False
        self._settled[(tenant, settle_key)] = now + self._settled_ttl
        if len(self._settled) > self._max_settled:
            self._settled.popitem(last=False)
        return True

    def _current(self, held: _Tenant | None, spec: BucketSpec, now: float) -> tuple[float, float]:
        bucket = held.buckets.get(spec.key) if held is not None else None
        if bucket is None:
            return float(spec.capacity), now
        return level_at(spec, bucket.level, bucket.stamp, now)

    @staticmethod
    def _put(state: _Tenant, spec: BucketSpec, level: float, stamp: float) -> None:
        bucket = state.buckets.get(spec.key)
        if bucket is None:
            state.buckets[spec.key] = _Bucket(level, stamp, spec.capacity, spec.rate)
        else:
            # A reload may have changed the plan: the bucket follows it.
            bucket.level, bucket.stamp, bucket.capacity, bucket.rate = (
                level,
                stamp,
                spec.capacity,
                spec.rate,
            )

    def _touch(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        else:
            self._tenants.move_to_end(tenant)
        return state

    def _sweep(self, now: float) -> None:
        """A clock hand over the oldest tenants: forget the full ones, pass over the rest.

        Each call adds at most one tenant and examines two, so the held set cannot outgrow
        about twice the tenants whose buckets are really not full; below SWEEP_ABOVE tenants
        nothing is examined (the per-request cost is then nil, and the bound barely moves).
        """
        if len(self._tenants) <= SWEEP_ABOVE:
            return
        for _ in range(min(SWEEP_PER_CALL, len(self._tenants))):
            name, state = next(iter(self._tenants.items()))
            if state.live_leases(now) == 0 and all(b.full(now) for b in state.buckets.values()):
                del self._tenants[name]
            else:
                self._tenants.move_to_end(name)
