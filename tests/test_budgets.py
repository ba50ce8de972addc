"""Calendar budgets, levels and the usage ledger: how much per day and month, at the tenant, its
keys and its end users, reset at midnight and on the 1st in quota.timezone.

Every test runs against the memory store and a real redis-server (the contract harness of
test_quota.py), on an injected wall clock in Europe/Berlin: budgets live by the gateway's
calendar, so the clock a test moves is the one they obey on either backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from structlog.testing import capture_logs

from gateway.config import (
    Amount,
    Budget,
    EndUser,
    Quota,
    Secret,
    Tenant,
    TenantKey,
    TenantLimits,
)
from gateway.quota import Charge, Owners, QuotaService, UsageRow, open_quota
from gateway.quota.calendar import Calendar
from gateway.quota.memory import MemoryStore
from gateway.quota.plan import (
    REQUESTS_PER_CALENDAR_DAY,
    REQUESTS_PER_MONTH,
    TOKENS_PER_CALENDAR_DAY,
    TOKENS_PER_MONTH,
)
from tests.conftest import FakeClock
from tests.redis_servers import RedisClusterServers, RedisServer, command
from tests.test_quota import (  # noqa: F401  (fixtures)
    COOLDOWN,
    Harness,
    Kind,
    cluster,
    limits,
    own_redis,
    redis_server,
    until,
)

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, s: int = 0) -> float:
    """Epoch seconds of a local time in Berlin: berlin(2026, 3, 28, 23, 59)."""
    return datetime(year, month, day, hour, minute, s, tzinfo=BERLIN).timestamp()


def budgets(usage: dict[str, object]) -> list[dict[str, Any]]:
    listed = usage["budgets"]
    assert isinstance(listed, list)
    return listed


def team(
    budget: Budget | None = None,
    *,
    keys: tuple[TenantKey, ...] = (),
    end_user: EndUser | None = None,
    tenant_limits: TenantLimits | None = None,
    name: str = "acme",
) -> dict[str, Tenant]:
    return {
        name: Tenant(
            name=name,
            keys=keys,
            agents=frozenset({"*"}),
            limits=tenant_limits or TenantLimits(),
            budget=budget or Budget(),
            end_user=end_user,
        )
    }


def service(
    name: str, budget: Budget | None = None, limits: TenantLimits | None = None
) -> TenantKey:
    return TenantKey(name=name, sha256=name[0] * 64, limits=limits, budget=budget)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind: Kind = request.param
    server: RedisServer | None = None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        command(server.port, "FLUSHALL")
    async with AsyncExitStack() as stack:
        yield Harness(kind, stack, server=server, zone="Europe/Berlin")


# --- the calendar -----------------------------------------------------------------------


def test_periods_end_at_local_midnight_and_on_the_first_whatever_the_day_length() -> None:
    wall = FakeClock(berlin(2026, 3, 29, 0, 30))  # the night clocks go forward: a 23-hour day
    calendar = Calendar("Europe/Berlin", wall)
    assert calendar.now().until("day") == 22.5 * 3600
    wall.now = berlin(2026, 10, 25, 0, 30)  # clocks go back: a 25-hour day
    assert calendar.now().until("day") == 24.5 * 3600
    assert calendar.now().date == "2026-10-25"
    wall.now = berlin(2026, 12, 31, 23, 0)
    now = calendar.now()
    assert now.until("day") == now.until("month") == 3600  # New Year: both end together
    assert now.until("month", 2) == 3600 + 31 * 86_400  # the start of February
    wall.now = berlin(2027, 1, 1, 0, 0)
    assert calendar.now().date == "2027-01-01"


# --- budgets ----------------------------------------------------------------------------


async def test_a_daily_budget_starts_afresh_at_local_midnight_not_a_day_after_first_use(
    harness: Harness,
) -> None:
    harness.wall.now = berlin(2026, 11, 27, 23, 58)
    quota = await harness.open_for(team(Budget(requests=Amount(per_day=2))))
    assert (await quota.reserve("acme", "r1", tokens=0, stream=False)).allowed
    assert (await quota.reserve("acme", "r2", tokens=0, stream=False)).allowed
    refused = await quota.reserve("acme", "r3", tokens=0, stream=False)
    assert not refused.allowed
    assert refused.rejected_by == REQUESTS_PER_CALENDAR_DAY
    assert refused.retry_after == 120  # to midnight in Berlin, not 24 h

    harness.wall.now = berlin(2026, 11, 27, 23, 59, 59)
    assert not (await quota.reserve("acme", "r4", tokens=0, stream=False)).allowed
    harness.wall.now = berlin(2026, 11, 28, 0, 0, 0)
    assert (await quota.reserve("acme", "r5", tokens=0, stream=False)).allowed
    assert (await quota.reserve("acme", "r6", tokens=0, stream=False)).allowed
    assert not (await quota.reserve("acme", "r7", tokens=0, stream=False)).allowed


async def test_a_monthly_budget_starts_afresh_on_the_first(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 1, 2, 9, 0)
    quota = await harness.open_for(team(Budget(tokens=Amount(per_month=1000))))
    spent = await quota.reserve("acme", "r1", tokens=1000, stream=False)
    await quota.settle(spent, 1000)

    harness.wall.now = berlin(2026, 1, 31, 23, 0)
    refused = await quota.reserve("acme", "r2", tokens=10, stream=False)
    assert refused.rejected_by == TOKENS_PER_MONTH
    assert refused.retry_after == 3600
    harness.wall.now = berlin(2026, 2, 1, 0, 0)
    assert (await quota.reserve("acme", "r3", tokens=1000, stream=False)).allowed


async def test_a_day_across_a_dst_change_ends_at_midnight(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 10, 25, 0, 30)  # a 25-hour day
    quota = await harness.open_for(team(Budget(requests=Amount(per_day=1))))
    assert (await quota.reserve("acme", "r1", tokens=0, stream=False)).allowed
    refused = await quota.reserve("acme", "r2", tokens=0, stream=False)
    assert refused.retry_after == 24.5 * 3600
    harness.wall.now = berlin(2026, 10, 25, 0, 30) + 24 * 3600  # 23:30 local: still the 25th
    assert not (await quota.reserve("acme", "r3", tokens=0, stream=False)).allowed
    harness.wall.now = berlin(2026, 10, 26, 0, 0)
    assert (await quota.reserve("acme", "r4", tokens=0, stream=False)).allowed


async def test_debt_carries_into_the_next_periods(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 11, 27, 12, 0)
    quota = await harness.open_for(team(Budget(tokens=Amount(per_day=1000))))
    reservation = await quota.reserve("acme", "r1", tokens=100, stream=False)
    await quota.settle(reservation, 2600)  # upstream said 2,600: 1,600 more than the day had

    harness.wall.now = berlin(2026, 11, 28, 8, 0)
    usage = await quota.usage("acme")
    (budget,) = budgets(usage)
    assert budget["name"] == TOKENS_PER_CALENDAR_DAY
    assert budget["used"] == 1600  # the debt, carried over: this day starts 600 short
    refused = await quota.reserve("acme", "r2", tokens=500, stream=False)
    assert not refused.allowed
    assert refused.retry_after == 16 * 3600 + 86_400  # the day after next holds 500 again
    harness.wall.now = berlin(2026, 11, 29, 8, 0)
    assert (await quota.reserve("acme", "r3", tokens=400, stream=False)).allowed
    assert not (await quota.reserve("acme", "r4", tokens=1, stream=False)).allowed
    harness.wall.now = berlin(2026, 11, 30, 0, 0)
    assert (await quota.reserve("acme", "r5", tokens=1000, stream=False)).allowed


async def test_a_key_budget_holds_inside_its_tenant_and_is_named_in_the_refusal(
    harness: Harness,
) -> None:
    harness.wall.now = berlin(2026, 11, 10, 10, 0)
    tenants = team(
        Budget(requests=Amount(per_month=5)),
        keys=(
            service("billing", Budget(requests=Amount(per_month=2))),
            service("reports"),
        ),
    )
    quota = await harness.open_for(tenants)
    for i in range(2):
        assert (await quota.reserve("acme", f"b{i}", tokens=0, stream=False, key="billing")).allowed
    refused = await quota.reserve("acme", "b3", tokens=0, stream=False, key="billing")
    assert refused.rejected_by == f"key billing: {REQUESTS_PER_MONTH}"
    assert refused.retry_after == berlin(2026, 12, 1) - harness.wall.now
    for i in range(3):
        assert (await quota.reserve("acme", f"r{i}", tokens=0, stream=False, key="reports")).allowed
    refused = await quota.reserve("acme", "r4", tokens=0, stream=False, key="reports")
    assert refused.rejected_by == REQUESTS_PER_MONTH  # the tenant's, which billing shares


async def test_usage_shows_each_budget_used_limit_and_when_it_resets(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 11, 28, 10, 0)
    tenants = team(
        Budget(tokens=Amount(per_day=10_000, per_month=100_000)),
        keys=(service("billing", Budget(requests=Amount(per_month=50))),),
    )
    quota = await harness.open_for(tenants)
    reservation = await quota.reserve("acme", "r1", tokens=700, stream=False, key="billing")
    await quota.settle(reservation, 1234)
    usage = await quota.usage("acme", "billing")
    assert usage["timezone"] == "Europe/Berlin"
    assert budgets(usage) == [
        {
            "name": TOKENS_PER_CALENDAR_DAY,
            "limit": 10_000,
            "used": 1234,
            "resets_at": "2026-11-28T23:00:00+00:00",  # midnight in Berlin
        },
        {
            "name": TOKENS_PER_MONTH,
            "limit": 100_000,
            "used": 1234,
            "resets_at": "2026-11-30T23:00:00+00:00",
        },
        {
            "name": f"key billing: {REQUESTS_PER_MONTH}",
            "limit": 50,
            "used": 1,
            "resets_at": "2026-11-30T23:00:00+00:00",
        },
    ]


async def test_tokens_today_is_the_ledgers_day_in_the_quota_timezone(harness: Harness) -> None:
    """/v1/usage's tokens_today starts afresh when the daily budgets do, at midnight in
    quota.timezone (not UTC's, nor Redis's clock's), and is that day's ledger total."""
    harness.wall.now = berlin(2026, 11, 28, 23, 0)  # 22:00 UTC
    tenants = team(Budget(tokens=Amount(per_day=10_000)), keys=(service("a"), service("b")))
    quota = await harness.open_for(tenants)
    for key, agent, tokens in (("a", "support", 300), ("b", "sales", 200)):
        reservation = await quota.reserve("acme", key, tokens=10, stream=False, key=key)
        await quota.settle(reservation, tokens, Charge(key, agent, 0, tokens, 0))
    usage = await quota.usage("acme")
    assert usage["tokens_today"] == 500 == budgets(usage)[0]["used"]

    harness.wall.now = berlin(2026, 11, 29, 0, 30)  # 23:30 UTC: still the 28th there
    reservation = await quota.reserve("acme", "late", tokens=10, stream=False, key="a")
    await quota.settle(reservation, 40, Charge("a", "support", 0, 40, 0))
    usage = await quota.usage("acme")
    assert usage["tokens_today"] == 40 == budgets(usage)[0]["used"]
    (today,) = await quota.ledger("2026-11-29", "2026-11-29")
    assert today.tokens_total == usage["tokens_today"]


async def test_each_warn_at_fraction_is_logged_once_per_period_across_replicas(
    harness: Harness,
) -> None:
    harness.wall.now = berlin(2026, 11, 28, 10, 0)
    tenants = team(Budget(requests=Amount(per_day=10), warn_at=(0.5, 0.8)))
    replicas = [await harness.open_for(tenants) for _ in range(2 if harness.server else 1)]

    def crossed(logs: list[MutableMapping[str, Any]]) -> list[tuple[str, str, str, float]]:
        return sorted(
            (e["tenant"], e["key"], e["budget"], e["fraction"])
            for e in logs
            if e["event"] == "budget threshold crossed"
        )

    once = [("acme", "all", "requests_per_day", 0.5), ("acme", "all", "requests_per_day", 0.8)]
    with capture_logs() as first_day:
        results = await asyncio.gather(
            *(
                replicas[i % len(replicas)].reserve("acme", f"r{i}", tokens=0, stream=False)
                for i in range(12)
            )
        )
    assert sum(r.allowed for r in results) == 10
    # Which replica logs a crossing, and in which order the two come, is the race's; that
    # each is logged once is not.
    assert crossed(first_day) == once
    harness.wall.now = berlin(2026, 11, 29, 10, 0)
    with capture_logs() as next_day:
        for i in range(8):
            assert (await replicas[0].reserve("acme", f"n{i}", tokens=0, stream=False)).allowed
    assert crossed(next_day) == once


async def test_budget_used_ratios_follow_each_request_and_the_periods_end(
    harness: Harness,
) -> None:
    harness.wall.now = berlin(2026, 11, 28, 10, 0)
    tenants = team(
        Budget(tokens=Amount(per_month=1000)),
        keys=(service("billing", Budget(requests=Amount(per_day=4), tokens=Amount(per_day=100))),),
    )
    quota = await harness.open_for(tenants)

    def seen() -> dict[tuple[str, str | None, str], float]:
        return {
            (tenant, key, budget): ratio for tenant, key, budget, ratio in quota.budget_ratios()
        }

    assert seen() == {}
    reservation = await quota.reserve("acme", "r1", tokens=25, stream=False, key="billing")
    assert seen() == {
        ("acme", None, "tokens_per_month"): 0.025,
        ("acme", "billing", "requests_per_day"): 0.25,
        ("acme", "billing", "tokens_per_day"): 0.25,
    }
    await quota.settle(reservation, 160)  # 60 over the key's day
    assert seen()[("acme", "billing", "tokens_per_day")] == 1.6
    assert seen()[("acme", None, "tokens_per_month")] == 0.16

    harness.wall.now = berlin(2026, 11, 29, 0, 0)  # midnight, and no request since
    assert seen() == pytest.approx(
        {
            ("acme", None, "tokens_per_month"): 0.16,  # the month goes on
            ("acme", "billing", "requests_per_day"): 0.0,
            ("acme", "billing", "tokens_per_day"): 0.6,  # the debt it carried over
        }
    )


# --- end users --------------------------------------------------------------------------


async def test_each_end_user_has_buckets_of_their_own(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 11, 28, 10, 0)
    end_users = EndUser(
        header="X-End-User",
        limits=limits(rpm=2),
        budget=Budget(tokens=Amount(per_day=1000)),
    )
    quota = await harness.open_for(team(end_user=end_users))
    for i in range(2):
        assert (
            await quota.reserve("acme", f"a{i}", tokens=0, stream=False, end_user="ann")
        ).allowed
    refused = await quota.reserve("acme", "a3", tokens=0, stream=False, end_user="ann")
    assert refused.rejected_by == "end user: requests per minute"
    assert (await quota.reserve("acme", "b1", tokens=900, stream=False, end_user="bob")).allowed
    refused = await quota.reserve("acme", "b2", tokens=200, stream=False, end_user="bob")
    assert refused.rejected_by == f"end user: {TOKENS_PER_CALENDAR_DAY}"
    assert (await quota.reserve("acme", "c1", tokens=900, stream=False, end_user="cy")).allowed
    # Without the header, only the tenant's levels apply.
    assert (await quota.reserve("acme", "n1", tokens=900, stream=False)).allowed


async def test_a_hundred_thousand_end_users_keep_the_memory_store_bounded() -> None:
    clock, wall = FakeClock(1000.0), FakeClock(berlin(2026, 11, 28, 10, 0))
    store = MemoryStore(clock=clock, lease_ttl=60, settled_ttl=60)
    owners = Owners(team(end_user=EndUser(header="X-End-User", limits=limits(rpm=10))))
    quota = QuotaService(
        store, owners=owners, clock=clock, lease_ttl=60, calendar=Calendar("Europe/Berlin", wall)
    )
    most = 0
    for i in range(100_000):
        await quota.reserve("acme", f"r{i}", tokens=0, stream=False, end_user=f"user-{i}")
        clock.advance(0.001)  # 1,000 requests a second: 6 s for a bucket to refill
        if i % 1000 == 0:
            most = max(most, store.buckets_held)
    # About 6,000 buckets are not full at any time; held: a small multiple of that.
    assert 6000 <= most < 20_000
    await quota.aclose()


def keys_without_expiry(server: RedisServer) -> list[str]:
    with redis.Redis(port=server.port, decode_responses=True) as admin:
        return [key for key in admin.scan_iter("*") if admin.pttl(key) < 0]


async def test_end_user_keys_on_redis_expire(redis_server: RedisServer) -> None:  # noqa: F811
    command(redis_server.port, "FLUSHALL")
    async with AsyncExitStack() as stack:
        harness = Harness("redis", stack, server=redis_server, zone="Europe/Berlin")
        end_users = EndUser(
            header="X-End-User", limits=limits(rpm=10), budget=Budget(tokens=Amount(per_day=50))
        )
        quota = await harness.open_for(team(end_user=end_users))
        for batch in range(4):
            await asyncio.gather(
                *(
                    quota.reserve("acme", f"r{i}", tokens=10, stream=False, end_user=f"u{i}")
                    for i in range(batch * 500, (batch + 1) * 500)
                )
            )
    with redis.Redis(port=redis_server.port, decode_responses=True) as admin:
        held = list(admin.scan_iter("tg:{acme}:e:*"))
        assert len(held) == 2 * 2000  # a minute bucket and a day budget per end user
        assert all(0 < admin.pttl(key) <= 86_400_000 for key in held)
        assert not any("u1" in key for key in held)  # stored as a digest, never the value


# --- the ledger ---------------------------------------------------------------------------


async def test_the_ledger_counts_what_was_charged_by_day_key_and_agent(harness: Harness) -> None:
    harness.wall.now = berlin(2026, 11, 27, 23, 0)
    tenants = team(keys=(service("billing"), service("reports")))
    quota = await harness.open_for(tenants)

    reported = await quota.reserve("acme", "r1", tokens=100, stream=False, key="billing")
    await quota.settle(reported, 300, Charge("billing", "support", 100, 200, 0))
    estimated = await quota.reserve("acme", "r2", tokens=100, stream=False, key="billing")
    await quota.settle(estimated, 40, Charge("billing", "support", tokens_estimated=40))
    never_sent = await quota.reserve("acme", "r3", tokens=100, stream=False, key="reports")
    await quota.refund(never_sent)
    harness.wall.now = berlin(2026, 11, 28, 0, 30)  # past midnight in Berlin: the next day
    late = await quota.reserve("acme", "r4", tokens=100, stream=False, key="reports")
    await quota.settle(late, 7, Charge("reports", "sales", 3, 4, 0))
    await quota.settle(late, 7, Charge("reports", "sales", 3, 4, 0))  # a duplicate: no-op

    rows = sorted(await quota.ledger("2026-11-01", "2026-11-30"), key=lambda r: r.day)
    assert rows == [
        UsageRow("2026-11-27", "acme", "billing", "support", 2, 100, 200, 340, 40),
        UsageRow("2026-11-28", "acme", "reports", "sales", 1, 3, 4, 7, 0),
    ]
    assert await quota.ledger("2026-11-28", "2026-11-28") == rows[1:]


async def test_the_redis_ledger_survives_a_restart_of_the_gateway(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    command(redis_server.port, "FLUSHALL")
    tenants = team(keys=(service("billing"),))
    async with AsyncExitStack() as stack:
        harness = Harness("redis", stack, server=redis_server, zone="Europe/Berlin")
        harness.wall.now = berlin(2026, 11, 28, 10, 0)
        quota = await harness.open_for(tenants)
        reservation = await quota.reserve("acme", "r1", tokens=10, stream=False, key="billing")
        await quota.settle(reservation, 12, Charge("billing", "support", 5, 7, 0))
    async with AsyncExitStack() as stack:
        harness = Harness("redis", stack, server=redis_server, zone="Europe/Berlin")
        again = await harness.open_for(tenants)
        assert await again.ledger("2026-11-28", "2026-11-28") == [
            UsageRow("2026-11-28", "acme", "billing", "support", 1, 5, 7, 12, 0)
        ]


async def test_a_keys_stream_cap_holds_inside_its_tenants_and_frees_on_release(
    harness: Harness,
) -> None:
    tenants = team(
        tenant_limits=limits(streams=3),
        keys=(service("billing", limits=limits(streams=1)), service("reports")),
    )
    quota = await harness.open_for(tenants)
    first = await quota.reserve("acme", "b1", tokens=0, stream=True, key="billing")
    assert first.allowed and first.stream_lease is not None
    refused = await quota.reserve("acme", "b2", tokens=0, stream=True, key="billing")
    assert refused.rejected_by == "key billing: concurrent streams"
    usage = await quota.usage("acme", "billing")
    assert usage["streams"] == [
        {"name": "concurrent streams", "limit": 3, "active": 1},
        {"name": "key billing: concurrent streams", "limit": 1, "active": 1},
    ]
    others = [
        await quota.reserve("acme", f"r{i}", tokens=0, stream=True, key="reports") for i in range(3)
    ]
    assert [r.allowed for r in others] == [True, True, False]  # the tenant's 3, one is billing's
    await quota.release_stream(first)
    assert (await quota.reserve("acme", "r4", tokens=0, stream=True, key="reports")).allowed
    assert (await quota.reserve("acme", "b3", tokens=0, stream=False, key="billing")).allowed


@pytest.mark.timeout(120)
async def test_budgets_and_the_ledger_on_a_cluster(cluster: RedisClusterServers) -> None:  # noqa: F811
    """Every level's keys and the ledger's day share the tenant's slot (one script call), and
    the report finds every tenant's days on whichever master holds them."""
    config = Quota(
        backend="redis",
        redis_url=tuple(Secret(url) for url in cluster.urls),
        on_backend_error="closed",
        timeout_ms=2000,
        timezone="Europe/Berlin",
    )
    wall = FakeClock(berlin(2026, 11, 28, 10, 0))
    tenants = {
        **team(Budget(requests=Amount(per_day=3)), keys=(service("billing"),)),
        **team(Budget(requests=Amount(per_day=3)), keys=(service("web"),), name="globex"),
    }
    names = [f"t{i}" for i in range(8)]  # spread over the masters
    for name in names:
        tenants |= team(keys=(service("svc"),), name=name)
    async with open_quota(config, Owners(tenants), lease_ttl=60, wall_clock=wall) as quota:
        for tenant, key in [("acme", "billing"), ("globex", "web"), *((n, "svc") for n in names)]:
            reservation = await quota.reserve(tenant, "r1", tokens=5, stream=False, key=key)
            assert reservation.allowed and reservation.backend == "redis"
            await quota.settle(reservation, 5, Charge(key, "support", 2, 3, 0))
        results = [
            await quota.reserve("acme", f"a{i}", tokens=0, stream=False, key="billing")
            for i in range(3)
        ]
        assert [r.allowed for r in results] == [True, True, False]
        rows = await quota.ledger("2026-11-28", "2026-11-28")
    assert sorted((r.tenant, r.key, r.tokens_total) for r in rows) == sorted(
        [("acme", "billing", 5), ("globex", "web", 5), *((n, "svc", 5) for n in names)]
    )


async def test_requests_the_local_fallback_admitted_reach_the_redis_ledger(
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """The ledger drops no row: a request admitted and settled on the local fallback while
    Redis was down is written to Redis's ledger once it answers again, once."""
    config = Quota(
        backend="redis",
        redis_url=(Secret(own_redis.url),),
        on_backend_error="local",
        # Generous: a dead Redis refuses at once; a busy machine must not pass for one.
        timeout_ms=2000,
        timezone="Europe/Berlin",
    )
    wall = FakeClock(berlin(2026, 11, 28, 10, 0))
    tenants = team(Budget(requests=Amount(per_day=100)), keys=(service("billing"),))
    async with open_quota(config, Owners(tenants), lease_ttl=60, wall_clock=wall) as quota:
        # Seen on Redis first: the fallback starts where Redis left the tenant, not empty.
        assert (await quota.reserve("acme", "r0", tokens=0, stream=False)).backend == "redis"
        own_redis.kill()
        reservation = await quota.reserve("acme", "r1", tokens=10, stream=False, key="billing")
        assert reservation.allowed and reservation.backend == "local"
        await quota.settle(reservation, 42, Charge("billing", "support", 20, 22, 0))
        assert quota.owed == 1
        own_redis.restart()
        await until(lambda: quota.owed == 0, within=COOLDOWN + 2)
        assert await quota.ledger("2026-11-28", "2026-11-28") == [
            UsageRow("2026-11-28", "acme", "billing", "support", 1, 20, 22, 42, 0)
        ]


def on_fallback(
    server: RedisServer, tenants: Mapping[str, Tenant], clock: FakeClock, wall: FakeClock
) -> AbstractAsyncContextManager[QuotaService]:
    """A service on `server` with the `local` fallback (fallback_config), whose breaker opens
    at the first failure, on the test's clocks."""
    return open_quota(
        fallback_config(server),
        Owners(tenants),
        clock=clock,
        wall_clock=wall,
        lease_ttl=60,
        breaker_threshold=1,
    )


def fallback_config(server: RedisServer) -> Quota:
    """`local` on three replicas: this one's share of every limit is a third (rounded up)."""
    return Quota(
        backend="redis",
        redis_url=(Secret(server.url),),
        on_backend_error="local",
        timeout_ms=2000,  # generous: a dead Redis refuses at once, a busy machine is not one
        timezone="Europe/Berlin",
        expected_replicas=3,
    )


async def test_the_fallback_starts_every_key_where_redis_left_it_not_only_the_last_callers(
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """Finding: the fallback was seeded once per tenant, from the plan of the tenant's last
    request on Redis (its own key's buckets only): a key that had spent its own limit or its
    budget on Redis found full buckets in the fallback, a fresh share on every replica. The
    injected clock stands still: no bucket refills and the breaker, once open, stays open."""
    clock, wall = FakeClock(1_000.0), FakeClock(berlin(2026, 11, 28, 10, 0))
    per_minute = limits(rpm=3)
    tenants = team(
        tenant_limits=limits(rpd=1000),
        keys=(
            service("app"),
            service("batch", limits=per_minute),
            service("reports", Budget(requests=Amount(per_month=3))),
            service("cron", limits=per_minute),
        ),
    )
    async with on_fallback(own_redis, tenants, clock, wall) as quota:

        async def reserve(key: str, request_id: str) -> tuple[str, bool, str | None]:
            r = await quota.reserve("acme", request_id, tokens=0, stream=False, key=key)
            return r.backend, r.allowed, r.rejected_by

        # On Redis: batch spends its own limit per minute, reports its monthly budget, and app
        # comes last, so the tenant's last plan on Redis holds neither's buckets.
        for i in range(3):
            assert await reserve("batch", f"b{i}") == ("redis", True, None)
            assert await reserve("reports", f"r{i}") == ("redis", True, None)
        refused = ("redis", False, "key batch: requests per minute")
        assert await reserve("batch", "b3") == refused
        assert await reserve("app", "a0") == ("redis", True, None)

        own_redis.kill()
        # The tenant's first request on the fallback (its tenant-level buckets seeded).
        assert await reserve("app", "a1") == ("local", True, None)
        # A third of nothing left on Redis is nothing here either: refused at the key level.
        assert await reserve("batch", "b4") == ("local", False, "key batch: requests per minute")
        assert await reserve("reports", "r3") == ("local", False, "key reports: requests per month")
        # cron was never seen on Redis by this replica: its bucket starts empty, as every
        # bucket Redis never reported (full buckets would admit a whole limit more, on each
        # replica), however late in the outage it first comes.
        assert await reserve("cron", "c0") == ("local", False, "key cron: requests per minute")
        # Refill goes on in the fallback: a minute gives cron its share (1 of 3).
        clock.advance(60)
        assert await reserve("cron", "c1") == ("local", True, None)
        assert await reserve("cron", "c2") == ("local", False, "key cron: requests per minute")


async def test_the_fallback_starts_every_end_user_where_redis_left_them(
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """The same finding one level down: an end user's buckets are in the plan of that end
    user's requests only."""
    clock, wall = FakeClock(1_000.0), FakeClock(berlin(2026, 11, 28, 10, 0))
    end_users = EndUser(
        header="X-End-User", limits=limits(rpm=30), budget=Budget(requests=Amount(per_day=6))
    )
    tenants = team(keys=(service("app"),), end_user=end_users)
    async with on_fallback(own_redis, tenants, clock, wall) as quota:

        async def reserve(who: str, request_id: str) -> tuple[str, bool, str | None]:
            r = await quota.reserve(
                "acme", request_id, tokens=0, stream=False, key="app", end_user=who
            )
            return r.backend, r.allowed, r.rejected_by

        for i in range(6):
            assert await reserve("alice", f"a{i}") == ("redis", True, None)
        assert await reserve("bob", "b0") == ("redis", True, None)

        own_redis.kill()
        assert await reserve("bob", "b1") == ("local", True, None)  # 5 left: 1.67 here
        spent = ("local", False, "end user: requests per calendar day")
        assert await reserve("alice", "a6") == spent  # her day's budget went on Redis
        assert await reserve("carol", "c0") == spent  # never seen here: empty


async def test_the_fallback_counts_the_streams_this_replica_holds_for_every_key(
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """The same finding for stream leases: the fallback took over the leases of the lease sets
    in the tenant's first plan only, so a key's own set started empty whatever this replica
    held in it."""
    clock, wall = FakeClock(1_000.0), FakeClock(berlin(2026, 11, 28, 10, 0))
    tenants = team(
        tenant_limits=limits(streams=30),
        keys=(service("app"), service("batch", limits=limits(streams=3))),
    )
    async with on_fallback(own_redis, tenants, clock, wall) as quota:
        held = await quota.reserve("acme", "b0", tokens=0, stream=True, key="batch")
        assert (held.backend, held.allowed) == ("redis", True)
        assert (await quota.reserve("acme", "a0", tokens=0, stream=False, key="app")).allowed

        own_redis.kill()
        first = await quota.reserve("acme", "a1", tokens=0, stream=True, key="app")
        assert (first.backend, first.allowed) == ("local", True)
        # batch's share is one stream, and this replica holds one for it on Redis.
        refused = await quota.reserve("acme", "b1", tokens=0, stream=True, key="batch")
        assert (refused.backend, refused.allowed, refused.rejected_by) == (
            "local",
            False,
            "key batch: concurrent streams",
        )
        await quota.release_stream(held)
        again = await quota.reserve("acme", "b2", tokens=0, stream=True, key="batch")
        assert (again.backend, again.allowed) == ("local", True)
        for reservation in (first, again):
            await quota.release_stream(reservation)


async def test_the_fallback_starts_a_token_budget_from_what_redis_settled_not_reserved(
    own_redis: RedisServer,  # noqa: F811
) -> None:
    """A settle moves token buckets past what the reservation left (the estimate was 1, the
    answer took the whole budget): the fallback must start from the level after the settle."""
    clock, wall = FakeClock(1_000.0), FakeClock(berlin(2026, 11, 28, 10, 0))
    tenants = team(
        keys=(service("app"), service("batch", Budget(tokens=Amount(per_month=30)))),
        tenant_limits=limits(rpd=1000),
    )
    async with on_fallback(own_redis, tenants, clock, wall) as quota:
        spent = await quota.reserve("acme", "b0", tokens=1, stream=False, key="batch")
        assert (spent.backend, spent.allowed) == ("redis", True)
        await quota.settle(spent, 30)
        assert quota.owed == 0
        assert (await quota.reserve("acme", "a0", tokens=0, stream=False, key="app")).allowed

        own_redis.kill()
        assert (await quota.reserve("acme", "a1", tokens=0, stream=False, key="app")).allowed
        refused = await quota.reserve("acme", "b1", tokens=1, stream=False, key="batch")
        assert (refused.backend, refused.allowed, refused.rejected_by) == (
            "local",
            False,
            "key batch: tokens per month",
        )
