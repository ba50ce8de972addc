"""The tenancy: everything a reload changes, built from one configuration as one value.

    Config ──Tenancy.of──▶ Tenancy (frozen) ──▶ TenancyHolder.current, app[TENANCY]
                             ├─ keyring          gateway key → tenant, key name  (auth)
                             ├─ upstream_keys    agent → its upstream key        (upstream)
                             ├─ upstream_limits  agent → that key's bucket       (upstream_limits)
                             ├─ owners           tenants (keys, end users, budgets)
                             │                   and upstream buckets → plans    (quota.owners)
                             └─ labels           metric label values allowed     (metrics)

`Tenancy.of` is pure: a validated Config in (its secrets already read), a Tenancy out. On SIGHUP
(gateway/reload.py) a new one replaces `TenancyHolder.current` in one assignment; nothing else
keeps a copy. The parts of
the gateway that live across requests (the upstream client, the upstream limiter, the quota
service, the metrics) read the part they need through the holder when they use it, so the next
request sees the new tenancy whole. What a request already holds stays as it was: its caller
(and so its tenant's agents and session isolation), and its reservations, which carry their plan
to settlement. Bucket levels, budgets used and the usage ledger live in the quota store by owner
name, so they carry over. Everything outside the tenancy (sockets, the upstream's address and
timeouts, the quota backend, logging, limits) is read once at start-up (app[CONFIG]).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import KeyRing
from gateway.config import Config
from gateway.metrics import MetricLabels
from gateway.quota import Owners
from gateway.quota.plan import Plan
from gateway.upstream import UpstreamKeys
from gateway.upstream_limits import UpstreamLimits


@dataclass(frozen=True, slots=True)
class Tenancy:
    """Who may call, as what, with which limits and budgets, through which upstream keys."""

    keyring: KeyRing
    upstream_keys: UpstreamKeys
    upstream_limits: UpstreamLimits
    owners: Owners
    labels: MetricLabels
    expiries: tuple[tuple[str, str, float], ...]  # (tenant, key, epoch s) of expiring keys

    @classmethod
    def of(cls, config: Config) -> Tenancy:
        upstream_limits = UpstreamLimits.of(config)
        return cls(
            keyring=KeyRing(config.tenants),
            upstream_keys=UpstreamKeys.of(config.agents, config.upstream.api_key),
            upstream_limits=upstream_limits,
            owners=Owners(config.tenants, upstream_limits.owners),
            labels=MetricLabels.of(config),
            expiries=tuple(
                (tenant.name, key.name, key.expires)
                for tenant in config.tenants.values()
                for key in tenant.keys
                if key.expires is not None
            ),
        )


class TenancyHolder:
    """The tenancy in force: read where it is used, replaced whole by a reload."""

    __slots__ = ("current",)

    def __init__(self, tenancy: Tenancy) -> None:
        self.current = tenancy

    def plan(self, owner: str, key: str | None = None, end_user: str | None = None) -> Plan:
        """The quota service's plan lookup (`quota.PlanLookup`), in the tenancy in force."""
        return self.current.owners.plan(owner, key, end_user)
