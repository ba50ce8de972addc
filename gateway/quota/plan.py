"""A tenant's limits as token buckets, and the bucket arithmetic the memory store uses.

`reserve.lua` does the same arithmetic on the Redis server; the contract tests hold the two to
one behaviour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateway.config import TenantLimits

REQUESTS_PER_MINUTE = "requests per minute"
REQUESTS_PER_DAY = "requests per day"
TOKENS_PER_MINUTE = "tokens per minute"
TOKENS_PER_DAY = "tokens per day"
CONCURRENT_STREAMS = "concurrent streams"

KEY_LEVEL = "key "  # how a key's own buckets are named: "key billing-service: requests per day"


def is_token_bucket(name: str) -> bool:
    """Whether a bucket of this name counts tokens (at any level)."""
    return name.endswith((TOKENS_PER_MINUTE, TOKENS_PER_DAY))


def level_of(name: str) -> str:
    """A bucket name without the key it belongs to: `key billing-service: tokens per day` →
    `key tokens per day` (for metric labels, which must stay a fixed set)."""
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
    rate: float = field(init=False, compare=False, repr=False)
    """Refill per second; derived once, every bucket computation asks."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", self.refill / self.window)

    def cost(self, tokens: int) -> int:
        return tokens if self.tokens else 1


@dataclass(frozen=True, slots=True)
class Plan:
    buckets: tuple[BucketSpec, ...]
    max_streams: int | None
    # Derived once: every reservation and settlement asks.
    token_buckets: tuple[BucketSpec, ...] = field(init=False, compare=False, repr=False)
    _max_token_cost: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        token_buckets = tuple(b for b in self.buckets if b.tokens)
        object.__setattr__(self, "token_buckets", token_buckets)
        object.__setattr__(
            self, "_max_token_cost", min((b.capacity for b in token_buckets), default=0)
        )

    @property
    def unlimited(self) -> bool:
        return not self.buckets and self.max_streams is None

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

        return Plan(
            buckets=tuple(
                BucketSpec(b.name, b.key, share(b.capacity), share(b.refill), b.window, b.tokens)
                for b in self.buckets
            ),
            max_streams=None if self.max_streams is None else share(self.max_streams),
        )


def plan_for(
    limits: TenantLimits, key: str | None = None, key_limits: TenantLimits | None = None
) -> Plan:
    """The tenant's buckets and, for a key with limits of its own, the key's after them: one
    plan, so one atomic call takes from every level or from none."""
    buckets = _buckets(limits, "", "")
    if key is not None and key_limits is not None:
        buckets += _buckets(key_limits, f"{KEY_LEVEL}{key}: ", f"k:{key}:")
    return Plan(tuple(buckets), limits.max_concurrent_streams)


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
    """The level refilled up to `now`, and the time it is valid at.

    A clock that steps back refills nothing until it passes `stamp` again, so it never mints.
    """
    if now > stamp:
        level += (now - stamp) * spec.rate
        stamp = now
    return min(level, spec.capacity), stamp


def worst_wait(plan: Plan, levels: tuple[float, ...], tokens: int) -> tuple[str | None, float]:
    """The bucket that refuses longest, and how long; (None, 0) when every bucket allows."""
    rejected: str | None = None
    wait = 0.0
    for spec, level in zip(plan.buckets, levels, strict=True):
        cost = spec.cost(tokens)
        if level < cost:
            needed = (cost - level) / spec.rate
            if rejected is None or needed > wait:
                rejected, wait = spec.name, needed
    return rejected, wait


def whole_seconds(wait: float) -> int:
    """Retry-After: whole seconds, at least 1 (the float slack keeps 2.0000000001 at 2)."""
    return max(1, math.ceil(wait - 1e-9))


def reset_after(spec: BucketSpec, level: float) -> float:
    return max(0.0, (spec.capacity - level) / spec.rate)
