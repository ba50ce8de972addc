"""The tenancy: one configuration's key ring, upstream keys and limits, plans and label values,
built as one value; the holder is what a reload replaces."""

from __future__ import annotations

import pytest

from gateway.auth import hash_key
from gateway.config import Config, Limit, Secret, Tenant, TenantLimits, parse_config
from gateway.errors import Unauthorized
from gateway.quota import Owners
from gateway.tenancy import Tenancy, TenancyHolder
from tests.conftest import ACME_KEY, GLOBEX_KEY, PLATFORM_KEY, SUPPORT_KEY, gateway_yaml

KEY_LIMITS = (
    "    keys: [{name: billing-service, sha256: %s, limits: {requests: {per_minute: %d}}}]\n"
)


def config(*, key_per_minute: int = 10, upstream_per_minute: int = 60) -> Config:
    text = gateway_yaml("http://127.0.0.1:9").replace(
        "  timeouts:", f"  rate_limits: {{per_minute: {upstream_per_minute}}}\n  timeouts:", 1
    )
    acme_keys = next(line for line in text.splitlines(True) if "billing-service" in line)
    text = text.replace(acme_keys, KEY_LIMITS % (hash_key(ACME_KEY), key_per_minute))
    return parse_config(text, "test.yaml")


def revealed(secret: Secret | None) -> str | None:
    return None if secret is None else secret.reveal()


def test_a_tenancy_holds_everything_a_reload_changes() -> None:
    tenancy = Tenancy.of(config())

    caller = tenancy.keyring.authenticate(f"Bearer {ACME_KEY}", 0.0)
    assert (caller.tenant.name, caller.key_name) == ("acme", "billing-service")
    assert tenancy.keyring.authenticate(f"Bearer {GLOBEX_KEY}", 0.0).tenant.name == "globex"

    keys = tenancy.upstream_keys
    assert revealed(keys.for_agent("ag_support")) == SUPPORT_KEY
    assert revealed(keys.for_agent("ag_sales")) == PLATFORM_KEY
    assert keys.can_reach("ag_unlisted")  # the platform key reaches any agent

    limits = tenancy.upstream_limits
    support, platform = limits.bucket_for("ag_support"), limits.bucket_for("ag_unlisted")
    assert support is not None and platform is not None and support != platform
    assert limits.bucket_for("ag_sales") == platform
    assert set(limits.owners) == {support, platform}

    owners = tenancy.owners
    key_plan = owners.plan("acme", "billing-service")
    assert [b.name for b in key_plan.buckets] == ["key billing-service: requests per minute"]
    assert [b.capacity for b in owners.plan(support).buckets] == [60]
    with pytest.raises(ValueError, match="unknown tenant or upstream key"):
        owners.plan("initech")

    assert tenancy.labels.tenants == {"acme", "globex"}
    assert tenancy.labels.agents == {"ag_support", "ag_sales"}  # "*" is no agent


def test_the_holder_answers_from_the_tenancy_in_force() -> None:
    before = Tenancy.of(config(key_per_minute=10))
    holder = TenancyHolder(before)
    assert holder.plan("acme", "billing-service").buckets[0].capacity == 10

    holder.current = Tenancy.of(config(key_per_minute=3))
    assert holder.plan("acme", "billing-service").buckets[0].capacity == 3
    # The old tenancy is unchanged: whatever still holds it (a reservation's plan) stays valid.
    assert before.owners.plan("acme", "billing-service").buckets[0].capacity == 10
    # A key removed by the reload is refused from then on.
    holder.current = Tenancy.of(Config())  # no tenants at all
    with pytest.raises(Unauthorized):
        holder.current.keyring.authenticate(f"Bearer {ACME_KEY}", 0.0)


def test_a_name_is_a_tenant_or_an_upstream_bucket_never_both() -> None:
    acme = Tenant(name="acme", keys=(), agents=frozenset())
    with pytest.raises(ValueError, match="already a tenant"):
        Owners({"acme": acme}, {"acme": TenantLimits(requests=Limit(per_minute=1))})
