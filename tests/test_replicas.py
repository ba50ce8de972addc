"""Several gateway processes sharing one Redis hold a tenant's limits exactly between them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import hash_key
from tests.conftest import ACME_KEY, GLOBEX_KEY, PLATFORM_KEY, SUPPORT_KEY, gateway_yaml
from tests.processes import Process, serving, start, stop
from tests.redis_servers import RedisClusterServers, RedisServer
from tests.secret_watch import SecretWatch

# Enough concurrent requests to slow the event loop well past a 50 ms budget (measured: 300
# did it on two replicas, 600 on one, on a 2-core machine); Redis itself stays fast.
BURST = 600
ACME_KEYS_LINE = f"    keys: [{{name: billing-service, sha256: {hash_key(ACME_KEY)}}}]\n"


@pytest.fixture(params=["redis", "cluster"])
def redis_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """One Redis, or a 3-master Redis Cluster (its nodes listed as the gateway's URLs)."""
    if request.param == "redis":
        with RedisServer(tmp_path / "redis") as server:
            yield [server.url]
    else:
        with RedisClusterServers(tmp_path / "cluster") as cluster:
            yield cluster.urls


@pytest.fixture
async def two_replicas(tmp_path: Path, redis_urls: list[str]) -> AsyncIterator[list[str]]:
    """A simulator and two `thinnest-gateway serve` processes sharing one Redis or cluster."""
    async with replicas(
        tmp_path,
        redis_urls,
        2,
        # Per day: nothing refills while the burst runs, however slow the machine is.
        acme="    limits: {requests: {per_day: 50}}\n",
        # A budget no busy CI machine overruns: a Redis call that timed out would fall back to
        # local buckets (on_backend_error: local), and exactness is the point.
        quota="timeout_ms: 2000, on_backend_error: closed",
    ) as (urls, _):
        yield urls


@pytest.mark.timeout(120)
async def test_200_requests_over_two_replicas_admit_exactly_50(
    two_replicas: list[str], secret_watch: SecretWatch
) -> None:
    headers = {"Authorization": f"Bearer {ACME_KEY}"}

    async def one(session: aiohttp.ClientSession, url: str) -> int:
        async with session.post(
            f"{url}/v1/agents/ag_support/chat", json={"message": "Hi"}, headers=headers
        ) as response:
            await response.read()
            return response.status

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, response_class=secret_watch.response_class()
    ) as session:
        statuses = await asyncio.gather(*(one(session, two_replicas[i % 2]) for i in range(200)))
    assert Counter(statuses) == {200: 50, 429: 150}


@contextlib.asynccontextmanager
async def replicas(
    tmp_path: Path,
    redis_urls: list[str],
    count: int,
    *,
    acme: str,
    globex: str = "",
    quota: str,
    replace_keys: bool = False,
) -> AsyncIterator[tuple[list[str], str]]:
    """A simulator and `count` gateway processes on one Redis (or cluster); yields their URLs
    and the simulator's. `acme` and `globex` are lines added to those tenants, `quota` to the
    quota section."""
    env = {**os.environ, "TEST_PLATFORM_KEY": PLATFORM_KEY, "TEST_SUPPORT_KEY": SUPPORT_KEY}
    sim_log = tmp_path / "simulator.log"
    sim_config = tmp_path / "sim.yaml"
    sim_config.write_text("rate_limit: {per_minute: 100000, per_day: 1000000}\n")

    async def simulate(ports: list[int]) -> Process:
        args = ["--port", str(ports[0]), "--config", str(sim_config)]
        return await start("simulate", *args, env=env, log=sim_log)

    processes: list[Process] = []
    try:
        process, (sim_port,) = await serving(
            simulate,
            ports=1,
            ready=lambda ports: f"http://127.0.0.1:{ports[0]}/healthz",
            log=sim_log,
        )
        processes.append(process)
        simulator = f"http://127.0.0.1:{sim_port}"
        urls = []
        for replica in range(count):
            config = tmp_path / f"gw{replica}.yaml"
            log = tmp_path / f"gw{replica}.log"

            async def serve(ports: list[int], config: Path = config, log: Path = log) -> Process:
                text = (
                    gateway_yaml(simulator)
                    # `replace_keys`: acme's lines bring a `keys:` list of their own.
                    .replace(ACME_KEYS_LINE if replace_keys else "\0", "", 1)
                    .replace("    agents: [ag_support]\n", f"    agents: [ag_support]\n{acme}", 1)
                    .replace('    agents: ["*"]\n', f'    agents: ["*"]\n{globex}', 1)
                )
                config.write_text(
                    text
                    + f"listen: {{host: 127.0.0.1, port: {ports[0]}}}\n"
                    + f"admin: {{host: 127.0.0.1, port: {ports[1]}}}\n"
                    + f"quota: {{backend: redis, redis_url: {json.dumps(redis_urls)}, {quota}}}\n"
                    + "logging: {level: warning}\n"
                )
                return await start("serve", "--config", str(config), env=env, log=log)

            process, (port, _) = await serving(
                serve, ports=2, ready=lambda ports: f"http://127.0.0.1:{ports[0]}/readyz", log=log
            )
            processes.append(process)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls, simulator
    finally:
        for process in processes:
            await stop(process)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("count", [1, 2], ids=["one replica", "two replicas"])
