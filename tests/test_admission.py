"""One admission owns a request's quota: every way a request can end is charged by the rule
table (README, "Quotas"), and no path gets upstream work the quota never sees.

Each test here reproduces a way a tenant once slipped past its quota (issue 12's findings).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import parse_config
from gateway.state import DRAINS, METRICS
from tests.conftest import ACME, GLOBEX, FakeClock, gateway_yaml, sse_events
from tests.redis_servers import free_port
from tests.test_accounting import make_limited, tokens_reported, usage_of

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


def estimate(chars: int) -> int:
    return math.ceil(chars / 4)


async def held(simulator: Sim, at_least: int) -> None:
    response = await simulator.get("/_sim/held", params={"at_least": at_least, "timeout": 10})
    assert (await response.json())["held"] >= at_least


async def until(condition: Any, what: str, *, seconds: float = 10) -> None:
    """Wait for a condition the gateway announces nowhere else (bounded, polled)."""
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110  (no event to await: polled)
            await asyncio.sleep(0.01)


def disconnects(gateway: Client) -> float:
    registry = gateway.app[METRICS].registry
    return sum(
        registry.get_sample_value("gateway_client_disconnects_total", {"tenant": t, "stage": s})
        or 0.0
        for t in ("acme", "globex")
        for s in ("before_upstream", "streaming")
    )


@pytest.mark.parametrize(
    "accept", ["Text/Event-Stream", "text/event-stream;q=0.9, application/json;q=0.1"]
)
async def test_a_stream_asked_for_in_any_spelling_holds_a_lease(
    make_gateway: Any, simulator_url: str, simulator: Sim, accept: str
) -> None:
    """Finding 1: upstream matches Accept without regard to case; the lease must too."""
    gateway = await make_limited(make_gateway, "{max_concurrent_streams: 2}", url=simulator_url)
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "after_events": 1})
    headers = {**ACME, "Accept": accept}
    responses = await asyncio.gather(
        *(gateway.post(CHAT, json={"message": "Hi"}, headers=headers) for _ in range(5))
    )
    assert sorted(r.status for r in responses) == [200, 200, 429, 429, 429]
    assert (await usage_of(gateway))["concurrent_streams"]["active"] == 2
    await simulator.delete("/_sim/faults")
    await simulator.post("/_sim/release")
    for response in responses:
        await response.read()


async def test_upstream_is_asked_with_the_accept_header_the_gateway_read(
    gateway: Client, simulator: Sim
) -> None:
    """Finding 1: a header the gateway reads one way must not reach upstream another way."""
    await simulator.delete("/_sim/requests")
    for accept in (b"TEXT/EVENT-STREAM", b"application/json", b"text/\xffevent-stream"):
        status, content_type = await raw_post(gateway, {"message": "Hi"}, accept)
        assert status == 200
        assert (content_type == "text/event-stream") is (accept == b"TEXT/EVENT-STREAM")
    recorded = await (await simulator.get("/_sim/requests")).json()
    assert [r["headers"].get("Accept") for r in recorded] == [
        "text/event-stream",
        "application/json",
        "application/json",  # the gateway read no event stream in it: nor may upstream
    ]


async def raw_post(gateway: Client, body: dict[str, Any], accept: bytes) -> tuple[int, str]:
    """A request with header bytes no HTTP client library would send as they are."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nAuthorization: {ACME['Authorization']}\r\n"
            f"Content-Length: {len(payload)}\r\n".encode()
            + b"Accept: "
            + accept
            + b"\r\n\r\n"
            + payload
        )
        answer = await reader.read()
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), fields.get("Content-Type", "").split(";")[0]


