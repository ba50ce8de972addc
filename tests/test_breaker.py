"""The upstream circuit breakers as callers meet them: a failing agent is left alone for a while,
and only that agent: one circuit per (upstream key, agent), which one tenant's own slow requests
cannot open for the others (gateway/circuits.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs
from yarl import URL

from gateway.app import create_admin_app
from gateway.circuits import TIMEOUT_WINDOW, Circuits
from gateway.config import Breaker, Config, Secret, parse_config
from tests.conftest import ACME, GLOBEX, AiohttpClient, FakeClock, gateway_yaml

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
CHAT = "/v1/agents/ag_support/chat"
SALES = "/v1/agents/ag_sales/chat"  # globex reaches it with the platform key


def with_breaker(url: str) -> Config:
    """Opens after 2 consecutive failures, probes after 5 s."""
    text = gateway_yaml(url).replace(
        "  timeouts:", "  breaker: {failures: 2, cooldown: 5}\n  timeouts:", 1
    )
    return parse_config(text)


def slow_config(url: str, failures: int = 5) -> Config:
    """The finding's set-up: `first_byte: 2`, the default five failures."""
    text = gateway_yaml(url).replace(
        "  timeouts: {connect: 2, first_byte: 5,",
        f"  breaker: {{failures: {failures}, cooldown: 10}}\n"
        "  timeouts: {connect: 2, first_byte: 2,",
        1,
    )
    return parse_config(text)


async def upstream_requests(simulator: Sim) -> int:
    count: int = len(await (await simulator.get("/_sim/requests")).json())
    return count


async def circuit_open(admin: TestClient[Any, Any], agent: str = "ag_support") -> float:
    text = await (await admin.get("/metrics")).text()
    [line] = [
        line
        for line in text.splitlines()
        if line.startswith(f'gateway_upstream_circuit_open{{agent="{agent}"}}')
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
        (line["event"], line["peer"], line["agent"])
        for line in changes
        if line["event"].startswith("upstream circuit")
    ] == [
        ("upstream circuit opened", f"127.0.0.1:{URL(simulator_url).port}", "ag_support"),
        ("upstream circuit closed", f"127.0.0.1:{URL(simulator_url).port}", "ag_support"),
    ]


async def test_client_errors_do_not_count_as_failures(
    make_gateway: Any, simulator: Sim, simulator_url: str
) -> None:
    gateway: Client = await make_gateway(config=with_breaker(simulator_url), clock=FakeClock())
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 402, "times": 3})
    for _ in range(3):
        assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 402
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200


async def test_one_tenants_slow_requests_open_no_circuit_for_anyone_else(
    make_gateway: Any, simulator: Sim, simulator_url: str, aiohttp_client: AiohttpClient
) -> None:
    """The finding: six slow requests from acme to ag_support used to open the one breaker,
    and globex's requests to ag_sales (another agent, the platform key) answered 502."""
    gateway: Client = await make_gateway(config=slow_config(simulator_url), clock=FakeClock())
    admin = await aiohttp_client(create_admin_app(gateway.app))
    await simulator.post(
        "/_sim/faults",
        json={"kind": "slow_first_byte", "agent_id": "ag_support", "delay": 4, "times": 6},
    )
    slow = await asyncio.gather(
        *(gateway.post(CHAT, json={"message": "a long one"}, headers=ACME) for _ in range(6))
    )
    assert [(await r.json())["error"]["code"] for r in slow] == ["upstream_timeout"] * 6
    for _ in range(3):
        other = await gateway.post(SALES, json={"message": "Hi"}, headers=GLOBEX)
        assert other.status == 200
    # Nor did acme's own timeouts open ag_support's circuit: it was one tenant's long requests.
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=GLOBEX)).status == 200
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
    assert await circuit_open(admin, "ag_support") == 0
    assert await circuit_open(admin, "ag_sales") == 0


