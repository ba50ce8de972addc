"""Metrics as an operator scrapes them from the admin port: values equal the traffic sent."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections import Counter
from datetime import UTC, datetime
from subprocess import PIPE, STDOUT
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_admin_app
from gateway.auth import hash_key
from gateway.config import load_config, parse_config
from gateway.reload import reload_config
from gateway.state import DRAINS, METRICS
from tests.conftest import (
    ACME,
    ACME_KEY,
    GLOBEX,
    GLOBEX_KEY,
    AiohttpClient,
    gateway_yaml,
    sse_events,
)
from tests.redis_servers import free_port

Client = TestClient[web.Request, web.Application]
Sim = TestClient[Any, Any]
Labels = frozenset[tuple[str, str]]


class Scrape:
    """One /metrics exposition, parsed: sample name + labels → value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Non-zero values of `name` grouped by the label `keys`, as PromQL `sum by` would."""
        grouped: dict[tuple[str, ...], float] = {}
        for (n, ls), value in self.samples.items():
            if n == name and value:
                labels = dict(ls)
                group = tuple(labels[key] for key in keys)
                grouped[group] = grouped.get(group, 0) + value
        return grouped


def budget_ratios(scraped: Scrape) -> dict[tuple[str, str, str], float]:
    """Every `gateway_budget_used_ratio` series, zeros included: (tenant, key, budget) → value."""
    found = {}
    for (name, labels), value in scraped.samples.items():
        if name == "gateway_budget_used_ratio":
            series = dict(labels)
            found[(series["tenant"], series["key"], series["budget"])] = value
    return found


async def scrape(admin: TestClient[Any, Any]) -> Scrape:
    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return Scrape(await response.text())


def limited(url: str) -> str:
    """acme: 6 requests a day; globex: one stream at a time."""
    return (
        gateway_yaml(url)
        .replace(
            "    agents: [ag_support]\n",
            "    agents: [ag_support]\n    limits: {requests: {per_day: 6}}\n",
            1,
        )
        .replace(
            '    agents: ["*"]\n',
            '    agents: ["*"]\n    limits: {max_concurrent_streams: 1}\n',
            1,
        )
    )


class Traffic:
    """What was sent and what came back, to compare the scrape with."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.tokens: Counter[tuple[str, str, str]] = Counter()

    def answered(self, tenant: str, agent: str, status: int) -> None:
        self.requests[(tenant, agent, str(status))] += 1

    def reported(self, tenant: str, agent: str, payload: dict[str, Any]) -> None:
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.tokens[(tenant, agent, "input")] += usage["input_tokens"]
            self.tokens[(tenant, agent, "output")] += usage["output_tokens"]
            self.tokens[(tenant, agent, "total")] += usage["total_tokens"]
        else:
            self.tokens[(tenant, agent, "total")] += payload["tokens_used"]


@pytest.fixture
async def admin_of(aiohttp_client: AiohttpClient) -> Any:
    async def make(gateway: Client) -> TestClient[Any, Any]:
        return await aiohttp_client(create_admin_app(gateway.app))

    return make