async def test_a_stream_upstream_sends_unasked_still_needs_a_slot(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    """Finding 1: whether a response is a stream, and so holds a lease, is decided by what
    upstream answered, not by what the request asked for."""
    gateway = await make_limited(make_gateway, "{max_concurrent_streams: 1}", url=simulator_url)
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
    holding = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
    await holding.content.readuntil(b"\n\n")

    body = {"message": "Tell me about your products"}
    cost = await tokens_reported(simulator, body)
    await simulator.post("/_sim/faults", json={"kind": "stream_unasked", "times": 1})
    refused = await gateway.post(CHAT, json=body, headers=ACME)
    assert refused.status == 429
    assert "concurrent streams" in (await refused.json())["error"]["message"]
    # Upstream ran the turn all the same: a drain reads it and charges what it reported.
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(1)
    assert (await usage_of(gateway))["tokens_today"] == cost

    await simulator.post("/_sim/release")
    await holding.read()
    await simulator.post("/_sim/faults", json={"kind": "stream_unasked", "times": 1})
    answered = await gateway.post(CHAT, json=body, headers=ACME)
    assert answered.status == 200
    assert sse_events(await answered.read())[-1]["type"] == "done"
    assert (await usage_of(gateway))["concurrent_streams"]["active"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_hanging_up_before_upstream_answers_is_charged_what_upstream_reports(
    make_gateway: Any, simulator_url: str, simulator: Sim, stream: bool
) -> None:
    """Finding 2: upstream runs the turn whether or not the caller waits for it."""
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=simulator_url)
    body = {"message": "x" * 4000, "stream": stream}
    cost = await tokens_reported(simulator, body)
    await simulator.post("/_sim/faults", json={"kind": "hold_answer", "times": 1})
    caller = asyncio.create_task(gateway.post(CHAT, json=body, headers=ACME))
    await held(simulator, 1)
    caller.cancel()  # the caller leaves while upstream is still working
    await until(lambda: _true(disconnects(gateway) == 1), "the gateway saw the caller leave")
    await simulator.post("/_sim/release")
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(1)
    assert (await usage_of(gateway))["tokens_today"] == cost


async def _true(value: bool) -> bool:
    return value


async def test_a_full_drain_pool_never_charges_below_the_requests_own_input(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    """Finding 3: one tenant filling the drain pool must not make another's streams cheap,
    and past the pool a stream is charged at least its reservation."""
    text = gateway_yaml(simulator_url).replace(
        "    agents: [ag_support]\n",
        "    agents: [ag_support]\n    limits: {tokens: {per_day: 10000000, reserve: 100}}\n",
        1,
    )
    text = text.replace(
        '    agents: ["*"]\n',
        '    agents: ["*"]\n    limits: {tokens: {per_day: 10000000, reserve: 100}}\n',
        1,
    )
    config = parse_config(text + "quota: {max_drains: 16}\n")
    gateway = await make_gateway(config=config)
    share = gateway.app[DRAINS].per_tenant
    assert share < 16

    async def abandon(headers: dict[str, str], message: str) -> None:
        await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
        response = await gateway.post(
            CHAT, json={"message": message, "stream": True}, headers=headers
        )
        await response.content.readuntil(b"\n\n")
        response.close()

    for i in range(share):
        await abandon(ACME, f"filler {i}")
    async with asyncio.timeout(10):
        await until(lambda: _true(len(gateway.app[DRAINS]) == share), "acme's drains running")

    # acme's share is full: its next abandoned stream is charged without a drain.
    big = "y" * 8000
    before = (await usage_of(gateway))["tokens_today"]
    await abandon(ACME, big)
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(1)
    charged = (await usage_of(gateway))["tokens_today"] - before
    assert charged >= estimate(len(big)) + 100  # the reservation: input estimate + reserve

    # globex still gets a drain of its own, and is charged exactly what upstream reports.
    cost = await tokens_reported(simulator, {"message": big, "stream": True}, tenant="globex")
    response = await gateway.get("/v1/usage", headers=GLOBEX)
    globex_before = (await response.json())["tokens_today"]
    await abandon(GLOBEX, big)
    await until(lambda: _true(len(gateway.app[DRAINS]) == share + 1), "globex's drain running")
    await simulator.post("/_sim/release")
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(share + 2)
    response = await gateway.get("/v1/usage", headers=GLOBEX)
    assert (await response.json())["tokens_today"] - globex_before == cost


async def test_a_caller_that_reads_nothing_is_cut_off_and_its_lease_freed(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    """Finding 5: a stream whose caller accepts no bytes for `timeouts.idle` ends, is drained
    and settled, and its lease goes with it (it used to outlive the lease's TTL)."""
    text = (
        gateway_yaml(simulator_url)
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n"
            "    limits: {max_concurrent_streams: 1, tokens: {per_day: 100000000}}\n",
            1,
        )
        .replace("idle: 5,", "idle: 1,")
    )
    config = parse_config(text + "limits: {max_body_bytes: 8000000}\n")
    gateway = await make_gateway(config=config)
    # The answer quotes the message: megabytes of it are more than the sockets between the
    # gateway and a caller that never reads can hold.
    body = json.dumps({"message": "z" * 6_000_000, "stream": True}).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Authorization: {ACME['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(stalled, (gateway.host, gateway.port))
        await loop.sock_sendall(stalled, request)

        async def leases(count: int) -> bool:
            return bool((await usage_of(gateway))["concurrent_streams"]["active"] == count)

        await until(lambda: leases(1), "the stalled stream admitted")
        await until(lambda: leases(0), "the stalled stream's lease released", seconds=15)
        async with asyncio.timeout(15):
            await gateway.app[DRAINS].wait_finished(1)
        # The tenant may stream again: its one slot is free.
        again = await gateway.post(CHAT, json={"message": "Hi", "stream": True}, headers=ACME)
        assert again.status == 200
        assert sse_events(await again.read())[-1]["type"] == "done"
    finally:
        stalled.close()


async def test_requests_that_never_reached_upstream_cost_nothing(
    make_gateway: Any, simulator_url: str, simulator: Sim
) -> None:
    """Finding 6: an outage that is not the tenant's doing does not use up its quota."""
    text = (
        gateway_yaml(simulator_url)
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n"
            "    limits: {requests: {per_minute: 5}, tokens: {per_minute: 100000}}\n",
            1,
        )
        .replace("  timeouts:", "  breaker: {failures: 1, cooldown: 60}\n  timeouts:")
    )
    gateway = await make_gateway(config=parse_config(text))
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 500, "times": 1})
    failed = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert failed.status == 500  # reached upstream: it counts
    remaining = int(failed.headers["X-RateLimit-Remaining"])

    def levels(usage: dict[str, Any]) -> dict[str, int]:
        return {b["name"]: b["remaining"] for b in usage["buckets"]}

    before = levels(await usage_of(gateway))
    for _ in range(6):  # more than the limit: none of them may count
        refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
        assert refused.status == 502
        assert int(refused.headers["X-RateLimit-Remaining"]) == remaining
    assert levels(await usage_of(gateway)) == before


async def test_a_connection_never_made_costs_nothing(make_gateway: Any) -> None:
    """Finding 6: nothing listens upstream; every try fails to connect."""
    text = (
        gateway_yaml(f"http://127.0.0.1:{free_port()}")
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n    limits: {requests: {per_minute: 3}}\n",
            1,
        )
        .replace("  timeouts:", "  breaker: {failures: 100, cooldown: 1}\n  timeouts:")
    )
    gateway = await make_gateway(config=parse_config(text))
    for _ in range(5):
        response = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
        assert response.status == 502
        assert response.headers["X-RateLimit-Remaining"] == "3"


