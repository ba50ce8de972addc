"""What the quota service answers, and the small interface every backend implements.

    QuotaService ── Store (protocol)
                     ├── MemoryStore   one process; also the `local` fallback
                     └── RedisStore    every replica, one Lua call per decision

A store decides and records; the service picks the store, applies the failure policy and turns
levels into the `BucketState`s callers see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.errors import Unavailable
from gateway.quota.calendar import Moment
from gateway.quota.plan import BucketSpec, Plan

Backend = Literal["memory", "redis", "local", "open"]


class QuotaUnavailable(Unavailable):
    """The quota backend is down and `on_backend_error: closed` says to refuse (503)."""

    def __init__(self) -> None:
        super().__init__("the quota backend is unavailable")


@dataclass(frozen=True, slots=True)
class BucketState:
    name: str  # "requests per minute" | "requests per day" | "tokens per minute" | ...
    limit: int  # capacity
    remaining: int  # floor(current level); negative while in token debt
    reset: float  # seconds until the bucket is full again (0 when full)


@dataclass(frozen=True, slots=True)
class Reservation:
    tenant: str
    request_id: str
    allowed: bool
    reserved_tokens: int  # taken from each token bucket (0 if refused)
    rejected_by: str | None  # a bucket's or a stream cap's name, when refused
    retry_after: int  # whole seconds until it would pass; >= 1 when refused, 0 when allowed
    buckets: tuple[BucketState, ...]  # state after the decision, every bucket of the tenant
    stream_lease: str | None  # lease id when a stream slot was taken
    backend: Backend  # "memory" | "redis" | "local" (fallback) | "open" (policy let it through)
    # Unique per reserve. Settle is once per (request_id, reservation_id): a request id may be
    # the caller's own X-Request-ID, and a caller reusing one must not make later settles void.
    reservation_id: str = ""
    # The plan it was reserved under, so that settling needs no lookup of a tenant that a
    # reload may have changed or removed meanwhile (None: an "open" pass, nothing to settle).
    plan: Plan | None = None

    @property
    def settle_key(self) -> str:
        return (
            f"{self.request_id}:{self.reservation_id}" if self.reservation_id else self.request_id
        )


@dataclass(frozen=True, slots=True)
class Crossing:
    """A budget's `warn_at` fraction crossed for the first time in its period."""

    bucket: BucketSpec
    fraction: float


@dataclass(frozen=True, slots=True)
class Decision:
    """A store's answer to one reserve: levels are after the decision, one per plan bucket."""

    allowed: bool
    rejected_by: str | None
    wait: float  # seconds until it would pass (0 when allowed)
    levels: tuple[float, ...]
    crossed: tuple[Crossing, ...] = ()


@dataclass(frozen=True, slots=True)
class Settled:
    """A store's answer to one settle: the token buckets' levels after it (empty when nothing
    moved) and the warnings it crossed."""

    levels: tuple[float, ...] = ()
    crossed: tuple[Crossing, ...] = ()


@dataclass(frozen=True, slots=True)
class Charge:
    """What one settled request adds to the usage ledger besides its total: whose it was, and
    how its total divides. `tokens_estimated` is the part of the total upstream did not report
    (input and output count reported tokens only)."""

    key: str
    agent: str
    tokens_input: int = 0
    tokens_output: int = 0
    tokens_estimated: int = 0

    def field(self) -> str:
        """The ledger's field prefix; names cannot hold '|' (config's patterns)."""
        return f"{self.key}|{self.agent}|"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One ledger row: a day in quota.timezone, or a range once rows are summed."""

    day: str
    tenant: str
    key: str
    agent: str
    requests: int = 0
    tokens_input: int = 0
    tokens_output: int = 0
    tokens_total: int = 0
    tokens_estimated: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A store's read-only view of one tenant, for `usage()`."""

    levels: tuple[float, ...]
    active_streams: tuple[int, ...]  # per lease set of the plan
    tokens_today: int


class Store(Protocol):
    """One backend. `tokens` is already clamped to the plan's token capacity."""

    @property
    def name(self) -> Backend: ...

    async def reserve(
        self, tenant: str, plan: Plan, tokens: int, lease: str | None, at: Moment
    ) -> Decision:
        """Take 1 per request bucket, `tokens` per token bucket and `lease`: all or nothing.
        `at` places budgets in their periods."""
        ...

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
        """Debit `delta` (refund when negative) once per `settle_key`, and add `actual` tokens
        and `charge` to the ledger's day of `at`; None for a duplicate (nothing changes)."""
        ...

    async def refund(
        self,
        tenant: str,
        plan: Plan,
        settle_key: str,
        tokens: int,
        lease: str | None,
        at: Moment,
    ) -> bool:
        """Undo a reserve that never reached upstream: 1 back on each request bucket, `tokens`
        on each token bucket (never past capacity), `lease` released, nothing counted today.
        Shares settle's once-marker: False (and only the lease released) when either came
        first."""
        ...

    async def release(self, tenant: str, lease: str, sets: Sequence[str]) -> None:
        """`lease` leaves every one of the lease `sets` (a plan's `stream_sets`)."""
        ...

    async def renew(self, tenant: str, sets: Sequence[str], leases: Sequence[str]) -> None:
        """Every one of `leases` (streams still open) lives a full lease ttl from now in each
        of `sets`, put back if the store lost it."""
        ...

    async def usage(self, tenant: str, plan: Plan, at: Moment) -> Snapshot: ...

    async def ledger(self, first: str, last: str) -> list[UsageRow]:
        """Every ledger row of the days `first`..`last` (ISO dates, inclusive), any order."""
        ...

    async def aclose(self) -> None: ...