async def test_scraped_values_equal_a_known_mix_of_traffic(
    make_gateway: Any, simulator: Sim, simulator_url: str, admin_of: Any
) -> None:
    gateway: Client = await make_gateway(config=parse_config(limited(simulator_url)))
    admin = await admin_of(gateway)
    sent = Traffic()

    async def chat(tenant: str, agent: str, body: dict[str, Any]) -> Any:
        headers = ACME if tenant == "acme" else GLOBEX
        response = await gateway.post(f"/v1/agents/{agent}/chat", json=body, headers=headers)
        sent.answered(tenant, agent, response.status)
        if response.status != 200:
            await response.read()
            return response
        if body.get("stream"):
            done = sse_events(await response.read())[-1]
            assert done["type"] == "done"
            sent.reported(tenant, agent, done)
        else:
            sent.reported(tenant, agent, await response.json())
        return response

    # acme: four JSON answers and two streams use its six requests; two more are refused.
    for i in range(4):
        await chat("acme", "ag_support", {"message": f"question {i} " + "x" * i})
    for i in range(2):
        await chat("acme", "ag_support", {"message": f"stream {i}", "stream": True})
    for _ in range(2):
        assert (await chat("acme", "ag_support", {"message": "one more"})).status == 429

    # globex: a held stream shows up as active; a second one meanwhile is refused.
    await simulator.post("/_sim/faults", json={"kind": "hold_stream", "times": 1})
    held = await gateway.post(
        "/v1/agents/ag_sales/chat", json={"message": "long one", "stream": True}, headers=GLOBEX
    )
    await held.content.readuntil(b"\n\n")
    during = await scrape(admin)
    assert during.total("gateway_active_streams", tenant="globex") == 1
    assert during.total("gateway_inflight_requests") == 1
    refused = await chat("globex", "ag_sales", {"message": "second", "stream": True})
    assert refused.status == 429
    await simulator.post("/_sim/release")
    sent.answered("globex", "ag_sales", held.status)
    sent.reported("globex", "ag_sales", sse_events(await held.read())[-1])

    await chat("globex", "ag_sales", {"message": "a JSON one"})
    # An upstream failure, passed through with its status.
    await simulator.post("/_sim/faults", json={"kind": "error", "status": 500, "times": 1})
    assert (await chat("globex", "ag_sales", {"message": "boom"})).status == 500
    # Nobody: counted under tenant and agent "none".
    await gateway.post("/v1/agents/ag_sales/chat", json={"message": "hi"})
    sent.answered("none", "none", 401)

    after = await scrape(admin)
    assert after.by("gateway_requests_total", "tenant", "agent", "code") == dict(sent.requests)
    assert after.by("gateway_tokens_total", "tenant", "agent", "kind") == dict(sent.tokens)
    assert after.by("gateway_quota_rejections_total", "tenant", "limit") == {
        ("acme", "requests_per_day"): 2,
        ("globex", "concurrent_streams"): 1,
    }
    assert after.by("gateway_upstream_errors_total", "reason") == {("server_error",): 1}
    assert after.total("gateway_active_streams") == 0
    assert after.total("gateway_inflight_requests") == 0
    assert after.total("gateway_tokens_estimated_total") == 0
    # Every request timed; upstream's first byte timed for those that reached it.
    answered = sum(sent.requests.values())
    assert after.total("gateway_request_duration_seconds_count") == answered
    reached_upstream = 6 + 3  # acme's admitted six; globex's held stream, JSON and the 500
    assert after.total("gateway_upstream_ttfb_seconds_count") == reached_upstream
    assert after.total("gateway_overhead_seconds_count") == reached_upstream
    assert after.total("gateway_request_duration_seconds_count", stream="true") == 3
    # Chunks of the three streams went through the chunk-gap histogram.
    assert after.total("gateway_stream_chunk_gap_seconds_count") >= 3
    assert after.total("gateway_build_info") == 1


async def test_a_stream_whose_caller_left_counts_its_tokens_once_its_drain_settles(
    gateway: Client, simulator: Sim, admin_of: Any
) -> None:
    admin = await admin_of(gateway)
    body = {"message": "Tell me everything", "stream": True}
    await simulator.post(
        "/_sim/faults", json={"kind": "hold_stream", "after_events": 1, "times": 1}
    )
    response = await gateway.post("/v1/agents/ag_support/chat", json=body, headers=ACME)
    await response.content.readuntil(b"\n\n")
    response.close()
    await simulator.post("/_sim/release")
    async with asyncio.timeout(5):
        await gateway.app[DRAINS].wait_finished(1)

    # The same question again, to learn what upstream reports for it.
    complete = await gateway.post("/v1/agents/ag_support/chat", json=body, headers=ACME)
    reported = Traffic()
    reported.reported("acme", "ag_support", sse_events(await complete.read())[-1])
    total = reported.tokens[("acme", "ag_support", "total")]

    metrics = await scrape(admin)
    assert metrics.by("gateway_client_disconnects_total", "tenant", "stage") == {
        ("acme", "streaming"): 1
    }
    assert metrics.total("gateway_tokens_total", tenant="acme", kind="total") == 2 * total
    assert metrics.total("gateway_requests_total", code="499") == 1
    assert metrics.total("gateway_active_streams") == 0
    assert metrics.total("gateway_stream_drains") == 0


async def test_a_stream_cut_short_counts_an_upstream_error_and_estimates_its_tokens(
    gateway: Client, simulator: Sim, admin_of: Any
) -> None:
    admin = await admin_of(gateway)
    await simulator.post("/_sim/faults", json={"kind": "drop_mid_stream", "times": 1})
    response = await gateway.post(
        "/v1/agents/ag_support/chat", json={"message": "Hi", "stream": True}, headers=ACME
    )
    assert sse_events(await response.read())[-1]["type"] == "error"

    metrics = await scrape(admin)
    assert metrics.by("gateway_upstream_errors_total", "reason") == {("stream_broken",): 1}
    assert metrics.total("gateway_tokens_total") == 0
    assert metrics.total("gateway_tokens_estimated_total", tenant="acme") > 0


