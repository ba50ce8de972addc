"""Per-tenant token-bucket quotas, held across every replica.

Per bucket owner (a tenant, or an upstream key with a limit of its own): requests per minute
and per day, tokens per minute and per day (a limit left out is unlimited) and a count of
concurrent streams. A request reserves one request and an estimate of its tokens in one atomic
step, all or nothing; afterwards it settles to the tokens it really used, which may leave a
token bucket in debt that refill pays off, or, when it never reached upstream, is refunded.

    open_quota(config, owners, lease_ttl=…)  ─▶ QuotaService ─▶ MemoryStore   (memory.py)
                                                      │      └─▶ RedisStore    (redis.py + *.lua)
                                                      └─ CircuitBreaker, failure policy

Modules: plan (limits → buckets, the arithmetic), owners (bucket owners by name → their plans),
model (results, the store protocol), memory, redis, connect (the Redis client and its bounds),
breaker, service, lifecycle (open_quota).
"""

from gateway.quota.lifecycle import open_quota
from gateway.quota.model import BucketState, Charge, QuotaUnavailable, Reservation, UsageRow
from gateway.quota.owners import Owners, PlanLookup
from gateway.quota.plan import (
    CONCURRENT_STREAMS,
    REQUESTS_PER_DAY,
    REQUESTS_PER_MINUTE,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    is_token_bucket,
    level_of,
)
from gateway.quota.service import QuotaService

__all__ = [
    "CONCURRENT_STREAMS",
    "REQUESTS_PER_DAY",
    "REQUESTS_PER_MINUTE",
    "TOKENS_PER_DAY",
    "TOKENS_PER_MINUTE",
    "BucketState",
    "Charge",
    "Owners",
    "PlanLookup",
    "QuotaService",
    "QuotaUnavailable",
    "Reservation",
    "UsageRow",
    "is_token_bucket",
    "level_of",
    "open_quota",
]
