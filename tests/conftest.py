"""Real servers on loopback: the simulator as upstream, the gateway in front of it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import Clock, create_app
from gateway.auth import hash_key
from gateway.config import Config, EventLoop, Logging, parse_config
from gateway.logs import configure_logging
from gateway.simulator.app import create_simulator_app
from gateway.simulator.config import RateLimitConfig, SimulatorConfig
from gateway.state import CONFIG, GATEWAY
from tests.secret_watch import SecretWatch

# The simulator's default (demo) keys, standing in for real upstream secrets.
PLATFORM_KEY = "thns_sk_demo_0001"
SUPPORT_KEY = "ak_demo_support_0001"
ACME_KEY = "gw_test_acme_billing_0001"
GLOBEX_KEY = "gw_test_globex_web_0002"
ACME_REPORTS_KEY = "gw_test_acme_reports_0003"  # test_report's second key of one tenant
ROTATED_PLATFORM_KEY = "thns_sk_rotated_0002"  # test_lifecycle's key rotation
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
GLOBEX = {"Authorization": f"Bearer {GLOBEX_KEY}"}

# Every key any test hands the gateway or the simulator (keys made by `keys new` aside).
SECRETS_IN_PLAY = (
    PLATFORM_KEY,
    SUPPORT_KEY,
    ACME_KEY,
    GLOBEX_KEY,
    ACME_REPORTS_KEY,
    ROTATED_PLATFORM_KEY,
    "gw_demo_acme_billing_key_0001",  # config/demo.yaml
    "gw_demo_globex_web_key_0002",
    "gw_test_key_for_acme_billing",  # test_auth
    "ak_support_1",  # test_simulator's upstream keys
    "ak_sales_1",
    "thns_sk_test_1",
    "thns_sk_test_2",
    "ak_from_file",  # test_config's ${file:} secret
    "hunter2secret",  # test_quota's Redis password
    "proxy_pw_0451",  # tests/forward_proxy.py's password, in upstream.proxy and HTTPS_PROXY
)

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
GatewayFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class FakeClock:
    """An injected clock that moves only when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gateway_yaml(upstream_url: str, extra: str = "") -> str:
    """acme may use ag_support only; globex may use any agent (with the platform key)."""
    return f"""
upstream:
  base_url: {upstream_url}
  api_key: ${{TEST_PLATFORM_KEY}}
  timeouts: {{connect: 2, first_byte: 5, idle: 5, total: 30}}
agents:
  ag_support: {{api_key: "${{TEST_SUPPORT_KEY}}"}}
  ag_sales: {{}}
tenants:
  acme:
    keys: [{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}]
    agents: [ag_support]
  globex:
    keys: [{{name: web-frontend, sha256: {hash_key(GLOBEX_KEY)}}}]
    agents: ["*"]
{extra}
"""


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of a stream's `data:` lines (the simulator sends one per event)."""
    return [
        json.loads(line.removeprefix(b"data: "))
        for line in body.split(b"\n")
        if line.startswith(b"data: ")
    ]


@pytest.fixture(scope="session", autouse=True)
def secret_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretWatch]:
    """The whole run's logs and gateway responses, searched for every key in play."""
    watch = SecretWatch(SECRETS_IN_PLAY)
    configure_logging(Logging(level="debug", format="json"), stream=watch.log_stream())
    yield watch
    # The real processes' logs (gateway, simulator, Redis, Prometheus) are kept in tmp_path.
    files = watch.search_files(sorted(tmp_path_factory.getbasetemp().rglob("*.log")))
    assert not watch.found, f"keys leaked ({files} process logs searched): {watch.found}"


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient, secret_watch: SecretWatch) -> AiohttpClient:
    """pytest-aiohttp's, with every response of a gateway (caller or admin port) watched."""

    async def make(app: Any, **kwargs: Any) -> TestClient[Any, Any]:
        if isinstance(app, web.Application) and (CONFIG in app or GATEWAY in app):
            kwargs.setdefault("response_class", secret_watch.response_class())
        return await aiohttp_client(app, **kwargs)

    return make


@pytest.fixture(autouse=True)
def upstream_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PLATFORM_KEY", PLATFORM_KEY)
    monkeypatch.setenv("TEST_SUPPORT_KEY", SUPPORT_KEY)


@pytest.fixture
async def simulator(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    """The upstream; its control API is at /_sim/ on the same client."""
    config = SimulatorConfig(rate_limit=RateLimitConfig(per_minute=100_000, per_day=1_000_000))
    return await aiohttp_client(create_simulator_app(config))


@pytest.fixture
async def lines_simulator(aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    """An upstream that streams as the deployment guide prints it: one `data:` line per
    event, no blank line between events (every agent's `stream_framing: lines`)."""
    defaults = SimulatorConfig()
    agents = {
        agent_id: replace(agent, stream_framing="lines")
        for agent_id, agent in defaults.agents.items()
    }
    config = replace(
        defaults,
        agents=agents,
        rate_limit=RateLimitConfig(per_minute=100_000, per_day=1_000_000),
    )
    return await aiohttp_client(create_simulator_app(config))


@pytest.fixture
def simulator_url(simulator: TestClient[Any, Any]) -> str:
    return str(simulator.make_url("")).rstrip("/")


@pytest.fixture
def serve_loop() -> EventLoop | None:
    """The event loop of the `serve` processes a test starts, for the helpers that start them:
    None, their default (asyncio's own loop, which the production image runs, unless
    THINNEST_GATEWAY_EVENT_LOOP is set). tests/processes.py's `both_loops` runs a test on
    asyncio's loop and again on uvloop."""
    return None


@pytest.fixture
def make_gateway(aiohttp_client: AiohttpClient, simulator_url: str) -> GatewayFactory:
    """A gateway in front of the simulator; `extra` YAML is appended, `config` replaces it."""

    async def make(
        extra: str = "", *, config: Config | None = None, clock: Clock | None = None
    ) -> TestClient[web.Request, web.Application]:
        if config is None:
            config = parse_config(gateway_yaml(simulator_url, extra), "test.yaml")
        app = create_app(config) if clock is None else create_app(config, clock=clock)
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> TestClient[web.Request, web.Application]:
    return await make_gateway()