async def test_a_thousand_unknown_agent_ids_add_no_series(gateway: Client, admin_of: Any) -> None:
    admin = await admin_of(gateway)
    limit = asyncio.Semaphore(50)

    async def unknown_agent() -> None:
        async with limit:
            agent = f"ag_{secrets.token_hex(8)}"
            # globex may use any agent: each id really goes upstream (which has no such agent).
            response = await gateway.post(
                f"/v1/agents/{agent}/chat", json={"message": "hi"}, headers=GLOBEX
            )
            assert response.status == 404
            await response.read()

    await asyncio.gather(*(unknown_agent() for _ in range(5)))
    before = await scrape(admin)
    await asyncio.gather(*(unknown_agent() for _ in range(1000)))
    after = await scrape(admin)

    assert len(after.samples) == len(before.samples)
    assert after.total("gateway_requests_total", agent="other", code="404") == 1005
    assert "ag_" not in after.text.replace("ag_s", "")  # only configured ids (ag_support, ag_sales)


async def test_the_exposition_passes_promtool(
    gateway: Client, admin_of: Any, tmp_path: Any
) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs Debian's prometheus package"
    admin = await admin_of(gateway)
    for body in ({"message": "Hi"}, {"message": "Hi", "stream": True}):
        await (await gateway.post("/v1/agents/ag_support/chat", json=body, headers=ACME)).read()
    gateway.app[METRICS].budget_used("acme", None, "tokens_per_month", 0.5)
    gateway.app[METRICS].budget_used("acme", "billing-service", "requests_per_day", 0.25)
    exposition = (await scrape(admin)).text

    checked = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    said, _ = await checked.communicate(exposition.encode())
    assert checked.returncode == 0, said.decode()


async def test_the_admin_port_serves_probes_and_nothing_of_the_callers(
    gateway: Client, admin_of: Any
) -> None:
    admin = await admin_of(gateway)
    assert (await admin.get("/healthz")).status == 200
    ready = await admin.get("/readyz")
    assert ready.status == 200 and (await ready.json())["quota_state"] == "ok"
    assert (await admin.post("/v1/agents/ag_support/chat", json={"message": "x"})).status == 404
    assert (await gateway.get("/metrics")).status == 404


# --- gateway_budget_used_ratio --------------------------------------------------------------
# The quota reports each level's budgets as it learns them (Metrics.budget_used); /metrics
# shows the last fraction reported, only ever for tenants and keys the configuration names.


def with_acme_keys(url: str, *names: str) -> str:
    """The test configuration with more keys for acme (hashes nobody presents)."""
    extra = "".join(
        f", {{name: {name}, sha256: {'abcdef'[i] * 64}}}" for i, name in enumerate(names)
    )
    end_of_acme_keys = "}]\n    agents: [ag_support]\n"
    return gateway_yaml(url).replace(end_of_acme_keys, "}" + extra + end_of_acme_keys[1:], 1)


async def test_budget_ratios_show_each_level_as_last_reported_and_none_before(
    gateway: Client, admin_of: Any
) -> None:
    admin = await admin_of(gateway)
    metrics = gateway.app[METRICS]
    # No series before a report: a 0 at start-up would be wrong after a restart on Redis.
    assert budget_ratios(await scrape(admin)) == {}

    metrics.budget_used("acme", None, "tokens_per_month", 0.5)
    metrics.budget_used("acme", None, "tokens_per_month", 0.85)  # the last report wins
    metrics.budget_used("acme", "billing-service", "requests_per_day", 0.25)
    metrics.budget_used("globex", None, "requests_per_month", 1.2)  # in debt: not clamped
    metrics.budget_used("globex", None, "tokens_per_day", 0.0)  # a new day has begun

    scraped = await scrape(admin)
    assert budget_ratios(scraped) == {
        ("acme", "all", "tokens_per_month"): 0.85,
        ("acme", "billing-service", "requests_per_day"): 0.25,
        ("globex", "all", "requests_per_month"): 1.2,
        ("globex", "all", "tokens_per_day"): 0.0,
    }
    assert "# TYPE gateway_budget_used_ratio gauge" in scraped.text


async def test_a_budget_of_a_tenant_or_key_not_configured_adds_no_series(
    make_gateway: Any, simulator_url: str, admin_of: Any
) -> None:
    config = parse_config(with_acme_keys(simulator_url, "reports"), "test.yaml")
    gateway: Client = await make_gateway(config=config)
    admin = await admin_of(gateway)
    metrics = gateway.app[METRICS]
    metrics.budget_used("acme", None, "tokens_per_day", 0.5)
    for tenant, key in (
        ("initech", None),  # no such tenant
        ("initech", "billing-service"),
        ("none", None),
        ("other", None),
        ("acme", "reporting"),  # no such key
        ("acme", "web-frontend"),  # globex's key, not acme's
        ("acme", "all"),  # not a key (config refuses the name): never the tenant's level
    ):
        metrics.budget_used(tenant, key, "tokens_per_day", 0.99)

    assert budget_ratios(await scrape(admin)) == {("acme", "all", "tokens_per_day"): 0.5}