async def test_a_burst_against_a_healthy_redis_admits_exactly_the_limit(
    tmp_path: Path, count: int, secret_watch: SecretWatch
) -> None:
    """Finding 4: the default 50 ms budget and the `local` fallback. A burst slows the event
    loop, not Redis: it must not open the breaker, nor may a fallback start with full buckets."""
    # Per day: nothing refills while the test runs, however slow the machine is.
    acme = "    limits: {requests: {per_day: 50}}\n"
    globex = "    limits: {max_concurrent_streams: 2}\n"
    quota = f"on_backend_error: local, expected_replicas: {count}"
    with RedisServer(tmp_path / "redis") as server:
        async with (
            replicas(tmp_path, [server.url], count, acme=acme, globex=globex, quota=quota) as (
                urls,
                simulator,
            ),
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                response_class=secret_watch.response_class(),
            ) as session,
        ):

            async def one(
                url: str,
                headers: dict[str, str],
                body: dict[str, object],
                agent: str = "ag_support",
            ) -> int:
                async with session.post(
                    f"{url}/v1/agents/{agent}/chat", json=body, headers=headers
                ) as response:
                    if response.status != 200 or not body.get("stream"):
                        await response.read()
                    return response.status

            acme_headers = {"Authorization": f"Bearer {ACME_KEY}"}
            one_by_one = [
                await one(urls[i % count], acme_headers, {"message": "Hi"}) for i in range(50)
            ]
            assert Counter(one_by_one) == {200: 50}
            burst = await asyncio.gather(
                *(one(urls[i % count], acme_headers, {"message": "Hi"}) for i in range(BURST))
            )
            assert Counter(burst) == {429: BURST}

            await session.post(f"{simulator}/_sim/faults", json={"kind": "hold_stream"})
            globex_headers = {"Authorization": f"Bearer {GLOBEX_KEY}"}
            streams = await asyncio.gather(
                *(
                    one(
                        urls[i % count],
                        globex_headers,
                        {"message": "Hi", "stream": True},
                        "ag_sales",
                    )
                    for i in range(BURST)
                )
            )
            await session.post(f"{simulator}/_sim/release")
            assert Counter(streams) == {200: 2, 429: BURST - 2}


REPORTS_KEY = "gw_test_acme_reports_0003"


def two_services(
    tmp_path: Path, redis_urls: list[str], *, tenant: str, key_a: str
) -> contextlib.AbstractAsyncContextManager[tuple[list[str], str]]:
    """Two replicas, acme with `tenant` limits and two keys: billing-service (A, the caller
    key ACME_KEY) with `key_a` limits of its own, reports (B, REPORTS_KEY) with none."""
    acme = (
        f"    limits: {tenant}\n"
        "    keys:\n"
        f"      - {{name: billing-service, sha256: {hash_key(ACME_KEY)}, limits: {key_a}}}\n"
        f"      - {{name: reports, sha256: {hash_key(REPORTS_KEY)}}}\n"
    )
    return replicas(
        tmp_path,
        redis_urls,
        2,
        acme=acme,
        quota="timeout_ms: 2000, on_backend_error: closed",
        replace_keys=True,
    )


@pytest.mark.timeout(120)
async def test_a_keys_own_limit_and_its_tenants_hold_exactly_across_two_replicas(
    tmp_path: Path, redis_urls: list[str], secret_watch: SecretWatch
) -> None:
    """Levels: key A (a service) limited to 20 requests inside its tenant's 50, key B only by
    the tenant's: 200 concurrent requests over two replicas admit exactly 20 through A and 50
    through A and B together, on one Redis and on a Cluster (one script, one slot)."""
    async with (
        two_services(
            tmp_path,
            redis_urls,
            tenant="{requests: {per_day: 50}}",
            key_a="{requests: {per_day: 20}}",
        ) as (urls, _),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), response_class=secret_watch.response_class()
        ) as session,
    ):

        async def one(i: int) -> tuple[str, int]:
            key = ACME_KEY if i % 2 else REPORTS_KEY
            async with session.post(
                f"{urls[i % 4 // 2]}/v1/agents/ag_support/chat",
                json={"message": "Hi"},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                await response.read()
                return ("A" if key == ACME_KEY else "B"), response.status

        results = await asyncio.gather(*(one(i) for i in range(200)))
    admitted = Counter(key for key, status in results if status == 200)
    assert admitted["A"] == 20
    assert admitted["A"] + admitted["B"] == 50
    assert {status for _, status in results} == {200, 429}


@pytest.mark.timeout(120)
async def test_a_keys_own_stream_cap_and_its_tenants_hold_exactly_across_two_replicas(
    tmp_path: Path, redis_urls: list[str], secret_watch: SecretWatch
) -> None:
    """Levels for streams: key A may hold 3 streams inside its tenant's 5, key B only the
    tenant's: 50 concurrent streams through A over two replicas hold exactly 3, then 50 through
    B exactly the 2 left of the tenant's 5, on one Redis and on a Cluster."""
    async with (
        two_services(
            tmp_path,
            redis_urls,
            tenant="{max_concurrent_streams: 5}",
            key_a="{max_concurrent_streams: 3}",
        ) as (urls, simulator),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), response_class=secret_watch.response_class()
        ) as session,
    ):
        await session.post(f"{simulator}/_sim/faults", json={"kind": "hold_stream"})

        async def one(i: int, key: str) -> int:
            async with session.post(
                f"{urls[i % 2]}/v1/agents/ag_support/chat",
                json={"message": "Hi", "stream": True},
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                if response.status != 200:
                    await response.read()
                return response.status

        through_a = await asyncio.gather(*(one(i, ACME_KEY) for i in range(50)))
        through_b = await asyncio.gather(*(one(i, REPORTS_KEY) for i in range(50)))
        await session.post(f"{simulator}/_sim/release")
    assert Counter(through_a) == {200: 3, 429: 47}  # the key's own cap
    assert Counter(through_b) == {200: 2, 429: 48}  # what the tenant's 5 leave
