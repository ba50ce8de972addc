"""Upstream's own per-key rate limit, kept by the gateway so upstream never has to 429 us."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_config
from gateway.errors import RateLimited
from gateway.logs import AccessRecord
from gateway.quota import Reservation
from gateway.state import LIMITER, QUOTA
from gateway.upstream import Deadline
from tests.conftest import ACME, GLOBEX, gateway_yaml
from tests.redis_servers import RedisServer

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]


def limited(url: str, rate_limits: str, extra: str = "", support: str = "") -> str:
    """`rate_limits` for every upstream key; `support` overrides ag_support's own key."""
    text = gateway_yaml(url, extra).replace(
        "  timeouts:", f"  rate_limits: {rate_limits}\n  timeouts:", 1
    )
    if support:
        text = text.replace(
            '  ag_support: {api_key: "${TEST_SUPPORT_KEY}"}',
            f'  ag_support: {{api_key: "${{TEST_SUPPORT_KEY}}", rate_limits: {support}}}',
            1,
        )
    return text


async def statuses(gateway: Client, agent: str, headers: dict[str, str], count: int) -> list[int]:
    result = []
    for _ in range(count):
        response = await gateway.post(
            f"/v1/agents/{agent}/chat", json={"message": "Hi"}, headers=headers
        )
        await response.read()
        result.append(response.status)
    return result


async def upstream_requests(simulator: Sim) -> int:
    count: int = len(await (await simulator.get("/_sim/requests")).json())
    return count


async def test_each_upstream_key_has_its_own_bucket_and_the_gateway_refuses_past_it(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    gateway: Client = await make_gateway(
        config=parse_config(
            limited(simulator_url, "{per_day: 2, max_wait: 0}", support="{per_day: 3}")
        )
    )
    # globex's agent goes out with the platform key: two a day for everyone on that key.
    assert await statuses(gateway, "ag_sales", GLOBEX, 3) == [200, 200, 429]
    # acme's agent has its own key and its own, larger, limit.
    assert await statuses(gateway, "ag_support", ACME, 4) == [200, 200, 200, 429]
    assert await upstream_requests(simulator) == 5  # the refused ones never left

    refused = await gateway.post("/v1/agents/ag_sales/chat", json={"message": "Hi"}, headers=GLOBEX)
    body = await refused.json()
    assert body["error"]["code"] == "rate_limited"
    assert "upstream requests per day" in body["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1


async def test_a_request_waits_for_a_slot_within_max_wait(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    # 60 a minute with no burst: one slot a second.
    gateway: Client = await make_gateway(
        config=parse_config(limited(simulator_url, "{per_minute: 60, burst: 1, max_wait: 3}"))
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await statuses(gateway, "ag_sales", GLOBEX, 2) == [200, 200]
    assert loop.time() - started >= 0.9, "the second request went out without a slot"
    assert await upstream_requests(simulator) == 2


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


async def test_two_replicas_share_the_upstream_keys_bucket_through_redis(
    make_gateway: Any, simulator: Sim, simulator_url: str, redis: RedisServer
) -> None:
    text = limited(
        simulator_url,
        "{per_day: 5, max_wait: 0}",
        extra=f"quota: {{backend: redis, redis_url: {redis.url}, timeout_ms: 2000}}\n",
    )
    replicas: list[Client] = [await make_gateway(config=parse_config(text)) for _ in range(2)]

    async def one(i: int) -> int:
        response = await replicas[i % 2].post(
            "/v1/agents/ag_sales/chat", json={"message": f"Hi {i}"}, headers=GLOBEX
        )
        await response.read()
        return response.status

    results = Counter(await asyncio.gather(*(one(i) for i in range(12))))
    assert results == {200: 5, 429: 7}
    assert await upstream_requests(simulator) == 5


async def test_an_admission_that_never_went_out_can_be_refunded(
    make_gateway: Any, simulator_url: str
) -> None:
    config = parse_config(limited(simulator_url, "{per_day: 1, max_wait: 0}"))
    gateway: Client = await make_gateway(config=config)
    limiter, quota = gateway.app[LIMITER], gateway.app[QUOTA]

    async def admit(agent: str) -> Reservation | None:
        record = AccessRecord("r1", "POST", "/v1/agents/x/chat", 0.0)
        return await limiter.admit(quota, agent, record, Deadline(config.upstream.timeouts))

    taken = await admit("ag_sales")
    assert taken is not None and taken.allowed
    assert taken.tenant == limiter.bucket_for("ag_sales")
    await quota.refund(taken)  # e.g. the upstream breaker was open: the slot comes back
    again = await admit("ag_sales")
    assert again is not None and again.allowed
    with pytest.raises(RateLimited):
        await admit("ag_sales")
    # An agent whose upstream key has no limit of its own takes nothing.
    unlimited = parse_config(gateway_yaml(simulator_url))
    other: Client = await make_gateway(config=unlimited)
    record = AccessRecord("r2", "POST", "/v1/agents/x/chat", 0.0)
    assert (
        await other.app[LIMITER].admit(
            other.app[QUOTA], "ag_sales", record, Deadline(unlimited.upstream.timeouts)
        )
        is None
    )