async def test_first_byte_timeouts_of_two_tenants_open_that_agents_circuit_only(
    make_gateway: Any, simulator: Sim, simulator_url: str, aiohttp_client: AiohttpClient
) -> None:
    """A hung agent still opens its circuit once two tenants meet it, and only its own."""
    gateway: Client = await make_gateway(
        config=slow_config(simulator_url, failures=2), clock=FakeClock()
    )
    admin = await aiohttp_client(create_admin_app(gateway.app))
    await simulator.post(
        "/_sim/faults",
        json={"kind": "slow_first_byte", "agent_id": "ag_support", "delay": 4, "times": 3},
    )
    slow = await asyncio.gather(
        gateway.post(CHAT, json={"message": "Hi"}, headers=ACME),
        gateway.post(CHAT, json={"message": "Hi"}, headers=GLOBEX),
        gateway.post(CHAT, json={"message": "Hi"}, headers=GLOBEX),
    )
    assert [r.status for r in slow] == [504] * 3
    refused = await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)
    assert refused.status == 502
    assert refused.headers["Retry-After"] == "10"
    assert await circuit_open(admin, "ag_support") == 1
    assert (await gateway.post(SALES, json={"message": "Hi"}, headers=GLOBEX)).status == 200
    assert await circuit_open(admin, "ag_sales") == 0


async def test_a_failing_agent_opens_only_its_own_circuit(
    make_gateway: Any, simulator: Sim, simulator_url: str, aiohttp_client: AiohttpClient
) -> None:
    gateway: Client = await make_gateway(config=with_breaker(simulator_url), clock=FakeClock())
    admin = await aiohttp_client(create_admin_app(gateway.app))
    await simulator.post(
        "/_sim/faults", json={"kind": "error", "status": 500, "agent_id": "ag_sales", "times": 5}
    )
    for _ in range(2):
        assert (await gateway.post(SALES, json={"message": "Hi"}, headers=GLOBEX)).status == 500
    assert (await gateway.post(SALES, json={"message": "Hi"}, headers=GLOBEX)).status == 502
    assert await circuit_open(admin, "ag_sales") == 1
    # Another agent, another key: untouched, for either tenant.
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=GLOBEX)).status == 200
    assert (await gateway.post(CHAT, json={"message": "Hi"}, headers=ACME)).status == 200
    assert await circuit_open(admin, "ag_support") == 0


def test_agents_nobody_configured_share_one_circuit_labelled_other() -> None:
    """A tenant with `agents: ["*"]` reaches any id through the platform key: ids it makes up
    cannot grow the number of circuits or of metric series."""
    circuits = Circuits(
        Breaker(failures=1, cooldown=5),
        peer="upstream:443",
        agents=lambda: frozenset({"ag_support"}),
        clock=FakeClock(),
    )
    platform = Secret("thns_sk_platform")
    for n in range(100):
        circuits.for_agent(f"ag_made_up_{n}", platform).failure()
    assert not circuits.for_agent("ag_made_up_x", platform).allow()
    assert circuits.for_agent("ag_support", Secret("ak_support")).allow()
    assert list(circuits.states()) == [("ag_support", False), ("other", True)]


def test_a_reload_that_changes_an_agents_key_starts_its_circuit_afresh() -> None:
    circuits = Circuits(
        Breaker(failures=1, cooldown=5),
        peer="upstream:443",
        agents=lambda: frozenset({"ag_support"}),
        clock=FakeClock(),
    )
    circuits.for_agent("ag_support", Secret("ak_old")).failure()
    assert not circuits.for_agent("ag_support", Secret("ak_old")).allow()
    assert circuits.for_agent("ag_support", Secret("ak_new")).allow()


def test_one_tenants_timeouts_never_count_two_tenants_within_the_window_do() -> None:
    clock = FakeClock()
    circuits = Circuits(
        Breaker(failures=2, cooldown=5),
        peer="upstream:443",
        agents=lambda: frozenset({"ag_support"}),
        clock=clock,
    )
    circuit = circuits.for_agent("ag_support", None)
    for _ in range(10):
        circuit.timed_out("acme")
    assert circuit.allow()
    clock.now += TIMEOUT_WINDOW + 1  # acme's are too old to pair with globex's
    circuit.timed_out("globex")
    assert circuit.allow()
    circuit.timed_out("acme")  # two tenants within the window: a failure each from now on
    assert circuit.allow()  # one of the two it takes
    circuit.timed_out("acme")
    assert not circuit.allow()
