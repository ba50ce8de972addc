"""The upstream circuit breaker as callers meet it: a failing upstream is left alone for a while."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from yarl import URL

from gateway.app import create_admin_app
from gateway.config import Config, parse_config
from tests.conftest import ACME, AiohttpClient, FakeClock, gateway_yaml

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"


def with_breaker(url: str) -> Config:
    """Opens after 2 consecutive failures, probes after 5 s."""
    text = gateway_yaml(url).replace(
        "  timeouts:", "  breaker: {failures: 2, cooldown: 5}\n  timeouts:", 1
    )
    return parse_config(text)


async def upstream_requests(simulator: Sim) -> int:
    count: int = len(await (await simulator.get("/_sim/requests")).json())
    return count


async def circuit_open(admin: TestClient[Any, Any]) -> float:
    text = await (await admin.get("/metrics")).text()
    [line] = [
        line for line in text.splitlines() if line.startswith("gateway_upstream_circuit_open")
    ]
    return float(line.split()[-1])


async def test_consecutive_failures_open_it_and_a_probe_after_the_cooldown_closes_it(
    make_gateway: Any, simulator: Sim, simulator_url: str, aiohttp_client: AiohttpClient
) -> None:
    clock = FakeClock()
    gateway: Client = await make_gateway(config=with_breaker(simulator_url), clock=clock)
    admin = await aiohttp_client(create_admin_app(gateway.app))
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 500, "times": 3})
    with capture_logs() as changes:
        for _ in range(2):
            assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 500
        # Open: refused at once, upstream is not asked.
        refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
        assert refused.status == 502
        assert (await refused.json())["error"]["code"] == "upstream_unavailable"
        assert refused.headers["Retry-After"] == "5"
        assert await upstream_requests(simulator) == 2
        assert await circuit_open(admin) == 1

        # After the cooldown one probe goes through; it fails (the third fault), so it re-opens.
        clock.now += 5
        assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 500
        assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 502
        assert await upstream_requests(simulator) == 3

        # The next probe succeeds: closed again, everyone goes through.
        clock.now += 5
        for _ in range(3):
            assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
        assert await upstream_requests(simulator) == 6
        assert await circuit_open(admin) == 0
    # One line when it opens (not again when a probe fails), one when it closes.
    assert [
        (line["event"], line["peer"])
        for line in changes
        if line["event"].startswith("upstream circuit")
    ] == [
        ("upstream circuit opened", f"127.0.0.1:{URL(simulator_url).port}"),
        ("upstream circuit closed", f"127.0.0.1:{URL(simulator_url).port}"),
    ]


async def test_client_errors_do_not_count_as_failures(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    gateway: Client = await make_gateway(config=with_breaker(simulator_url), clock=FakeClock())
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 402, "times": 3})
    for _ in range(3):
        assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 402
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
