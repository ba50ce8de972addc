"""The quota service: which store answers, what happens when it cannot, and what it still owes.

Buckets belong to owners: tenants, and the upstream keys whose own limits the gateway keeps
(upstream_limits.py). The service looks each one's plan up in the `PlanLookup` it was given
(owners.py), at every reservation: the app's holds the configuration in force, so a reload
applies from the next reservation on, while one in flight settles under the plan it carries.

Redis calls are bounded by what Redis takes (redis.py's `redis_time`), not by how long a caller
waited behind a busy event loop. When Redis fails (or the breaker is open) `on_backend_error`
decides: `local` answers from in-process buckets sized for this replica's share, `open` lets
the request through, `closed` refuses with 503. Each local bucket starts where Redis last left
that bucket, whichever request reported it (empty for one never seen), never full, and each
lease set with the stream leases this replica holds in it. A success through the breaker's
probe puts Redis back in charge.

What the service still owes Redis is not dropped on a failure: a settle, refund or release that
failed waits in a small queue, retried with backoff until Redis answers again. Every stream
lease it holds is renewed in the background until released, so a lease lives exactly as long
as its stream, and a crashed replica's leases lapse within the lease ttl.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal, TypeVar

import structlog
from redis.exceptions import RedisError

from gateway.breaker import CircuitBreaker
from gateway.outages import FailureLog
from gateway.quota.calendar import Calendar, Moment, Period
from gateway.quota.memory import MemoryStore, Seed
from gateway.quota.model import (
    BucketState,
    Charge,
    Crossing,
    Decision,
    QuotaUnavailable,
    Reservation,
    Store,
    UsageRow,
)
from gateway.quota.owners import PlanLookup
from gateway.quota.plan import (
    CONCURRENT_STREAMS,
    BucketSpec,
    BudgetSlot,
    Plan,
    reset_after,
    whole_seconds,
)

log = structlog.get_logger("gateway.quota")

T = TypeVar("T")
Policy = Literal["local", "open", "closed"]
# What a backend in trouble raises: connection and protocol errors, socket and budget timeouts.
BACKEND_ERRORS = (RedisError, OSError, TimeoutError)
STARTUP_BUDGET = 1.0
RENEWALS_PER_TTL = 3
"""Leases are renewed every lease_ttl / 3: two renewals in a row may fail before one lapses."""
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
"""Backoff of the owed-calls queue, in seconds: once Redis is back, a lease it still holds for a
finished stream goes within about a second."""
MAX_OWED = 10_000
"""Owed calls kept at most (the oldest go first, logged): an outage must not grow memory."""
MAX_REMEMBERED = 50_000
"""Buckets whose last Redis level is kept for seeding the fallback (the least recent go): a
plan has a few (its tenant's, its key's, its end user's), so some 10,000 owners' worth, at
about 250 bytes each (12 MiB when full)."""


LEDGER_ONLY = Plan(())
"""A settle with no bucket: the settled marker and the ledger row (whence tokens today) only."""


class _Down(Exception):
    """The primary store did not answer (already counted); the policy takes over."""


@dataclass(frozen=True, slots=True)
class _Held:
    tenant: str
    local: bool  # taken from the fallback store, not the primary
    sets: tuple[str, ...]  # the lease sets it is in, one per level that caps streams


@dataclass(frozen=True, slots=True)
class _Owed:
    what: str  # "settle" | "refund" | "release", for the log
    tenant: str
    call: Callable[[], Awaitable[object]]


class QuotaService:
    def __init__(
        self,
        primary: Store,
        *,
        owners: PlanLookup,
        clock: Callable[[], float],
        lease_ttl: float,
        policy: Policy = "local",
        fallback: MemoryStore | None = None,
        breaker: CircuitBreaker | None = None,
        replicas: int = 1,
        startup_budget: float = STARTUP_BUDGET,
        calendar: Calendar | None = None,
        peer: str = "quota backend",
    ) -> None:
        """`owners`: where each owner's plan is found (read at every lookup, never copied).
        `breaker` None means the primary cannot fail (memory): no policy, nothing owed.
        The primary bounds its own calls; `startup_budget` bounds `check`."""
        if policy == "local" and breaker is not None and fallback is None:
            raise ValueError("on_backend_error local needs a fallback store")
        self._primary = primary
        self._clock = clock
        self._lease_ttl = lease_ttl
        self._policy = policy
        self._fallback = fallback
        self._breaker = breaker
        self._replicas = replicas
        self._startup_budget = startup_budget
        self._failures = FailureLog(log, "quota backend failed", peer, clock=clock)
        self._calendar = calendar or Calendar("UTC", time.time)
        # The level each tenant's and key's budget was last left at, by (tenant, key,
        # budget): (its period, that period's index, capacity, level). Kept per request (a
        # dict write per budget), turned into ratios only when /metrics asks.
        self._observed: dict[tuple[str, str | None, str], tuple[Period, int, int, float]] = {}
        self._owners = owners
        self._held: dict[str, _Held] = {}  # every stream lease this process holds
        # By bucket, as Redis stores it (owner, the bucket's key): the level it last reported
        # and when, on the bucket's own clock (BucketSpec.clock).
        self._reported: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        # The buckets and lease sets (owner, key) the fallback took over since Redis last
        # answered: each is seeded the first time the fallback uses it in an outage.
        self._seeded: set[tuple[str, str]] = set()
        self._owed: deque[_Owed] = deque()
        self._renewer: asyncio.Task[None] | None = None
        self._repayer: asyncio.Task[None] | None = None
        self.backend_errors = 0
        self._unique = _Ids()

    @property
    def state(self) -> Literal["ok", "degraded"]:
        """For /readyz: degraded while the breaker keeps Redis out and the policy decides."""
        return "ok" if self._breaker is None or self._breaker.state == "closed" else "degraded"

    @property
    def leases_held(self) -> int:
        return len(self._held)

    @property
    def owed(self) -> int:
        """Settles, refunds and releases waiting for Redis to answer again."""
        return len(self._owed)

    # --- the request path --------------------------------------------------------------

    async def reserve(
        self,
        tenant: str,
        request_id: str,
        *,
        tokens: int,
        stream: bool,
        key: str | None = None,
        end_user: str | None = None,
    ) -> Reservation:
        """`tenant`: any registered owner; `key` and `end_user` add their levels (an end user
        only where the tenant configures one). A lease taken here is kept alive until settle,
        refund or release_stream ends it."""
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        plan = self._plan(tenant, key, end_user)
        lease_wanted = stream and bool(plan.streams)
        if not plan.buckets and not lease_wanted:
            # Nothing to count: no round trip at all.
            return Reservation(
                tenant, request_id, True, 0, None, 0, (), None, self._primary.name, self._unique()
            )
        lease = self._unique() if lease_wanted else None
        at = self._calendar.now()
        try:
            return await self._reserve_on(
                self._primary, plan, tenant, request_id, tokens, lease, at
            )
        except _Down:
            pass
        if self._policy == "closed":
            raise QuotaUnavailable()
        if self._policy == "open" or self._fallback is None:
            return Reservation(
                tenant, request_id, True, 0, None, 0, (), None, "open", self._unique()
            )
        local = self._local(tenant, plan, at)
        return await self._reserve_on(self._fallback, local, tenant, request_id, tokens, lease, at)

    async def settle(
        self, reservation: Reservation, actual_tokens: int, charge: Charge | None = None
    ) -> None:
        """Once per reservation (a duplicate, or one after `refund`, changes nothing), into the
        usage ledger's current day with `charge`'s key, agent and split. Never raises for
        backend trouble: it is retried until Redis answers again (into the day it settled)."""
        if actual_tokens < 0:
            raise ValueError("actual_tokens must not be negative")
        if not reservation.allowed:
            return
        store, plan = self._store_for(reservation)
        delta = actual_tokens - reservation.reserved_tokens
        tenant, key, at = reservation.tenant, reservation.settle_key, self._calendar.now()

        async def settle() -> None:
            settled = await store.settle(tenant, plan, key, delta, actual_tokens, at, charge)
            if settled is not None:
                # Past what the reservation left: the fallback starts from here.
                self._remember(store, tenant, plan.token_buckets, settled.levels, at)
                if settled.levels and plan.token_budget_slots:
                    self._budgets_used(tenant, plan.token_budget_slots, settled.levels, at)
                self._warn(tenant, settled.crossed)

        await self._owe_on_failure(store, "settle", tenant, settle)
        if store is not self._primary and self._fallback is not None:
            # Admitted on the fallback: its buckets are this replica's, but the ledger is
            # everyone's. The row goes to Redis (owed until it answers), once, by settle's
            # own marker; with no buckets, the call moves nothing else.
            primary = self._primary
            await self._owe_on_failure(
                primary,
                "ledger",
                tenant,
                lambda: primary.settle(tenant, LEDGER_ONLY, key, 0, actual_tokens, at, charge),
            )

    async def refund(self, reservation: Reservation) -> None:
        """For a request that never reached upstream: as if it had never been admitted (its
        request, its reserved tokens and its stream slot back; no tokens counted today). Once
        per reservation, sharing settle's marker: after a settle it changes nothing, and a
        settle after it changes nothing. Never raises for backend trouble (retried)."""
        if not reservation.allowed or reservation.plan is None:
            return  # nothing was taken
        lease = self._forget(reservation)
        store, plan = self._store_for(reservation)
        tenant, key, tokens = (
            reservation.tenant,
            reservation.settle_key,
            reservation.reserved_tokens,
        )
        at = self._calendar.now()
        await self._owe_on_failure(
            store, "refund", tenant, lambda: store.refund(tenant, plan, key, tokens, lease, at)
        )

    async def take_stream(self, reservation: Reservation) -> Reservation | None:
        """A stream lease for an admitted request that took none (upstream streamed although
        the request did not ask to): the reservation holding it, unchanged when the tenant has
        no stream limit or it holds one already, or None when every stream slot is taken. A
        backend in trouble leaves it to the policy, as for any admission."""
        if reservation.backend == "open" or reservation.stream_lease is not None:
            return reservation  # the policy let it through uncounted, or it holds one
        store, plan = self._store_for(reservation)
        if not plan.streams:
            return reservation
        lease, streams_only = self._unique(), Plan((), plan.streams)
        try:
            taken = await self._reserve_on(
                store,
                streams_only,
                reservation.tenant,
                reservation.request_id,
                0,
                lease,
                self._calendar.now(),
            )
        except _Down:
            if self._policy == "closed":
                raise QuotaUnavailable() from None
            return reservation  # open or local: the slot goes uncounted, as the policy says
        return replace(reservation, stream_lease=lease) if taken.allowed else None

    async def release_stream(self, reservation: Reservation) -> None:
        """The stream is over: its lease goes (retried until Redis answers, if need be)."""
        lease = self._forget(reservation)
        if lease is None:
            return
        store, plan = self._store_for(reservation)
        tenant, sets = reservation.tenant, plan.stream_sets
        await self._owe_on_failure(
            store, "release", tenant, lambda: store.release(tenant, lease, sets)
        )

    async def usage(
        self, tenant: str, key: str | None = None, end_user: str | None = None
    ) -> dict[str, object]:
        """The owner's buckets (and, with `key` and `end_user`, theirs after them); its
        budgets again with what is used and when each period starts afresh."""
        plan = self._plan(tenant, key, end_user)
        store: Store = self._primary
        at = self._calendar.now()
        try:
            snapshot = await self._call(store, lambda: store.usage(tenant, plan, at))
        except _Down:
            if self._policy != "local" or self._fallback is None:
                raise QuotaUnavailable() from None
            plan, fallback = self._local(tenant, plan, at), self._fallback
            snapshot = await fallback.usage(tenant, plan, at)
        else:
            self._remember(store, tenant, plan.buckets, snapshot.levels, at)
        states = _bucket_states(plan, snapshot.levels, at)
        budgets = []
        for spec, state in zip(plan.buckets, states, strict=True):
            if spec.period is not None:
                resets = at.wall + at.until(spec.period)
                budgets.append(
                    {
                        "name": spec.name,
                        "limit": spec.capacity,
                        "used": spec.capacity - state.remaining,
                        "resets_at": datetime.fromtimestamp(resets, UTC).isoformat(),
                    }
                )
        streams = [
            {"name": cap.name, "limit": cap.limit, "active": active}
            for cap, active in zip(plan.streams, snapshot.active_streams, strict=True)
        ]
        return {
            "tenant": tenant,
            "buckets": [
                {"name": b.name, "limit": b.limit, "remaining": b.remaining, "reset": b.reset}
                for b in states
            ],
            "budgets": budgets,
            "timezone": self._calendar.zone,
            "tokens_today": snapshot.tokens_today,
            # The tenant's own cap, as before levels: named plainly, never a key's.
            "concurrent_streams": next(
                (
                    {"limit": s["limit"], "active": s["active"]}
                    for s in streams
                    if s["name"] == CONCURRENT_STREAMS
                ),
                {"limit": None, "active": 0},
            ),
            "streams": streams,
        }

    async def ledger(self, first: str, last: str) -> list[UsageRow]:
        """The usage ledger's rows for days `first`..`last` (ISO dates in quota.timezone),
        from the primary store: the fallback's are this replica's alone."""
        return await self._primary.ledger(first, last)

    # --- lifecycle ---------------------------------------------------------------------

    async def check(self, probe: Callable[[], Awaitable[object]]) -> bool:
        """Run `probe` against the primary at start-up (connect, find the cluster, load the
        scripts), allowed a second: start-up can wait, a request cannot. On failure the breaker
        opens at once, so /readyz reports it before the first request finds out."""
        if self._breaker is None:
            return True

        async def bounded() -> object:
            async with asyncio.timeout(self._startup_budget):
                return await probe()

        try:
            await self._call(self._primary, bounded)
        except _Down:
            self._breaker.trip()
            return False
        return True

    async def renew_leases(self) -> None:
        """One renewal of every lease this process holds, one call per owner (batched on the
        wire). A failure is logged and left to the next round: a lease outlives two, and a
        lease Redis lost meanwhile is put back."""
        by_owner: dict[tuple[str, bool, tuple[str, ...]], list[str]] = {}
        for lease, held in self._held.items():
            by_owner.setdefault((held.tenant, held.local, held.sets), []).append(lease)
        calls = []
        for (tenant, local, sets), leases in by_owner.items():
            store = self._fallback if local and self._fallback is not None else self._primary
            calls.append(self._renew(store, tenant, sets, leases))
        failed = sum(not renewed for renewed in await asyncio.gather(*calls))
        if failed:
            log.warning("quota lease renewal failed", owners=failed, owners_held=len(calls))

    async def aclose(self) -> None:
        for task in (self._renewer, self._repayer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._owed:
            log.warning("quota calls owed to the backend dropped at exit", count=len(self._owed))
        await self._primary.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()

    # --- inside ------------------------------------------------------------------------

    def _plan(self, owner: str, key: str | None = None, end_user: str | None = None) -> Plan:
        return self._owners.plan(owner, key, end_user)

    def _store_for(self, reservation: Reservation) -> tuple[Store, Plan]:
        plan = reservation.plan
        if plan is None:  # reserved with nothing to count, or passed by the `open` policy
            try:
                plan = self._plan(reservation.tenant)
            except ValueError:
                plan = LEDGER_ONLY  # a reload removed its owner since: the ledger still counts it
        if reservation.backend == "local" and self._fallback is not None:
            return self._fallback, plan
        return self._primary, plan

    def _forget(self, reservation: Reservation) -> str | None:
        """Stop renewing the reservation's lease; drop the fallback's copy of a Redis lease."""
        lease = reservation.stream_lease
        if lease is None:
            return None
        held = self._held.pop(lease, None)
        if held is not None and not held.local and self._fallback is not None:
            self._fallback.forget_lease(reservation.tenant, lease, held.sets)
        return lease

    async def _reserve_on(
        self,
        store: Store,
        plan: Plan,
        tenant: str,
        request_id: str,
        tokens: int,
        lease: str | None,
        at: Moment,
    ) -> Reservation:
        cost = plan.token_cost(tokens)
        decision: Decision = await self._call(
            store, lambda: store.reserve(tenant, plan, cost, lease, at)
        )
        self._remember(store, tenant, plan.buckets, decision.levels, at)
        if decision.allowed and plan.budget_slots:
            self._budgets_used(tenant, plan.budget_slots, decision.levels, at)
            self._warn(tenant, decision.crossed)
        if decision.allowed and lease is not None:
            self._held[lease] = _Held(tenant, store is not self._primary, plan.stream_sets)
            if self._renewer is None:
                self._renewer = asyncio.create_task(self._keep_leases())
        return Reservation(
            tenant=tenant,
            request_id=request_id,
            allowed=decision.allowed,
            reserved_tokens=cost if decision.allowed else 0,
            rejected_by=decision.rejected_by,
            retry_after=0 if decision.allowed else whole_seconds(decision.wait),
            buckets=_bucket_states(plan, decision.levels, at),
            stream_lease=lease if decision.allowed else None,
            backend=store.name,
            reservation_id=self._unique(),
            plan=plan,
        )

    def _budgets_used(
        self, tenant: str, slots: tuple[BudgetSlot, ...], levels: tuple[float, ...], at: Moment
    ) -> None:
        observed = self._observed
        for slot in slots:
            observed[(tenant, slot.key, slot.budget)] = (
                slot.period,
                at.index(slot.period),
                slot.capacity,
                levels[slot.index],
            )

    def budget_ratios(self) -> Iterator[tuple[str, str | None, str, float]]:
        """(tenant, key or None, budget, fraction used) of every budget seen since start-up,
        as of now: one whose period has ended since shows its new period's (what its debt
        carried over: each period's refill takes one whole limit off, else 0), so an idle
        tenant's ratio does not stay at yesterday's 85 % and keep an alert firing."""
        at = self._calendar.now()
        for (tenant, key, budget), (period, index, capacity, level) in self._observed.items():
            ratio = (capacity - level) / capacity
            elapsed = at.index(period) - index
            if elapsed > 0:
                ratio = max(0.0, ratio - elapsed)
            yield tenant, key, budget, ratio

    @staticmethod
    def _warn(tenant: str, crossed: tuple[Crossing, ...]) -> None:
        """Each crossing is reported by exactly one store call (the one that moved the level
        past it), so each is logged once per period and level, across every replica."""
        for crossing in crossed:
            labels = crossing.bucket.budget_of()
            key, budget = labels if labels is not None else ("end user", crossing.bucket.name)
            log.warning(
                "budget threshold crossed",
                tenant=tenant,
                key=key or "all",
                budget=budget,
                fraction=crossing.fraction,
                limit=crossing.bucket.capacity,
            )

    def _remember(
        self,
        store: Store,
        owner: str,
        buckets: tuple[BucketSpec, ...],
        levels: tuple[float, ...],
        at: Moment,
    ) -> None:
        """The levels Redis just reported, for a fallback to start from (only where one can
        take over: a breaker guards Redis); no levels, nothing moved."""
        if store is not self._primary or self._breaker is None or not levels:
            return
        reported, now = self._reported, self._clock()
        for spec, level in zip(buckets, levels, strict=True):
            bucket = (owner, spec.key)
            reported[bucket] = (level, spec.clock(now, at))
            reported.move_to_end(bucket)
        while len(reported) > MAX_REMEMBERED:
            reported.popitem(last=False)

    def _local(self, owner: str, plan: Plan, at: Moment) -> Plan:
        """This replica's share of `plan`. Each of its buckets is seeded the first time the
        fallback uses it in an outage: at the level Redis last reported for that bucket (this
        replica's share of it), whichever plan reported it, or empty for a bucket never seen,
        since a full one would admit a whole limit more. Each lease set likewise, with the
        leases this replica holds in it."""
        local = plan.scaled(self._replicas)
        fallback, seeded = self._fallback, self._seeded
        if fallback is None:
            return local
        seeds: list[Seed] = []
        known = 0
        for spec in local.buckets:
            bucket = (owner, spec.key)
            if bucket in seeded:
                continue
            seeded.add(bucket)
            reported = self._reported.get(bucket)
            if reported is None:
                seeds.append(Seed(spec, 0.0, spec.clock(self._clock(), at)))
            else:
                level, stamp = reported
                seeds.append(Seed(spec, level / self._replicas, stamp))
                known += 1
        leases: dict[str, list[str]] = {}
        for cap in local.streams:
            if (owner, cap.key) not in seeded:
                seeded.add((owner, cap.key))
                leases[cap.key] = [
                    lease
                    for lease, held in self._held.items()
                    if held.tenant == owner and cap.key in held.sets
                ]
        if seeds:
            fallback.seed(owner, seeds, at)
        if leases:
            fallback.seed_leases(owner, leases)
        if seeds or leases:
            log.info(
                "quota fallback seeded",
                tenant=owner,
                buckets=len(seeds),
                from_redis=known,
                lease_sets=len(leases),
            )
        return local

    async def _owe_on_failure(
        self, store: Store, what: str, tenant: str, call: Callable[[], Awaitable[object]]
    ) -> None:
        try:
            await self._call(store, call)
        except _Down:
            self._owe(_Owed(what, tenant, call))

    def _owe(self, owed: _Owed) -> None:
        if len(self._owed) >= MAX_OWED:
            dropped = self._owed.popleft()
            log.warning("quota call owed to the backend dropped", what=dropped.what)
        self._owed.append(owed)
        log.info("quota call owed to the backend", what=owed.what, tenant=owed.tenant)
        if self._repayer is None or self._repayer.done():
            self._repayer = asyncio.create_task(self._repay())

    async def _repay(self) -> None:
        """While anything is owed: retry the oldest, backing off while Redis does not answer
        (through the breaker: a retry may be its probe)."""
        delay = RETRY_FIRST
        while self._owed:
            await asyncio.sleep(delay)
            while self._owed:
                owed = self._owed[0]
                try:
                    await self._call(self._primary, owed.call)
                except _Down:
                    delay = min(delay * 2, RETRY_MAX)
                    break
                self._owed.popleft()
                delay = RETRY_FIRST
                log.info("quota owed call repaid", what=owed.what, tenant=owed.tenant)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ttl / RENEWALS_PER_TTL)
            await self.renew_leases()

    async def _renew(
        self, store: Store, tenant: str, sets: tuple[str, ...], leases: list[str]
    ) -> bool:
        # The round listed these a step ago: a lease released since must not be put back (the
        # call below is queued in this same step, so a later release is sent after it).
        leases = [lease for lease in leases if lease in self._held]
        if not leases:
            return True
        try:
            await self._call(store, lambda: store.renew(tenant, sets, leases))
        except _Down:
            return False
        return True

    async def _call(self, store: Store, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one store call; for the primary behind a breaker, `_Down` when it fails. The
        store bounds the call by what Redis takes: time spent waiting for the event loop is
        not the backend's failure."""
        breaker = self._breaker
        if breaker is None or store is not self._primary:
            return await operation()
        if not breaker.allow():
            raise _Down
        before = breaker.state
        try:
            result = await operation()
        except BACKEND_ERRORS as exc:
            self.backend_errors += 1
            breaker.failure()
            # The error's class and the OS error under it, never its text (which may quote a
            # URL); once per kind every few seconds, however many requests meet it.
            self._failures.failed(exc, breaker=breaker.state)
            raise _Down from exc
        breaker.success()
        if self._seeded:
            self._seeded.clear()  # the next fallback seeds afresh from what Redis says now
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


def _bucket_states(plan: Plan, levels: tuple[float, ...], at: Moment) -> tuple[BucketState, ...]:
    return tuple(
        BucketState(spec.name, spec.capacity, math.floor(level), reset_after(spec, level, at))
        for spec, level in zip(plan.buckets, levels, strict=True)
    )
