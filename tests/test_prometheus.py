"""End to end with a real Prometheus: it scrapes a real `serve` process's admin port, and the
tokens it reports per tenant are exactly the tokens upstream reported to the callers.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ACME_KEY, GLOBEX_KEY, sse_events
from tests.processes import Running, gateway_and_simulator, wait_healthy
from tests.redis_servers import free_port
from tests.secret_watch import SecretWatch

JOB = "thinnest-gateway"
TOKENS_BY_TENANT = 'sum by (tenant) (gateway_tokens_total{kind="total"})'
SCRAPE_WAIT = 20.0  # seconds to wait for Prometheus to have scraped what we sent
POLL = 0.25


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[Running]:
    """`simulate` and `serve` as real processes; the gateway's admin port serves /metrics."""
    async with gateway_and_simulator(tmp_path, extra="logging: {level: warning}\n") as running:
        yield running


@pytest.fixture
async def prometheus(tmp_path: Path, gateway_process: Running) -> AsyncIterator[str]:
    """A real Prometheus scraping the gateway's admin port every second; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make test` installs Debian's `prometheus`")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    metrics_path: /metrics\n"
        f"    static_configs: [{{targets: ['{gateway_process.admin.removeprefix('http://')}']}}]\n"
    )
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={url.removeprefix('http://')}",
            stdout=out,
            stderr=out,
        )
    try:
        await wait_healthy(f"{url}/-/ready", process, log)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                process.kill()
                await process.wait()


def reported_total(body: dict[str, Any]) -> int:
    """The total tokens upstream reported in a JSON body or a `done` event."""
    usage = body.get("usage")
    total = usage["total_tokens"] if isinstance(usage, dict) else body["tokens_used"]
    assert isinstance(total, int) and total > 0, body
    return total


async def query(
    session: aiohttp.ClientSession, url: str, promql: str, *, by: str
) -> dict[str, str]:
    """An instant query's vector as {value of label `by`: sample value}."""
    async with session.get(f"{url}/api/v1/query", params={"query": promql}) as response:
        assert response.status == 200, await response.text()
        result = (await response.json())["data"]["result"]
    return {item["metric"][by]: item["value"][1] for item in result}


async def test_prometheus_scrapes_the_tokens_upstream_reported_per_tenant(
    gateway_process: Running, prometheus: str, tmp_path: Path, secret_watch: SecretWatch
) -> None:
    chat = f"{gateway_process.url}/v1/agents/{{}}/chat"
    expected = {"acme": 0, "globex": 0}
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        for i in range(3):
            async with session.post(
                chat.format("ag_support"),
                json={"message": f"Where is my invoice number {i}?"},
                headers={"Authorization": f"Bearer {ACME_KEY}"},
            ) as response:
                assert response.status == 200, await response.text()
                expected["acme"] += reported_total(await response.json())
        for i in range(2):
            async with session.post(
                chat.format("ag_sales"),
                json={"message": f"Quote me {i + 2} seats, please.", "stream": True},
                headers={"Authorization": f"Bearer {GLOBEX_KEY}"},
            ) as response:
                assert response.status == 200, await response.text()
                events = sse_events(await response.read())
            done = [event for event in events if event.get("type") == "done"]
            assert len(done) == 1, events
            expected["globex"] += reported_total(done[0])

        want = {tenant: str(total) for tenant, total in expected.items()}
        seen: dict[str, str] = {}
        for _ in range(int(SCRAPE_WAIT / POLL)):
            seen = await query(session, prometheus, TOKENS_BY_TENANT, by="tenant")
            if seen == want:
                break
            await asyncio.sleep(POLL)  # waiting on Prometheus's next scrape: no event to await
        log = (tmp_path / "prometheus.log").read_text()
        assert seen == want, f"Prometheus never saw {want} (last {seen}):\n{log[-3000:]}"
        assert await query(session, prometheus, f'up{{job="{JOB}"}}', by="job") == {JOB: "1"}
