"""Buckets in this process: the `memory` backend, and the `local` fallback for Redis.

Everything runs between two awaits, so each call is atomic on the event loop. State stays
bounded however many tenants, keys and end users come by: absent means full, so a bucket that
has refilled (a budget whose period has passed) is forgotten by a sweep, a tenant without
stream leases holds nothing else, and settled request ids live for a fixed time in a capped
queue. The usage ledger keeps `retention_days` of days and is lost on restart.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, timedelta
from typing import NamedTuple

from gateway.quota.calendar import Moment
from gateway.quota.model import (
    Backend,
    Charge,
    Crossing,
    Decision,
    Settled,
    Snapshot,
    UsageRow,
)
from gateway.quota.plan import (
    BucketSpec,
    Plan,
    level_at,
    worst_wait,
)

SWEEP_MORE = 2  # buckets examined per call beyond the most it can add (one per plan bucket)
SWEEP_ABOVE = 256  # buckets held before the sweep starts
MAX_SETTLED = 10_000
"""Settled ids remembered at most (each also for `settled_ttl`). In one process every request's
account settles once already; these only make a second settle of the same reservation a no-op,
so seconds of them are enough, and 100,000 (a minute at ~1,500 req/s) cost ~30 MiB of RSS."""


class Seed(NamedTuple):
    """A bucket's level as the fallback takes it over, valid at `stamp` on the bucket's own
    clock (seconds for a rate limit, the period's index for a budget)."""

    spec: BucketSpec
    level: float
    stamp: float


class _Bucket:
    """Mutable on purpose: rewritten on every call. `forget_at` (service clock) is when it will
    be full again, so the sweep needs no plan to tell."""

    __slots__ = ("forget_at", "level", "stamp", "warned")

    def __init__(self, level: float, stamp: float, warned: int, forget_at: float) -> None:
        self.level, self.stamp, self.warned, self.forget_at = level, stamp, warned, forget_at


class MemoryStore:
    def __init__(
        self,
        *,
        name: Backend = "memory",
        clock: Callable[[], float],
        lease_ttl: float,
        settled_ttl: float,
        max_settled: int = MAX_SETTLED,
        retention_days: int = 400,
    ) -> None:
        self._name: Backend = name
        self._clock = clock
        self._lease_ttl = lease_ttl
        self._settled_ttl = settled_ttl
        self._max_settled = max_settled
        self._retention = timedelta(days=retention_days)
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        # (tenant, lease set) -> lease id -> expiry
        self._leases: dict[tuple[str, str], dict[str, float]] = {}
        self._settled: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> expiry
        self._today: dict[str, int] = {}  # tokens per tenant on the ledger's day, `_ledger_day`
        self._ledger: dict[tuple[str, str, str, str], list[int]] = {}
        self._ledger_day = ""

    @property
    def name(self) -> Backend:
        return self._name

    @property
    def tenants_held(self) -> int:
        """Tenants with state (a bucket not yet full, or a live lease), for tests."""
        return len({tenant for tenant, _ in self._buckets} | {tenant for tenant, _ in self._leases})

    @property
    def buckets_held(self) -> int:
        return len(self._buckets)

    @property
    def settled_held(self) -> int:
        return len(self._settled)

    async def reserve(
        self, tenant: str, plan: Plan, tokens: int, lease: str | None, at: Moment
    ) -> Decision:
        now = self._clock()
        current = [self._current(tenant, spec, now, at) for spec in plan.buckets]
        levels = tuple(level for level, _, _ in current)
        rejected, wait = worst_wait(plan, levels, tokens, at)
        if rejected is None and lease is not None:
            rejected = next(
                (
                    cap.name
                    for cap in plan.streams
                    if self._live_leases(tenant, cap.key, now) >= cap.limit
                ),
                None,
            )
        if rejected is not None:
            self._sweep(now, len(plan.buckets))
            return Decision(False, rejected, wait, levels)

        after = list(levels)
        crossed: list[Crossing] = []
        for i, (spec, (level, stamp, warned)) in enumerate(zip(plan.buckets, current, strict=True)):
            cost = spec.cost(tokens)
            if cost:
                after[i] = level - cost
                warned = _crossed(spec, after[i], warned, crossed)
                self._put(tenant, spec, after[i], stamp, warned, now, at)
        if lease is not None:
            for cap in plan.streams:
                self._leases.setdefault((tenant, cap.key), {})[lease] = now + self._lease_ttl
        self._sweep(now, len(plan.buckets))
        return Decision(True, None, 0.0, tuple(after), tuple(crossed))

    async def settle(
        self,
        tenant: str,
        plan: Plan,
        settle_key: str,
        delta: int,
        actual: int,
        at: Moment,
        charge: Charge | None,
    ) -> Settled | None:
        now = self._clock()
        if not self._first(tenant, settle_key, now):
            return None
        crossed: list[Crossing] = []
        levels: list[float] = []
        if delta:
            for spec in plan.token_buckets:
                level, stamp, warned = self._current(tenant, spec, now, at)
                # A refund never lifts a bucket past its capacity; a debit may go below zero.
                level = min(spec.capacity, level - delta)
                warned = _crossed(spec, level, warned, crossed)
                self._put(tenant, spec, level, stamp, warned, now, at)
                levels.append(level)
        self._count(tenant, actual, at, charge or Charge("", ""))
        self._sweep(now, len(plan.buckets))
        return Settled(tuple(levels), tuple(crossed))

    async def refund(
        self,
        tenant: str,
        plan: Plan,
        settle_key: str,
        tokens: int,
        lease: str | None,
        at: Moment,
    ) -> bool:
        now = self._clock()
        if lease is not None:
            self.forget_lease(tenant, lease, plan.stream_sets)
        if not self._first(tenant, settle_key, now):
            return False
        for spec in plan.buckets:
            cost = spec.cost(tokens)
            if cost:
                level, stamp, warned = self._current(tenant, spec, now, at)
                self._put(tenant, spec, min(spec.capacity, level + cost), stamp, warned, now, at)
        self._sweep(now, len(plan.buckets))
        return True

    async def release(self, tenant: str, lease: str, sets: Sequence[str]) -> None:
        self.forget_lease(tenant, lease, sets)

    def forget_lease(self, tenant: str, lease: str, sets: Sequence[str]) -> None:
        for name in sets:
            held = self._leases.get((tenant, name))
            if held is not None:
                held.pop(lease, None)
                if not held:
                    del self._leases[(tenant, name)]

    async def renew(self, tenant: str, sets: Sequence[str], leases: Sequence[str]) -> None:
        if not leases:
            return
        expiry = self._clock() + self._lease_ttl
        for name in sets:
            held = self._leases.setdefault((tenant, name), {})
            for lease in leases:
                held[lease] = expiry

    def seed(self, tenant: str, buckets: Iterable[Seed], at: Moment) -> None:
        """Start each of `tenant`'s `buckets` over from its level (valid at its stamp, on the
        bucket's own clock: `BucketSpec.clock`): the local fallback taking over from Redis,
        which knew better than full buckets. Its other buckets stay as they are."""
        now = self._clock()
        for spec, level, stamp in buckets:
            self._buckets.pop((tenant, spec.key), None)
            self._put(tenant, spec, min(float(spec.capacity), level), stamp, 0, now, at)

    def seed_leases(self, tenant: str, leases: Mapping[str, Sequence[str]]) -> None:
        """Exactly `leases` in each of `tenant`'s lease sets named (by set, none for an empty
        one), renewed from now: the streams this replica holds, as the fallback takes over.
        Its other lease sets stay as they are."""
        expiry = self._clock() + self._lease_ttl
        for name, held in leases.items():
            if held:
                self._leases[(tenant, name)] = dict.fromkeys(held, expiry)
            else:
                self._leases.pop((tenant, name), None)

    async def usage(self, tenant: str, plan: Plan, at: Moment) -> Snapshot:
        now = self._clock()
        levels = tuple(self._current(tenant, spec, now, at)[0] for spec in plan.buckets)
        today = self._today.get(tenant, 0) if at.date == self._ledger_day else 0
        live = tuple(self._live_leases(tenant, cap.key, now) for cap in plan.streams)
        return Snapshot(levels, live, today)

    async def ledger(self, first: str, last: str) -> list[UsageRow]:
        return [
            UsageRow(day, tenant, key, agent, *counts)
            for (day, tenant, key, agent), counts in self._ledger.items()
            if first <= day <= last
        ]

    async def aclose(self) -> None:
        self._buckets.clear()
        self._leases.clear()
        self._settled.clear()

    def _count(self, tenant: str, actual: int, at: Moment, charge: Charge) -> None:
        if at.date != self._ledger_day:
            self._ledger_day, self._today = at.date, {}
            oldest = (date.fromisoformat(at.date) - self._retention).isoformat()
            for row in [row for row in self._ledger if row[0] <= oldest]:
                del self._ledger[row]
        row = (at.date, tenant, charge.key, charge.agent)
        counts = self._ledger.get(row)
        if counts is None:
            counts = self._ledger[row] = [0, 0, 0, 0, 0]
        counts[0] += 1
        counts[1] += charge.tokens_input
        counts[2] += charge.tokens_output
        counts[3] += actual
        counts[4] += charge.tokens_estimated
        self._today[tenant] = self._today.get(tenant, 0) + actual

    def _live_leases(self, tenant: str, name: str, now: float) -> int:
        held = self._leases.get((tenant, name))
        if held is None:
            return 0
        for lease in [k for k, expiry in held.items() if expiry <= now]:
            del held[lease]
        if not held:
            del self._leases[(tenant, name)]
        return len(held)

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

    def _current(
        self, tenant: str, spec: BucketSpec, now: float, at: Moment
    ) -> tuple[float, float, int]:
        """The level on the bucket's own clock, that clock, and the warnings given this period."""
        clock = spec.clock(now, at)
        bucket = self._buckets.get((tenant, spec.key))
        if bucket is None:
            return float(spec.capacity), clock, 0
        level, stamp = level_at(spec, bucket.level, bucket.stamp, clock)
        return level, stamp, bucket.warned if stamp == bucket.stamp else 0

    def _put(
        self,
        tenant: str,
        spec: BucketSpec,
        level: float,
        stamp: float,
        warned: int,
        now: float,
        at: Moment,
    ) -> None:
        held = (tenant, spec.key)
        if level >= spec.capacity and not warned:
            self._buckets.pop(held, None)
            return
        if spec.period is None:
            forget_at = stamp + (spec.capacity - level) / spec.rate
        else:
            periods = max(1, math.ceil((spec.capacity - level) / spec.capacity))
            forget_at = now + at.until(spec.period, periods)
        bucket = self._buckets.get(held)
        if bucket is None:
            self._buckets[held] = _Bucket(level, stamp, warned, forget_at)
        else:
            # Left where it is: the sweep moves a bucket it finds still in use to the back.
            bucket.level, bucket.stamp, bucket.warned, bucket.forget_at = (
                level,
                stamp,
                warned,
                forget_at,
            )

    def _sweep(self, now: float, added: int) -> None:
        """A clock hand over the least recently used buckets: forget the full ones, pass over
        the rest. A call adds at most `added` buckets and examines SWEEP_MORE more than that,
        so the held set stays within a small multiple of the buckets really not full; below
        SWEEP_ABOVE nothing is examined (the per-request cost is then nil)."""
        if len(self._buckets) <= SWEEP_ABOVE:
            return
        for _ in range(added + SWEEP_MORE):
            held, bucket = next(iter(self._buckets.items()))
            if bucket.forget_at <= now:
                del self._buckets[held]
            else:
                self._buckets.move_to_end(held)


def _crossed(spec: BucketSpec, level: float, warned: int, out: list[Crossing]) -> int:
    """buckets.lua's `crossed`: each warn_at fraction passed for the first time this period."""
    if not spec.warn_at:
        return warned
    used = (spec.capacity - level) / spec.capacity
    for j, fraction in enumerate(spec.warn_at, start=1):
        if j > warned and used >= fraction:
            out.append(Crossing(spec, fraction))
            warned = j
    return warned
