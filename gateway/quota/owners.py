"""Bucket owners by name, and the plan each one's requests are reserved under.

Owners are the tenants (with their keys' and end users' levels) and the upstream keys that have
a limit of their own (upstream_limits.py). `Owners` is one immutable set of them, built from one
configuration: a reload builds a new one, so its plans are built afresh (lazily, on first use)
while bucket levels stay in the store, by name. The quota service asks a `PlanLookup`: an
`Owners`, or whatever holds the one in force (gateway/tenancy.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import Tenant, TenantLimits
from gateway.quota.plan import Plan, plan_for


class PlanLookup(Protocol):
    def plan(self, owner: str, key: str | None = None, end_user: str | None = None) -> Plan:
        """`owner`'s plan and, with `key` and `end_user`, their levels after it; ValueError for
        an owner nobody configured (a programming error: callers only name known ones)."""
        ...


@dataclass(frozen=True, slots=True)
class Owners:
    """Every bucket owner of one configuration. Tenants and upstream keys share one namespace
    (buckets are stored by owner name), so no name may be both: a ValueError."""

    tenants: Mapping[str, Tenant]
    upstream: Mapping[str, TenantLimits] = field(default_factory=dict)
    # Per (owner, key), built on first use: plans are immutable, and so are these owners.
    _plans: dict[tuple[str, str | None], Plan] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Checked from the upstream side: the tenant map may be a large (or lazy) mapping.
        for name in self.upstream:
            if name in self.tenants:
                raise ValueError(f"upstream key bucket {name!r} is already a tenant's name")

    def plan(self, owner: str, key: str | None = None, end_user: str | None = None) -> Plan:
        tenant = self.tenants.get(owner)
        plan = self._plans.get((owner, key))
        if plan is None:
            if tenant is not None:
                own = tenant.key(key) if key is not None else None
                plan = plan_for(
                    tenant.limits,
                    key,
                    own.limits if own is not None else None,
                    budget=tenant.budget,
                    key_budget=own.budget if own is not None else None,
                )
            elif owner in self.upstream:
                plan = plan_for(self.upstream[owner])
            else:
                raise ValueError(f"unknown tenant or upstream key {owner!r}")
            self._plans[(owner, key)] = plan
        if end_user is not None and tenant is not None and tenant.end_user is not None:
            return plan.with_end_user(tenant.end_user, end_user)
        return plan
