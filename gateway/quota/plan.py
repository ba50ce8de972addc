"""A tenant's limits and budgets as buckets, and the bucket arithmetic the memory store uses.

Two kinds of bucket, one arithmetic. A rate limit (`limits`) refills continuously, by the
second. A calendar budget (`budget`) refills whole at the start of each period: its "clock" is
the period's index (calendar.py) and it refills its capacity per period, so a budget left in
debt by settling pays it off from the next period's allowance, just as a rate limit's debt is
paid off by refill. `buckets.lua` does the same arithmetic on the Redis server; the contract
tests hold the two to one behaviour.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

from gateway.config import Amount, Budget, EndUser, TenantLimits
from gateway.quota.calendar import Moment, Period

REQUESTS_PER_MINUTE = "requests per minute"
REQUESTS_PER_DAY = "requests per day"
TOKENS_PER_MINUTE = "tokens per minute"
TOKENS_PER_DAY = "tokens per day"
CONCURRENT_STREAMS = "concurrent streams"
# Budgets. "per day" is taken by the rolling limit, so a calendar day says so.
REQUESTS_PER_CALENDAR_DAY = "requests per calendar day"
TOKENS_PER_CALENDAR_DAY = "tokens per calendar day"
REQUESTS_PER_MONTH = "requests per month"
TOKENS_PER_MONTH = "tokens per month"
BUDGET_LABELS = {
    TOKENS_PER_CALENDAR_DAY: "tokens_per_day",
    TOKENS_PER_MONTH: "tokens_per_month",
    REQUESTS_PER_CALENDAR_DAY: "requests_per_day",
    REQUESTS_PER_MONTH: "requests_per_month",
}
"""A budget's name in metrics (`gateway_budget_used_ratio{budget=...}`)."""

TENANT_STREAMS = "streams"  # the tenant's lease set; a key's is k:<name>:streams
KEY_LEVEL = "key "  # how a key's own buckets are named: "key billing-service: requests per day"
END_USER_LEVEL = "end user: "  # never the end user's id: that is a bucket id, not a name


def is_token_bucket(name: str) -> bool:
    """Whether a bucket of this name counts tokens (at any level)."""
    return name.endswith(
        (TOKENS_PER_MINUTE, TOKENS_PER_DAY, TOKENS_PER_CALENDAR_DAY, TOKENS_PER_MONTH)
    )


def level_of(name: str) -> str:
    """A bucket name without the key it belongs to: `key billing-service: tokens per day` →
    `key tokens per day`, `end user: tokens per month` → `end user tokens per month` (for
    metric labels, which must stay a fixed set)."""
    if name.startswith(END_USER_LEVEL):
        return END_USER_LEVEL.removesuffix(": ") + " " + name.removeprefix(END_USER_LEVEL)
    if name.startswith(KEY_LEVEL) and ": " in name:
        return KEY_LEVEL + name.partition(": ")[2]
    return name


MINUTE = 60
DAY = 86_400


@dataclass(frozen=True, slots=True)
class BucketSpec:
    name: str
    key: str  # short, stable suffix of the Redis key: rpm, rpd, tpm, tpd
    capacity: int
    refill: int  # added per `window`, continuously
    window: int  # seconds
    tokens: bool  # costs the request's tokens, else one request
    # A calendar budget: refills `capacity` at the start of each period (window 1, counted in
    # periods), and logs each fraction of `warn_at` once per period as it is crossed.
    period: Period | None = None
    warn_at: tuple[float, ...] = ()
    rate: float = field(init=False, compare=False, repr=False)
    """Refill per unit of its clock; derived once, every bucket computation asks."""
    warns: str = field(init=False, compare=False, repr=False)
    """`warn_at` as the scripts take it: '0.8,0.95'."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", self.refill / self.window)
        object.__setattr__(self, "warns", ",".join(repr(f) for f in self.warn_at))

    def cost(self, tokens: int) -> int:
        return tokens if self.tokens else 1

    def clock(self, now: float, moment: Moment) -> float:
        """Where this bucket's time is: seconds for a rate limit, the period for a budget."""
        return now if self.period is None else moment.index(self.period)

    def budget_of(self) -> tuple[str | None, str] | None:
        """A tenant's or a key's budget, as metric labels: (key name or None, budget)."""
        if self.period is None or self.name.startswith(END_USER_LEVEL):
            return None
        level, _, what = self.name.rpartition(": ")
        return (level.removeprefix(KEY_LEVEL) if level else None), BUDGET_LABELS[what]


