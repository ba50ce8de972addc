"""Quotas as callers meet them: headers, 429s, token debt, abandoned streams, stream leases."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth import hash_key
from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.sessions import new_session_id
from gateway.simulator import AgentConfig, RateLimitConfig, SimulatorConfig, create_simulator_app
from gateway.simulator.config import UsageFormat
from gateway.state import DRAINS, METRICS
from tests.conftest import (
    ACME,
    ACME_KEY,
    PLATFORM_KEY,
    SUPPORT_KEY,
    AiohttpClient,
    FakeClock,
    gateway_yaml,
    sse_events,
)

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


async def make_limited(make_gateway: Any, yaml_limits: str, **kwargs: Any) -> Client:
    url = kwargs.pop("url")
    text = gateway_yaml(url).replace(
        "    agents: [ag_support]\n",
        f"    agents: [ag_support]\n    limits: {yaml_limits}\n",
        1,
    )
    gateway: Client = await make_gateway(config=parse_config(text), **kwargs)
    return gateway


async def tokens_reported(simulator: Sim, body: dict[str, Any], *, tenant: str = "acme") -> int:
    """What upstream charges for this in a fresh session (the simulator is deterministic)."""
    direct = await simulator.post(
        CHAT,
        # The reply quotes its session id: use one as long as the gateway's namespaced ids.
        json={**body, "stream": False, "session_id": f"gw:{tenant}:{new_session_id()}"},
        headers={"Authorization": f"Bearer {SUPPORT_KEY}"},
    )
    total: int = (await direct.json())["usage"]["total_tokens"]
    return total


async def usage_of(gateway: Client) -> dict[str, Any]:
    response = await gateway.get("/v1/usage", headers=ACME)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def test_every_response_to_a_known_caller_carries_its_own_limits(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    gateway = await make_limited(make_gateway, "{requests: {per_minute: 5}}", url=simulator_url)
    first = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    invalid = await gateway.post(CHAT, json={"message": ""}, headers=ACME)
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 500, "times": 1})
    failed = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    streamed = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
    usage = await gateway.get("/v1/usage", headers=ACME)
    assert [first.status, invalid.status, failed.status, streamed.status] == [200, 400, 500, 200]
    assert first.headers["X-RateLimit-Limit"] == "5"
    assert first.headers["X-RateLimit-Remaining"] == "4"
    # A request refused before admission (400) costs nothing, and still says where it stands;
    # an upstream failure costs a request.
    assert invalid.headers["X-RateLimit-Remaining"] == "4"
    assert failed.headers["X-RateLimit-Remaining"] == "3"
    assert streamed.headers["X-RateLimit-Remaining"] == "2"
    assert usage.headers["X-RateLimit-Remaining"] == "2"
    assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert first.headers["RateLimit-Policy"] == '"requests";q=5;w=60'
    assert first.headers["RateLimit"].startswith('"requests";r=4;t=')


async def test_over_the_limit_is_429_naming_the_limit_with_retry_after(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    gateway = await make_limited(make_gateway, "{requests: {per_minute: 2}}", url=simulator_url)
    for _ in range(2):
        assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
    refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "rate_limited"
    assert "requests per minute" in body["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert len(await (await simulator.get("/_sim/requests")).json()) == 2


async def test_token_debt_blocks_until_refilled(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    clock = FakeClock()
    gateway = await make_limited(
        make_gateway,
        "{tokens: {per_minute: 4000, reserve: 10}}",
        url=simulator_url,
        clock=clock,
    )
    big = {"message": "x" * 20_000, "stream": True}
    cost = await tokens_reported(simulator, big)
    assert cost > 5000
    response = await gateway.post(CHAT, json=big, headers=ACME)
    assert response.status == 200
    await response.read()

    refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert refused.status == 429
    assert "tokens per minute" in (await refused.json())["error"]["message"]
    debt = cost - 4000
    # Refill is 4000/60 tokens per second; it must pay the debt and the next reservation (11).
    expected = (debt + 11) / (4000 / 60)
    assert abs(int(refused.headers["Retry-After"]) - expected) <= 1.5

    clock.now += expected + 1
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200


async def test_usage_reports_buckets_and_tokens_today(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    gateway = await make_limited(
        make_gateway,
        "{requests: {per_minute: 10, per_day: 100}, tokens: {per_day: 100000}}",
        url=simulator_url,
    )
    cost = await tokens_reported(simulator, {"message": "Hello there"})
    await gateway.post(CHAT, json={"message": "Hello there"}, headers=ACME)
    usage = await usage_of(gateway)
    assert usage["tenant"] == "acme"
    assert usage["tokens_today"] == cost
    buckets = {b["name"]: b for b in usage["buckets"]}
    assert buckets["requests per minute"]["limit"] == 10
    assert buckets["requests per minute"]["remaining"] == 9
    assert buckets["tokens per day"]["remaining"] == 100000 - cost
    assert (await gateway.get("/v1/usage")).status == 401


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("usage_format", ["documented", "tokens_used", "usage"])
async def test_tokens_are_charged_in_whichever_shape_upstream_reports_them(
    make_gateway: Any, aiohttp_client: AiohttpClient, usage_format: UsageFormat, stream: bool
) -> None:
    # The two documents disagree: a JSON answer's `usage` object (API reference) or its bare
    # `tokens_used` (deployment guide); a `done` event's `tokens_used` (the guide, the only
    # one to document streams) or, undocumented, a `usage` object.
    simulator = await aiohttp_client(
        create_simulator_app(
            SimulatorConfig(
                agents={
                    "ag_support": AgentConfig(
                        name="Support", keys=(SUPPORT_KEY,), usage_format=usage_format
                    ),
                    "ag_sales": AgentConfig(name="Sales"),
                },
                platform_keys=(PLATFORM_KEY,),
                rate_limit=RateLimitConfig(per_minute=1000, per_day=100_000),
            )
        )
    )
    url = str(simulator.make_url("")).rstrip("/")
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=url)
    body = {"message": "What are your business hours?", "session_id": "s1", "stream": stream}
    response = await gateway.post(CHAT, json=body, headers=ACME)
    assert response.status == 200
    answer = sse_events(await response.read())[-1] if stream else await response.json()
    assert answer["session_id"] == "s1"  # translated back, whichever shape carries usage
    [sent] = await (await simulator.get("/_sim/requests")).json()
    assert (await usage_of(gateway))["tokens_today"] == sent["usage"]["total_tokens"] > 0


async def test_a_caller_that_hangs_up_mid_stream_is_still_charged_exactly(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=simulator_url)
    body = {"message": "Tell me everything about your products", "stream": True}
    cost = await tokens_reported(simulator, body)
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "after_events": 1})
    response = await gateway.post(CHAT, json=body, headers=ACME)
    await response.content.readuntil(b"\n\n")
    response.close()  # the caller leaves before the done event
    await simulator.post("/_sim/release")

    async with asyncio.timeout(5):
        await gateway.app[DRAINS].wait_finished(1)
    assert (await usage_of(gateway))["tokens_today"] == cost


async def test_a_line_per_event_stream_is_charged_exactly_what_upstream_reported(
    make_gateway: Any, lines_simulator: Sim
) -> None:
    # Upstream streaming as the deployment guide prints it: no blank line between events.
    url = str(lines_simulator.make_url("")).rstrip("/")
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=url)
    body = {"message": "Tell me everything about your products", "session_id": "s1"}
    response = await gateway.post(CHAT, json={**body, "stream": True}, headers=ACME)
    events = sse_events(await response.read())
    [sent] = await (await lines_simulator.get("/_sim/requests")).json()
    done = [event for event in events if event["type"] == "done"]
    # The stream ends with upstream's done event (no error event of ours), its session id
    # translated back, and exactly its tokens charged.
    assert (
        events[-1]["type"],
        [event["session_id"] for event in done],
        (await usage_of(gateway))["tokens_today"],
    ) == ("done", ["s1"], sent["usage"]["total_tokens"])


async def test_a_line_per_event_stream_whose_caller_left_is_drained_and_charged_exactly(
    make_gateway: Any, lines_simulator: Sim
) -> None:
    url = str(lines_simulator.make_url("")).rstrip("/")
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=url)
    await lines_simulator.post("/_sim/faults", json={"kind": "hold_stream", "after_events": 1})
    body = {"message": "Tell me everything about your products", "stream": True}
    response = await gateway.post(CHAT, json=body, headers=ACME)
    async with asyncio.timeout(5):  # the first event comes while upstream holds the rest
        first = await response.content.readuntil(b"\n\n")
    assert sse_events(first)[0]["type"] == "content"
    response.close()  # the caller leaves before the done event: a drain reads to it
    await lines_simulator.post("/_sim/release")
    async with asyncio.timeout(5):
        await gateway.app[DRAINS].wait_finished(1)
    [sent] = await (await lines_simulator.get("/_sim/requests")).json()
    assert (await usage_of(gateway))["tokens_today"] == sent["usage"]["total_tokens"] > 0


async def test_stream_leases_are_released_however_a_stream_ends(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    gateway = await make_limited(make_gateway, "{max_concurrent_streams: 1}", url=simulator_url)
    stream = {"message": "Hi", "stream": True}

    # While one stream is open, a second is refused.
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
    held = await gateway.post(CHAT, json=stream, headers=ACME)
    await held.content.readuntil(b"\n\n")
    refused = await gateway.post(CHAT, json=stream, headers=ACME)
    assert refused.status == 429
    assert "concurrent streams" in (await refused.json())["error"]["message"]
    await simulator.post("/_sim/release")
    await held.read()

    async def admitted() -> bool:
        response = await gateway.post(CHAT, json=stream, headers=ACME)
        await response.read()
        return response.status == 200

    assert await admitted(), "lease kept after a normal end"

    await simulator.post("/_sim/faults", json={"kind": "drop_mid_stream", "times": 1})
    await (await gateway.post(CHAT, json=stream, headers=ACME)).read()
    assert await admitted(), "lease kept after upstream dropped"

    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
    gone = await gateway.post(CHAT, json=stream, headers=ACME)
    await gone.content.readuntil(b"\n\n")
    gone.close()
    await simulator.post("/_sim/release")
    async with asyncio.timeout(5):
        await gateway.app[DRAINS].wait_finished(1)
    assert await admitted(), "lease kept after the caller hung up"


async def test_json_requests_need_no_stream_lease(make_gateway: Any, simulator_url: str) -> None:
    gateway = await make_limited(make_gateway, "{max_concurrent_streams: 1}", url=simulator_url)
    results = await asyncio.gather(
        *(gateway.post(CHAT, json={"message": "Hi"}, headers=ACME) for _ in range(5))
    )
    assert [r.status for r in results] == [200] * 5


async def test_tokens_charged_equal_tokens_reported_over_a_mix_of_streams(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    """Completed, abandoned and upstream-dropped streams: every reported token is charged;
    only a stream upstream never finished is charged by estimate (its input and text / 4)."""
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 10000000}}", url=simulator_url)
    rng = random.Random(7)
    expected = drains = 0
    kinds = [rng.choice(["completed", "abandoned", "dropped"]) for _ in range(24)]
    assert min(kinds.count(k) for k in ("completed", "abandoned", "dropped")) >= 4
    for i, kind in enumerate(kinds):
        message = f"Question {i}: " + "tell me more " * rng.randint(1, 40)
        body = {"message": message, "stream": True}
        if kind == "completed":
            expected += await tokens_reported(simulator, body)
            response = await gateway.post(CHAT, json=body, headers=ACME)
            assert sse_events(await response.read())[-1]["type"] == "done"
        elif kind == "abandoned":
            expected += await tokens_reported(simulator, body)
            await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
            response = await gateway.post(CHAT, json=body, headers=ACME)
            await response.content.readuntil(b"\n\n")
            response.close()
            await simulator.post("/_sim/release")
            drains += 1
            async with asyncio.timeout(5):
                await gateway.app[DRAINS].wait_finished(drains)
        else:
            await simulator.post(
                "/_sim/faults", json={"kind": "drop_mid_stream", "after_events": 2, "times": 1}
            )
            response = await gateway.post(CHAT, json=body, headers=ACME)
            received = sse_events(await response.read())
            assert received[-1]["type"] == "error"
            text = "".join(e["content"] for e in received if e["type"] == "content")
            # Estimated, never below the request's own input: message / 4 + text seen / 4.
            expected += math.ceil(len(message) / 4) + math.ceil(len(text) / 4)
    assert (await usage_of(gateway))["tokens_today"] == expected


async def test_a_keys_own_limit_applies_inside_its_tenants_and_names_its_level(
    make_gateway: Any, simulator_url: str
) -> None:
    """Levels: billing-service may make 2 requests a minute, its tenant 3, a second key only
    the tenant's; a refusal names the level, and every level shows in /v1/usage."""
    second = "gw_test_acme_reports_0003"
    text = gateway_yaml(simulator_url).replace(
        f"    keys: [{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}]\n",
        "    keys:\n"
        f"      - {{name: billing-service, sha256: {hash_key(ACME_KEY)},"
        " limits: {requests: {per_minute: 2}}}\n"
        f"      - {{name: reports, sha256: {hash_key(second)}}}\n"
        "    limits: {requests: {per_minute: 3}}\n",
        1,
    )
    gateway: Client = await make_gateway(config=parse_config(text))
    reports = {"Authorization": f"Bearer {second}"}
    first = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert first.status == 200
    # The tightest level is the caller's: 1 left for billing-service (2 for the tenant).
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
    refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert refused.status == 429
    message = (await refused.json())["error"]["message"]
    assert message.startswith("rate limit exceeded: key billing-service: requests per minute;")
    # The other service still has the tenant's last request, then the tenant is spent.
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=reports)).status == 200
    spent = await gateway.post(CHAT, json={"message": "Hi"}, headers=reports)
    assert spent.status == 429
    assert "exceeded: requests per minute;" in (await spent.json())["error"]["message"]

    usage = await usage_of(gateway)
    assert {b["name"]: b["remaining"] for b in usage["buckets"]} == {
        "requests per minute": 0,
        "key billing-service: requests per minute": 0,
    }
    assert "gateway_quota_rejections_total" in gateway.app[METRICS].exposition().decode()
    assert b'limit="key_requests_per_minute"' in gateway.app[METRICS].exposition()