def test_a_budget_outside_the_four_calendar_budgets_is_a_programming_error(
    gateway: Client,
) -> None:
    with pytest.raises(ValueError, match="tokens_per_minute"):
        gateway.app[METRICS].budget_used("acme", None, "tokens_per_minute", 0.5)


async def test_a_reload_removes_the_budget_series_of_removed_tenants_and_keys(
    make_gateway: Any, simulator_url: str, admin_of: Any, tmp_path: Any
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(with_acme_keys(simulator_url, "reporting"))
    gateway: Client = await make_gateway(config=load_config(path))
    admin = await admin_of(gateway)
    metrics = gateway.app[METRICS]
    for tenant, key in (
        ("acme", None),
        ("acme", "billing-service"),
        ("acme", "reporting"),
        ("globex", None),
        ("globex", "web-frontend"),
    ):
        metrics.budget_used(tenant, key, "tokens_per_month", 0.9)

    # acme loses its key `reporting`, and globex (the last tenant) goes.
    text = gateway_yaml(simulator_url)
    path.write_text(text[: text.index("  globex:\n")])
    assert reload_config(gateway.app)

    assert budget_ratios(await scrape(admin)) == {
        ("acme", "all", "tokens_per_month"): 0.9,
        ("acme", "billing-service", "tokens_per_month"): 0.9,
    }
    metrics.budget_used("globex", None, "tokens_per_month", 0.95)  # a late report: dropped
    metrics.budget_used("acme", "reporting", "tokens_per_month", 0.95)
    assert len(budget_ratios(await scrape(admin))) == 2


async def test_an_expired_key_gets_its_own_401_and_every_expiry_is_on_metrics(
    make_gateway: Any, simulator_url: str, admin_of: Any
) -> None:
    text = (
        gateway_yaml(simulator_url)
        .replace(
            f"{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}",
            f"{{name: billing-service, sha256: {hash_key(ACME_KEY)}, expires: 2099-06-30}}",
        )
        .replace(
            f"{{name: web-frontend, sha256: {hash_key(GLOBEX_KEY)}}}",
            f"{{name: web-frontend, sha256: {hash_key(GLOBEX_KEY)},"
            " expires: 2020-01-01T00:00:00Z}",
        )
    )
    gateway: Client = await make_gateway(config=parse_config(text, "test.yaml"))
    admin = await admin_of(gateway)
    chat = "/v1/agents/ag_support/chat"
    assert (await gateway.post(chat, json={"message": "Hi"}, headers=ACME)).status == 200
    expired = await gateway.post("/v1/agents/ag_sales/chat", json={"message": "Hi"}, headers=GLOBEX)
    assert expired.status == 401
    body = await expired.json()
    assert body["error"]["message"].startswith("gateway key expired")
    assert GLOBEX_KEY not in await expired.text()
    unknown = await gateway.post(
        chat, json={"message": "Hi"}, headers={"Authorization": "Bearer gw_nobody"}
    )
    assert (await unknown.json())["error"]["message"] == "unknown or revoked gateway key"

    samples = (await scrape(admin)).samples
    expiries = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "gateway_key_expiry_timestamp_seconds"
    }
    assert expiries == {
        frozenset({("tenant", "acme"), ("key", "billing-service")}): datetime(
            2099, 6, 30, tzinfo=UTC
        ).timestamp(),
        frozenset({("tenant", "globex"), ("key", "web-frontend")}): datetime(
            2020, 1, 1, tzinfo=UTC
        ).timestamp(),
    }


@pytest.mark.parametrize(
    ("policy", "status", "state"), [("closed", 503, None), ("local", 200, "degraded")]
)
async def test_readiness_with_the_quota_backend_down_follows_the_failure_policy(
    make_gateway: Any,
    simulator_url: str,
    admin_of: Any,
    policy: str,
    status: int,
    state: str | None,
) -> None:
    """With `closed` every request would get 503: not ready, so a load balancer sends them
    elsewhere. With `local` (or `open`) it serves, degraded."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    config = parse_config(
        gateway_yaml(simulator_url)
        + f"quota: {{backend: redis, redis_url: '{dead}', on_backend_error: {policy}}}\n",
        "test.yaml",
    )
    gateway: Client = await make_gateway(config=config)
    admin = await admin_of(gateway)
    ready = await admin.get("/readyz")
    assert ready.status == status
    body = await ready.json()
    if state is None:
        assert body["error"]["message"] == (
            "the quota backend is unavailable and quota.on_backend_error is closed"
        )
    else:
        assert body["quota_state"] == state
    caller_side = await gateway.get("/readyz")
    assert caller_side.status == status
    assert "quota" not in await caller_side.text()