@dataclass(frozen=True, slots=True)
class BudgetSlot:
    index: int
    key: str | None  # the key's name, None for the tenant's own
    budget: str  # tokens_per_day, ... (BUDGET_LABELS)
    period: Period
    capacity: int


def _slots(buckets: tuple[BucketSpec, ...]) -> tuple[BudgetSlot, ...]:
    slots = []
    for i, spec in enumerate(buckets):
        labels = spec.budget_of()
        if labels is not None and spec.period is not None:
            slots.append(BudgetSlot(i, labels[0], labels[1], spec.period, spec.capacity))
    return tuple(slots)


@dataclass(frozen=True, slots=True)
class StreamCap:
    """Concurrent streams of one level: a set of leases, each a stream still open."""

    name: str  # "concurrent streams", "key billing-service: concurrent streams"
    key: str  # the lease set's stored key: streams, k:billing-service:streams
    limit: int


@dataclass(frozen=True, slots=True)
class Plan:
    buckets: tuple[BucketSpec, ...]
    streams: tuple[StreamCap, ...] = ()  # a stream takes one lease in every one, or none
    # Derived once: every reservation and settlement asks.
    token_buckets: tuple[BucketSpec, ...] = field(init=False, compare=False, repr=False)
    # The tenant's and keys' budgets (not an end user's) by their index in `buckets` and in
    # `token_buckets`: what gateway_budget_used_ratio shows, without a search per request.
    budget_slots: tuple[BudgetSlot, ...] = field(init=False, compare=False, repr=False)
    token_budget_slots: tuple[BudgetSlot, ...] = field(init=False, compare=False, repr=False)
    _max_token_cost: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        token_buckets = tuple(b for b in self.buckets if b.tokens)
        object.__setattr__(self, "token_buckets", token_buckets)
        object.__setattr__(self, "budget_slots", _slots(self.buckets))
        object.__setattr__(self, "token_budget_slots", _slots(token_buckets))
        object.__setattr__(
            self, "_max_token_cost", min((b.capacity for b in token_buckets), default=0)
        )

    @property
    def unlimited(self) -> bool:
        return not self.buckets and not self.streams

    @property
    def max_streams(self) -> int | None:
        """The tenant's own cap (the first level's), if it has one."""
        return next((cap.limit for cap in self.streams if cap.key == TENANT_STREAMS), None)

    @property
    def stream_sets(self) -> tuple[str, ...]:
        return tuple(cap.key for cap in self.streams)

    def token_cost(self, tokens: int) -> int:
        """Clamped to the smallest token capacity: a bigger cost could never pass (settle
        debits the rest), and one figure for every token bucket keeps settle exact."""
        return min(tokens, self._max_token_cost) if self.token_buckets else 0

    def scaled(self, replicas: int) -> Plan:
        """This replica's share, for the local fallback: limit / replicas, ceil, at least 1."""
        if replicas <= 1:
            return self

        def share(n: int) -> int:
            return max(1, math.ceil(n / replicas))

        def scaled(b: BucketSpec) -> BucketSpec:
            capacity = share(b.capacity)
            refill = capacity if b.period is not None else share(b.refill)
            return replace(b, capacity=capacity, refill=refill)

        return Plan(
            buckets=tuple(scaled(b) for b in self.buckets),
            streams=tuple(replace(cap, limit=share(cap.limit)) for cap in self.streams),
        )

    def with_end_user(self, end_user: EndUser, who: str) -> Plan:
        """This plan and the buckets of one end user (`who`, the header's value) after it."""
        return Plan(self.buckets + end_user_buckets(end_user, who), self.streams)


def plan_for(
    limits: TenantLimits,
    key: str | None = None,
    key_limits: TenantLimits | None = None,
    *,
    budget: Budget | None = None,
    key_budget: Budget | None = None,
) -> Plan:
    """The tenant's buckets and budgets and, for a key with its own, the key's after them: one
    plan, so one atomic call takes from every level or from none."""
    buckets = _buckets(limits, "", "") + _budgets(budget, "", "")
    streams = _streams(limits, "", "")
    if key is not None:
        prefix, stored = f"{KEY_LEVEL}{key}: ", f"k:{key}:"
        if key_limits is not None:
            buckets += _buckets(key_limits, prefix, stored)
            streams += _streams(key_limits, prefix, stored)
        buckets += _budgets(key_budget, prefix, stored)
    return Plan(tuple(buckets), tuple(streams))


def _streams(limits: TenantLimits, name_prefix: str, key_prefix: str) -> list[StreamCap]:
    cap = limits.max_concurrent_streams
    if cap is None:
        return []
    return [StreamCap(f"{name_prefix}{CONCURRENT_STREAMS}", f"{key_prefix}{TENANT_STREAMS}", cap)]


