"""Safe retries to upstream: only when upstream cannot have run the message, within a budget.

End to end through real servers (the simulator, a closed port, or a tiny upstream of the
test's own for what the simulator cannot do), plus the policy's decisions on their own.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Retries, parse_config
from gateway.retries import MAX_WAIT, Retry, RetryPolicy, retry_after_seconds
from tests.conftest import ACME, AiohttpClient, GatewayFactory, gateway_yaml, sse_events
from tests.redis_servers import free_port

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"
TIMEOUTS = "  timeouts: {connect: 2, first_byte: 5, idle: 5, total: 30}"
SLACK = 0.5  # seconds of scheduling slack on loaded CI machines


DEFAULT_RETRIES = "{attempts: 2, backoff: 0.01, budget: 5}"


def config_text(upstream_url: str, retries: str, timeouts: dict[str, float]) -> str:
    """The test gateway's YAML with `upstream.retries` (and any timeouts) of the test's own."""
    text = gateway_yaml(upstream_url)
    assert TIMEOUTS in text
    merged = {"connect": 2.0, "first_byte": 5.0, "idle": 5.0, "total": 30.0, **timeouts}
    new = "  timeouts: {" + ", ".join(f"{k}: {v}" for k, v in merged.items()) + "}"
    return text.replace(TIMEOUTS, f"{new}\n  retries: {retries}")


async def gateway_for(
    make_gateway: GatewayFactory,
    upstream_url: str,
    retries: str = DEFAULT_RETRIES,
    **timeouts: float,
) -> Client:
    text = config_text(upstream_url, retries, timeouts)
    return await make_gateway(config=parse_config(text, "test.yaml"))


async def add_fault(simulator: Sim, kind: str, **params: object) -> None:
    response = await simulator.post("/_sim/faults", json={"kind": kind, **params})
    assert response.status == 201, await response.text()


async def upstream_count(simulator: Sim) -> int:
    return len(await (await simulator.get("/_sim/requests")).json())


def retry_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    return [
        line
        for line in lines
        if line.get("logger") == "gateway.upstream" and line["event"] == "upstream retry"
    ]


def now() -> float:
    return asyncio.get_running_loop().time()


# --- what is retried -------------------------------------------------------------------


async def test_429_with_short_retry_after_is_retried_and_succeeds(
    make_gateway: GatewayFactory,
    simulator: Sim,
    simulator_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gateway = await gateway_for(make_gateway, simulator_url)
    await add_fault(simulator, "rate_limited", retry_after=1, times=1)
    capsys.readouterr()
    started = now()
    response = await gateway.post(
        CHAT, json={"message": "Hi"}, headers={**ACME, "X-Request-ID": "retry-req-1"}
    )
    elapsed = now() - started
    assert response.status == 200, await response.text()
    assert "response" in await response.json()
    assert elapsed >= 1.0, "upstream's Retry-After is honoured"
    sent = await (await simulator.get("/_sim/requests")).json()
    assert len(sent) == 2
    assert sent[0]["body"] == sent[1]["body"]  # the same session id, too
    assert json.loads(sent[0]["body"])["session_id"].startswith("gw:acme:")
    assert sent[0]["headers"]["X-Request-ID"] == sent[1]["headers"]["X-Request-ID"]
    [line] = retry_lines(capsys)
    assert line["level"] == "info"
    assert line["request_id"] == "retry-req-1"
    assert line["attempt"] == 2
    assert line["reason"] == "upstream_429"
    assert 1000 <= line["wait_ms"] <= MAX_WAIT * 1000


async def test_a_stream_request_is_retried_the_same_way(
    make_gateway: GatewayFactory, simulator: Sim, simulator_url: str
) -> None:
    gateway = await gateway_for(make_gateway, simulator_url)
    await add_fault(simulator, "rate_limited", retry_after=0, times=1)
    response = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert sse_events(await response.read())[-1]["type"] == "done"
    assert await upstream_count(simulator) == 2


async def _fake_upstream(
    aiohttp_client: AiohttpClient, refusals: int, status: int, retry_after: str | None
) -> tuple[str, list[str]]:
    """An upstream that refuses the first `refusals` requests, then answers 200 JSON."""
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(await request.text())
        if len(seen) <= refusals:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            body = {"error": {"code": "service_unavailable", "message": "busy"}}
            return web.json_response(body, status=status, headers=headers)
        return web.json_response({"response": "ok", "session_id": "s1", "tokens_used": 3})

    app = web.Application()
    app.router.add_post("/v1/agents/{agent_id}/chat", chat)
    client = await aiohttp_client(app)
    return str(client.make_url("")).rstrip("/"), seen


@pytest.mark.parametrize("retry_after", ["0", "http-date"])
async def test_503_with_retry_after_is_retried(
    make_gateway: GatewayFactory,
    aiohttp_client: AiohttpClient,
    capsys: pytest.CaptureFixture[str],
    retry_after: str,
) -> None:
    # The simulator's `error` fault sends no Retry-After, so this upstream is the test's own.
    if retry_after == "http-date":
        retry_after = email.utils.formatdate(usegmt=True)  # now: no wait needed
    url, seen = await _fake_upstream(aiohttp_client, 1, 503, retry_after)
    gateway = await gateway_for(make_gateway, url)
    capsys.readouterr()
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 200
    assert (await response.json())["response"] == "ok"
    assert len(seen) == 2
    assert [line["reason"] for line in retry_lines(capsys)] == ["upstream_503"]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_other_statuses_and_503_without_retry_after_are_never_retried(
    make_gateway: GatewayFactory, simulator: Sim, simulator_url: str, status: int
) -> None:
    gateway = await gateway_for(make_gateway, simulator_url)
    await add_fault(simulator, "error", status=status, times=1)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == status
    assert "error" in await response.json()
    assert await upstream_count(simulator) == 1


async def test_500_with_retry_after_is_not_retried_either(
    make_gateway: GatewayFactory, aiohttp_client: AiohttpClient
) -> None:
    url, seen = await _fake_upstream(aiohttp_client, 1, 500, "0")
    gateway = await gateway_for(make_gateway, url)
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 500
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("retry_after", "retries"),
    [
        (7, "{attempts: 2, backoff: 0.01, budget: 30}"),  # over the fixed cap
        (2, "{attempts: 2, backoff: 0.01, budget: 1}"),  # over the budget
    ],
    ids=["over-cap", "over-budget"],
)
async def test_429_with_long_retry_after_passes_straight_back(
    make_gateway: GatewayFactory,
    simulator: Sim,
    simulator_url: str,
    retry_after: int,
    retries: str,
) -> None:
    gateway = await gateway_for(make_gateway, simulator_url, retries)
    await add_fault(simulator, "rate_limited", retry_after=retry_after, times=1)
    started = now()
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert now() - started < SLACK, "no waiting for a retry that will not happen"
    assert response.status == 429
    assert response.headers["Retry-After"] == str(retry_after)
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert await upstream_count(simulator) == 1


@pytest.mark.parametrize("attempts", [0, 2])
async def test_persistent_429_is_tried_attempts_plus_one_times(
    make_gateway: GatewayFactory,
    simulator: Sim,
    simulator_url: str,
    capsys: pytest.CaptureFixture[str],
    attempts: int,
) -> None:
    retries = f"{{attempts: {attempts}, backoff: 0.01, budget: 5}}"
    gateway = await gateway_for(make_gateway, simulator_url, retries)
    await add_fault(simulator, "rate_limited", retry_after=0)
    capsys.readouterr()
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 429
    assert response.headers["Retry-After"] == "0"
    assert await upstream_count(simulator) == attempts + 1
    lines = retry_lines(capsys)
    assert [line["attempt"] for line in lines] == list(range(2, attempts + 2))
    assert all(0 <= line["wait_ms"] <= 10 * 2**i for i, line in enumerate(lines))


# --- connections and timeouts ----------------------------------------------------------


async def chat_with_nobody_listening(
    make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str], retries: str
) -> tuple[aiohttp.ClientResponse, float]:
    """One chat through a gateway whose upstream port refuses connections, and its duration."""
    gateway = await gateway_for(make_gateway, f"http://127.0.0.1:{free_port()}", retries)
    capsys.readouterr()
    started = now()
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    return response, now() - started


async def test_refused_connection_is_retried_then_502(
    make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = 2.0
    response, elapsed = await chat_with_nobody_listening(
        make_gateway, capsys, f"{{attempts: 3, backoff: 0.05, budget: {budget}}}"
    )
    assert response.status == 502
    assert (await response.json())["error"]["code"] == "upstream_unavailable"
    lines = retry_lines(capsys)
    assert [line["attempt"] for line in lines] == [2, 3, 4], "attempts + 1 tries in all"
    assert {line["reason"] for line in lines} == {"connect_error"}
    assert elapsed <= budget + SLACK


async def test_retries_stop_at_the_budget(
    make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    budget = 0.5
    response, elapsed = await chat_with_nobody_listening(
        make_gateway, capsys, f"{{attempts: 50, backoff: 0.2, budget: {budget}}}"
    )
    assert response.status == 502
    assert elapsed <= budget + SLACK
    assert len(retry_lines(capsys)) < 50
    assert sum(line["wait_ms"] for line in retry_lines(capsys)) <= budget * 1000


@pytest.mark.parametrize(
    "fault", [{"kind": "hang"}, {"kind": "slow_first_byte", "delay": 1.0}], ids=lambda f: f["kind"]
)
async def test_no_first_byte_in_time_is_never_retried(
    make_gateway: GatewayFactory, simulator: Sim, simulator_url: str, fault: dict[str, Any]
) -> None:
    gateway = await gateway_for(make_gateway, simulator_url, first_byte=0.3)
    response = await simulator.post("/_sim/faults", json=fault)
    assert response.status == 201
    response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert await upstream_count(simulator) == 1
    await simulator.post("/_sim/release")


# --- the policy on its own -------------------------------------------------------------


def policy(attempts: int = 2, backoff: float = 0.2, seed: int = 1) -> RetryPolicy:
    return RetryPolicy(Retries(attempts=attempts, backoff=backoff, budget=5), random.Random(seed))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("0", 0.0),
        (" 3 ", 3.0),
        ("1" * 20, math.inf),
        ("1.5", None),
        ("-1", None),
        ("soon", None),
        ("", None),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 40.0),  # now = 60
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),  # in the past
    ],
)
def test_retry_after_is_delta_seconds_or_an_http_date(
    value: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(value, now=60.0) == seconds


def test_jitter_is_full_and_capped_and_seedable() -> None:
    a, b = policy(seed=7), policy(seed=7)
    for retry in range(80):
        wait = a.jitter(retry)
        assert wait == b.jitter(retry)
        assert 0 <= wait <= min(MAX_WAIT, 0.2 * 2**retry)


def test_only_connection_failures_before_sending_are_retried() -> None:
    def error(cls: type[BaseException]) -> BaseException:
        return cls.__new__(cls)  # the type is all that counts

    retried: list[type[BaseException]] = [
        aiohttp.ClientConnectorError,
        aiohttp.ClientConnectorDNSError,
    ]
    never: list[type[BaseException]] = [
        aiohttp.ClientConnectorCertificateError,
        aiohttp.ClientConnectorSSLError,
        aiohttp.ServerDisconnectedError,
        aiohttp.ClientPayloadError,
        aiohttp.ClientOSError,
        aiohttp.ConnectionTimeoutError,
        aiohttp.SocketTimeoutError,
        TimeoutError,
    ]
    for cls in retried:
        decision = policy().after_error(error(cls), tries=1, remaining=5)
        assert decision is not None and decision.reason == "connect_error", cls
    for cls in never:
        assert policy().after_error(error(cls), tries=1, remaining=5) is None, cls
    assert policy().after_error(None, tries=1, remaining=5) is None


def test_response_decisions() -> None:
    p = policy(attempts=2, backoff=0.01)

    def decide(status: int, retry_after: str | None, tries: int = 1, left: float = 5) -> Any:
        return p.after_response(status, retry_after, tries=tries, remaining=left, now=0.0)

    assert decide(429, "2") == Retry("upstream_429", 2.0)  # max(Retry-After, jitter)
    assert decide(503, "1") == Retry("upstream_503", 1.0)
    assert decide(429, None) is None
    assert decide(503, "tomorrow") is None
    assert decide(429, str(int(MAX_WAIT) + 1)) is None
    assert decide(429, "3", left=2.5) is None
    for status in (400, 401, 402, 404, 500, 502, 504):
        assert decide(status, "0") is None
    assert decide(429, "0", tries=2) is not None
    assert decide(429, "0", tries=3) is None, "attempts counts retries after the first try"
    assert policy(attempts=0).after_response(429, "0", tries=1, remaining=5, now=0) is None