async def test_a_refusal_by_upstreams_own_limit_costs_the_tenant_nothing(
    make_gateway: Any, simulator_url: str
) -> None:
    """Finding 6: the shared upstream key's limit refused it before upstream saw it."""
    text = (
        gateway_yaml(simulator_url)
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n    limits: {requests: {per_minute: 10}}\n",
            1,
        )
        .replace("  timeouts:", "  rate_limits: {per_minute: 1, max_wait: 0}\n  timeouts:")
    )
    gateway = await make_gateway(config=parse_config(text))
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
    for _ in range(3):
        refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
        assert refused.status == 429
        assert "upstream" in (await refused.json())["error"]["message"]
        assert refused.headers["X-RateLimit-Remaining"] == "9"


async def test_a_drained_stream_is_charged_in_exactly_one_log_line(
    make_gateway: Any, simulator_url: str, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 8: chargeback from logs must see drained streams, once."""
    gateway = await make_limited(make_gateway, "{tokens: {per_day: 1000000}}", url=simulator_url)
    body = {"message": "Tell me everything", "stream": True}
    cost = await tokens_reported(simulator, body)
    capsys.readouterr()
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
    response = await gateway.post(CHAT, json=body, headers=ACME)
    request_id = response.headers["X-Request-ID"]
    await response.content.readuntil(b"\n\n")
    response.close()
    await until(lambda: _true(disconnects(gateway) == 1), "the gateway saw the caller leave")
    await simulator.post("/_sim/release")
    async with asyncio.timeout(10):
        await gateway.app[DRAINS].wait_finished(1)

    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    mine = [line for line in lines if line.get("request_id") == request_id]
    charged = [line for line in mine if "tokens_charged" in line]
    assert len(charged) == 1, mine
    [line] = charged
    assert line["event"] == "drain finished"
    assert line["tokens_charged"] == cost
    assert {k: line[k] for k in ("tenant", "key_name", "agent")} == {
        "tenant": "acme",
        "key_name": "billing-service",
        "agent": "ag_support",
    }


KINDS = (
    "json",
    "stream",
    "json_gone_before_answer",
    "stream_gone_before_answer",
    "stream_gone_mid_way",
    "upstream_drop",
    "upstream_error",
    "breaker_refusal",
    "no_drain_free",
)


async def test_tokens_charged_equal_tokens_upstream_reported_over_every_way_a_request_ends(
    make_gateway: Any, simulator_url: str, simulator: Sim, capsys: pytest.CaptureFixture[str]
) -> None:
    """The accounting invariant, over a seeded mix of every way a request can end: the tokens
    charged are the same in /v1/usage, the metrics and the log lines, and equal what upstream
    reported (or the rule table's estimate where it reported nothing); the requests charged
    are exactly the requests that reached upstream."""
    clock = FakeClock()
    text = (
        gateway_yaml(simulator_url)
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n"
            "    limits: {requests: {per_day: 1000}, tokens: {per_day: 100000000, reserve: 300}}\n",
            1,
        )
        .replace("  timeouts:", "  breaker: {failures: 1, cooldown: 1}\n  timeouts:")
    )
    # One drain at a time per tenant (8 / 8), so one stream held open fills acme's share.
    gateway = await make_gateway(
        config=parse_config(text + "quota: {max_drains: 8}\n"), clock=clock
    )
    drains = gateway.app[DRAINS]
    rng = random.Random(12)
    kinds = [rng.choice(KINDS) for _ in range(36)]
    assert set(kinds) == set(KINDS)
    await simulator.delete("/_sim/requests")
    capsys.readouterr()
    expected = reached = gone = drained = 0

    async def fault(spec: dict[str, Any]) -> None:
        await simulator.post("/_sim/faults", json={**spec, "times": 1})

    async def hang_up_before_answer(body: dict[str, Any]) -> None:
        nonlocal gone, drained
        await fault({"kind": "hold_answer"})
        caller = asyncio.create_task(gateway.post(CHAT, json=body, headers=ACME))
        await held(simulator, 1)
        caller.cancel()
        gone += 1
        await until(lambda: _true(disconnects(gateway) == gone), "the caller gone")
        await simulator.post("/_sim/release")
        drained += 1
        async with asyncio.timeout(10):
            await drains.wait_finished(drained)

    async def hang_up_after_first_event(body: dict[str, Any]) -> str:
        nonlocal gone
        await fault({"kind": "hold_stream", "after_events": 1})
        response = await gateway.post(CHAT, json=body, headers=ACME)
        first = sse_events(await response.content.readuntil(b"\n\n"))[0]["content"]
        response.close()
        gone += 1
        await until(lambda: _true(disconnects(gateway) == gone), "the caller gone")
        return str(first)

    for i, kind in enumerate(kinds):
        message = f"Question {i}: " + "tell me more " * rng.randint(1, 60)
        stream = kind not in ("json", "json_gone_before_answer", "upstream_error")
        body = {"message": message, "stream": stream}
        if kind in ("json", "stream"):
            expected += await tokens_reported(simulator, body)
            response = await gateway.post(CHAT, json=body, headers=ACME)
            assert response.status == 200
            await response.read()
        elif kind in ("json_gone_before_answer", "stream_gone_before_answer"):
            expected += await tokens_reported(simulator, body)
            await hang_up_before_answer(body)
        elif kind == "stream_gone_mid_way":
            expected += await tokens_reported(simulator, body)
            await hang_up_after_first_event(body)
            await simulator.post("/_sim/release")
            drained += 1
            async with asyncio.timeout(10):
                await drains.wait_finished(drained)
        elif kind == "upstream_drop":
            await fault({"kind": "drop_mid_stream", "after_events": 2})
            response = await gateway.post(CHAT, json=body, headers=ACME)
            received = sse_events(await response.read())
            assert received[-1]["type"] == "error"
            seen = "".join(e["content"] for e in received if e["type"] == "content")
            expected += estimate(len(message)) + estimate(len(seen))
        elif kind == "upstream_error":
            await fault({"kind": "error", "status": 500})
            assert (await gateway.post(CHAT, json=body, headers=ACME)).status == 500
            # The breaker is open now: the next request never reaches upstream.
            assert (await gateway.post(CHAT, json=body, headers=ACME)).status == 502
            clock.advance(1.5)  # past the cooldown: the next request is the probe
        elif kind == "breaker_refusal":
            await fault({"kind": "error", "status": 503})
            assert (await gateway.post(CHAT, json=body, headers=ACME)).status == 503
            for _ in range(2):
                assert (await gateway.post(CHAT, json=body, headers=ACME)).status == 502
            clock.advance(1.5)
        else:  # no_drain_free: acme's share of the drains is taken by a stream held open
            expected += await tokens_reported(simulator, {"message": "filler", "stream": True})
            await hang_up_after_first_event({"message": "filler", "stream": True})
            await until(lambda: _true(len(drains) == drains.per_tenant), "acme's share taken")
            seen = await hang_up_after_first_event(body)
            # Charged at once, not read: at least its reservation (input estimate + reserve).
            expected += estimate(len(message)) + max(300, estimate(len(seen)))
            drained += 1
            async with asyncio.timeout(10):
                await drains.wait_finished(drained)
            await simulator.post("/_sim/release")
            drained += 1
            async with asyncio.timeout(10):
                await drains.wait_finished(drained)
        # Every kind sends one request that reaches upstream; no_drain_free sends two.
        reached += 2 if kind == "no_drain_free" else 1

    usage = await usage_of(gateway)
    registry = gateway.app[METRICS].registry
    metric = sum(
        registry.get_sample_value(name, labels) or 0.0
        for name, labels in (
            ("gateway_tokens_total", {"tenant": "acme", "agent": "ag_support", "kind": "total"}),
            ("gateway_tokens_estimated_total", {"tenant": "acme"}),
        )
    )
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    logged = sum(line.get("tokens_charged") or 0 for line in lines if line.get("tenant") == "acme")
    assert (usage["tokens_today"], metric, logged) == (expected, expected, expected)

    recorded = await (await simulator.get("/_sim/requests")).json()
    from_gateway = [r for r in recorded if "X-Request-ID" in r["headers"]]
    assert len(from_gateway) == reached
    requests = {b["name"]: b for b in usage["buckets"]}["requests per day"]
    assert requests["limit"] - requests["remaining"] == reached