def test_a_keys_limits_refuse_what_belongs_to_the_tenant() -> None:
    for extra, problem in (
        ("tokens: {reserve: 10}", "limits.tokens.reserve: the reserve is the tenant's"),
        ("requests: {per_hour: 2}", "limits.requests.per_hour: unknown key"),
    ):
        text = gateway_yaml("http://127.0.0.1:9").replace(
            f"{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}",
            f"{{name: billing-service, sha256: {hash_key(ACME_KEY)}, limits: {{{extra}}}}}",
            1,
        )
        with pytest.raises(ConfigError, match=re.escape(f"tenants.acme.keys[0].{problem}")):
            parse_config(text)
    end_user_streams = gateway_yaml("http://127.0.0.1:9").replace(
        "    agents: [ag_support]\n",
        "    agents: [ag_support]\n"
        "    end_user: {header: X-End-User, limits: {max_concurrent_streams: 1}}\n",
        1,
    )
    with pytest.raises(
        ConfigError, match=re.escape("end_user.limits.max_concurrent_streams: streams are")
    ):
        parse_config(end_user_streams)


async def test_end_users_and_budgets_as_a_service_meets_them(
    make_gateway: Any, simulator_url: str
) -> None:
    """An end user (named by the header the service sets) has a limit of its own; a key's
    monthly budget is named in its refusal; /v1/usage shows the caller's budgets; the end
    user's id is a bucket id only: never in a response, a header or a metric."""
    text = gateway_yaml(simulator_url).replace(
        f"    keys: [{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}]\n",
        "    keys:\n"
        f"      - {{name: billing-service, sha256: {hash_key(ACME_KEY)},"
        " budget: {requests: {per_month: 2}}}\n"
        "    budget: {tokens: {per_day: 100000}}\n"
        "    end_user: {header: X-End-User, limits: {requests: {per_minute: 1}}}\n",
        1,
    )
    gateway: Client = await make_gateway(config=parse_config(text))
    ann = {**ACME, "X-End-User": "sk-live-0123456789abcdef0123456789abcdef"}
    bob = {**ACME, "X-End-User": "bob@example.com"}
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ann)).status == 200
    refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ann)
    assert refused.status == 429
    body = await refused.text()
    assert "rate limit exceeded: end user: requests per minute;" in body
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=bob)).status == 200
    spent = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert spent.status == 429
    assert "exceeded: key billing-service: requests per month; retry in" in await spent.text()

    usage = await (await gateway.get("/v1/usage", headers=ann)).json()
    budgets = {b["name"]: (b["used"], b["limit"]) for b in usage["budgets"]}
    assert budgets["key billing-service: requests per month"] == (2, 2)
    assert budgets["tokens per calendar day"][1] == 100_000
    assert 0 < budgets["tokens per calendar day"][0] < 100_000
    too_long = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "X-End-User": "x" * 300}
    )
    assert too_long.status == 400
    assert "X-End-User header is longer than 256" in await too_long.text()
    exposition = gateway.app[METRICS].exposition().decode()
    assert 'gateway_budget_used_ratio{budget="requests_per_month",key="billing-service",' in (
        exposition
    )
    for secretish in ("sk-live-0123456789abcdef", "bob@example.com"):
        assert secretish not in exposition
        assert secretish not in json.dumps(usage)