def end_user_buckets(end_user: EndUser, who: str) -> tuple[BucketSpec, ...]:
    """Stored under a digest of the value: it may look like a secret, and its length is the
    caller's choice. Named without it, so refusals, headers and metrics never show it."""
    digest = hashlib.blake2b(who.encode(), digest_size=12).hexdigest()
    stored = f"e:{digest}:"
    return tuple(
        _buckets(end_user.limits, END_USER_LEVEL, stored)
        + _budgets(end_user.budget, END_USER_LEVEL, stored)
    )


def _budgets(budget: Budget | None, name_prefix: str, key_prefix: str) -> list[BucketSpec]:
    if budget is None:
        return []
    buckets: list[BucketSpec] = []
    periods: tuple[Period, Period] = ("day", "month")
    amounts: tuple[tuple[Amount, bool, str, str, str], ...] = (
        (budget.requests, False, "r", REQUESTS_PER_CALENDAR_DAY, REQUESTS_PER_MONTH),
        (budget.tokens, True, "t", TOKENS_PER_CALENDAR_DAY, TOKENS_PER_MONTH),
    )
    for amount, tokens, short, per_day, per_month in amounts:
        for limit, period, name, suffix in zip(
            (amount.per_day, amount.per_month),
            periods,
            (per_day, per_month),
            ("bd", "bm"),
            strict=True,
        ):
            if limit is not None:
                buckets.append(
                    BucketSpec(
                        f"{name_prefix}{name}",
                        f"{key_prefix}{short}{suffix}",
                        limit,
                        limit,
                        1,
                        tokens,
                        period,
                        budget.warn_at,
                    )
                )
    return buckets


def _buckets(limits: TenantLimits, name_prefix: str, key_prefix: str) -> list[BucketSpec]:
    """`name_prefix` names the level in a refusal; `key_prefix` keeps its stored keys apart
    (both empty for the tenant's own, as they always were)."""
    buckets: list[BucketSpec] = []
    for per_minute, per_day, burst, tokens, prefix in (
        (limits.requests.per_minute, limits.requests.per_day, limits.requests.burst, False, "r"),
        (limits.tokens.per_minute, limits.tokens.per_day, limits.tokens.burst, True, "t"),
    ):
        kind = "tokens" if tokens else "requests"
        if per_minute is not None:
            capacity = burst if burst is not None else per_minute
            buckets.append(
                BucketSpec(
                    f"{name_prefix}{kind} per minute",
                    f"{key_prefix}{prefix}pm",
                    capacity,
                    per_minute,
                    MINUTE,
                    tokens,
                )
            )
        if per_day is not None:
            buckets.append(
                BucketSpec(
                    f"{name_prefix}{kind} per day",
                    f"{key_prefix}{prefix}pd",
                    per_day,
                    per_day,
                    DAY,
                    tokens,
                )
            )
    return buckets


def level_at(spec: BucketSpec, level: float, stamp: float, now: float) -> tuple[float, float]:
    """The level refilled up to `now`, and the time it is valid at (`now` and `stamp` are the
    bucket's own clock: `BucketSpec.clock`).

    A clock that steps back refills nothing until it passes `stamp` again, so it never mints.
    """
    if now > stamp:
        level += (now - stamp) * spec.rate
        stamp = now
    return min(level, spec.capacity), stamp


def worst_wait(
    plan: Plan, levels: tuple[float, ...], tokens: int, moment: Moment
) -> tuple[str | None, float]:
    """The bucket that refuses longest, and how long; (None, 0) when every bucket allows."""
    rejected: str | None = None
    wait = 0.0
    for spec, level in zip(plan.buckets, levels, strict=True):
        cost = spec.cost(tokens)
        if level < cost:
            needed = _until(spec, level, cost, moment)
            if rejected is None or needed > wait:
                rejected, wait = spec.name, needed
    return rejected, wait


def _until(spec: BucketSpec, level: float, wanted: float, moment: Moment) -> float:
    """Seconds until the bucket holds `wanted`: refill by the second, or whole periods."""
    if spec.period is None:
        return (wanted - level) / spec.rate
    return moment.until(spec.period, math.ceil((wanted - level) / spec.capacity - 1e-9))


def whole_seconds(wait: float) -> int:
    """Retry-After: whole seconds, at least 1 (the float slack keeps 2.0000000001 at 2)."""
    return max(1, math.ceil(wait - 1e-9))


def reset_after(spec: BucketSpec, level: float, moment: Moment) -> float:
    return 0.0 if level >= spec.capacity else max(0.0, _until(spec, level, spec.capacity, moment))
