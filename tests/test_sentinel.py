"""Quotas on a Redis master watched by Sentinels: exact limits, a failover, a password.

The gateway names the Sentinels in one `redis+sentinel://` URL and asks them for the master
whenever it opens a connection; after a failover it finds the promoted replica by itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Config, Quota, Secret, parse_config
from gateway.errors import ConfigError
from gateway.quota.connect import (
    MAX_CONNECTIONS,
    BlockingSentinelPool,
    SentinelRedis,
    connect,
    parse_sentinel_url,
)
from tests.conftest import ACME, GatewayFactory, gateway_yaml
from tests.redis_servers import RedisSentinelServers, free_port
from tests.secret_watch import SecretWatch

PASSWORD = "hunter2secret"  # in conftest's SECRETS_IN_PLAY: the whole run is searched for it
PER_DAY = 5
Gateway = TestClient[web.Request, web.Application]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[RedisSentinelServers]:
    """A master, a replica and three Sentinels (quorum 2)."""
    with RedisSentinelServers(tmp_path / "sentinel", sentinels=3) as servers:
        yield servers


def sentinel_config(
    simulator_url: str, redis_url: str | list[str], *, timeout_ms: int = 1000
) -> Config:
    """acme may make PER_DAY requests a day (nothing refills during a test); Redis trouble
    answers 503, so a request is never admitted on anything but Redis's word."""
    quota = (
        f"quota: {{backend: redis, redis_url: {json.dumps(redis_url)}, "
        f"timeout_ms: {timeout_ms}, on_backend_error: closed}}\n"
    )
    text = gateway_yaml(simulator_url, quota).replace(
        "    agents: [ag_support]\n",
        f"    agents: [ag_support]\n    limits: {{requests: {{per_day: {PER_DAY}}}}}\n",
        1,
    )
    return parse_config(text, "test.yaml")


async def chat(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    async with gateway.post(
        "/v1/agents/ag_support/chat", json={"message": "Hi"}, headers=ACME
    ) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_twenty_requests_over_two_gateways_admit_exactly_the_limit(
    sentinels: RedisSentinelServers, make_gateway: GatewayFactory, simulator_url: str
) -> None:
    config = sentinel_config(simulator_url, sentinels.url())
    gateways = [await make_gateway(config=config), await make_gateway(config=config)]
    statuses = await asyncio.gather(*(chat(gateways[i % 2]) for i in range(20)))
    assert Counter(status for status, _ in statuses) == {200: PER_DAY, 429: 20 - PER_DAY}
    # The buckets live on the master the Sentinels name, and the replica has them too.
    with sentinels.client(sentinels.master) as master:
        assert master.wait(1, 2000) == 1
    with sentinels.client(sentinels.replica) as replica:
        assert replica.exists("tg:{acme}:rpd") == 1


async def test_after_a_failover_the_promoted_replica_keeps_the_count(
    sentinels: RedisSentinelServers, make_gateway: GatewayFactory, simulator_url: str
) -> None:
    gateway = await make_gateway(config=sentinel_config(simulator_url, sentinels.url()))
    for _ in range(3):
        assert (await chat(gateway))[0] == 200
    # What is guaranteed to survive a failover is what the replica acknowledged.
    with sentinels.client(sentinels.master) as master:
        assert master.wait(1, 2000) == 1

    old = sentinels.kill_master()
    killed = time.monotonic()
    status, body = await chat(gateway)
    assert (status, body["error"]["code"]) == (503, "unavailable")

    # Ask all through the failover: the only answers are 503 or the right one.
    failover = asyncio.create_task(asyncio.to_thread(sentinels.wait_for_failover, old))
    during: list[int] = []
    while not failover.done():
        during.append((await chat(gateway))[0])
        await asyncio.sleep(0.1)
    new = await failover
    promoted = time.monotonic() - killed
    assert new is sentinels.replica

    after: list[int] = []
    recovered = None
    deadline = time.monotonic() + 10
    while (not after or after[-1] != 429) and time.monotonic() < deadline:
        status, body = await chat(gateway)
        after.append(status)
        if status != 503 and recovered is None:
            recovered = time.monotonic() - killed
        await asyncio.sleep(0.05)
    answered = [s for s in during + after if s != 503]
    # Exactly the two requests left of the day, wherever they fell, then refusals.
    assert answered[:2] == [200, 200] and set(answered[2:]) == {429}, (during, after)
    assert body["error"]["message"].startswith("rate limit exceeded: requests per day")
    assert set(during) <= {200, 429, 503}
    assert promoted < 30
    print(f"promoted {promoted:.1f} s, answering {recovered:.1f} s after the kill; {during=}")


async def test_a_hung_sentinel_first_in_the_list_leaves_time_to_ask_the_next(
    sentinels: RedisSentinelServers, make_gateway: GatewayFactory, simulator_url: str
) -> None:
    """A host gone with its master and its Sentinel: each Sentinel gets a share of the
    budget, so the one that never answers does not use all of it, every time."""
    gateway = await make_gateway(
        config=sentinel_config(simulator_url, sentinels.url(), timeout_ms=200)
    )
    assert (await chat(gateway))[0] == 200  # the first Sentinel answered: first in line
    first = sentinels.sentinels[0]
    first.freeze()
    try:
        old = sentinels.kill_master()
        await asyncio.to_thread(sentinels.wait_for_failover, old)
        statuses: list[int] = []
        deadline = time.monotonic() + 10
        while (not statuses or statuses[-1] != 200) and time.monotonic() < deadline:
            statuses.append((await chat(gateway))[0])
            await asyncio.sleep(0.1)
        assert statuses[-1] == 200, statuses
    finally:
        first.thaw()


async def test_a_password_on_the_master_works_and_is_never_shown(
    tmp_path: Path,
    make_gateway: GatewayFactory,
    simulator_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    secret_watch: SecretWatch,
) -> None:
    with RedisSentinelServers(tmp_path / "auth", sentinels=1, password=PASSWORD) as servers:
        monkeypatch.setenv("TEST_QUOTA_URL", servers.url())
        config = sentinel_config(simulator_url, "${TEST_QUOTA_URL}")
        assert PASSWORD not in repr(config)
        gateway = await make_gateway(config=config)
        statuses = [(await chat(gateway))[0] for _ in range(PER_DAY + 1)]
        assert statuses == [200] * PER_DAY + [429]

        # A wrong password: the gateway starts, says it is not ready (on_backend_error is
        # closed: every request would be refused), answers 503 — and names neither password
        # anywhere.
        monkeypatch.setenv("TEST_QUOTA_URL", servers.url(password=f"not-{PASSWORD}"))
        wrong = await make_gateway(config=sentinel_config(simulator_url, "${TEST_QUOTA_URL}"))
        async with wrong.get("/readyz") as response:
            assert response.status == 503
            assert (await response.json())["error"]["message"] == "not ready"
        status, body = await chat(wrong)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert PASSWORD not in json.dumps(body)

        # The master gone: errors on the way (before the Sentinel fails over) say nothing.
        servers.kill_master()
        status, body = await chat(gateway)
        assert PASSWORD not in json.dumps(body)

    printed = capsys.readouterr()
    assert "quota backend failed" in printed.out + printed.err
    assert PASSWORD not in printed.out + printed.err
    logs = sorted((tmp_path / "auth").rglob("*.log"))
    assert len(logs) == 3 and all(PASSWORD not in p.read_text(errors="replace") for p in logs)
    index = secret_watch.secrets.index(PASSWORD)
    assert not [found for found in secret_watch.found if found.startswith(f"secret #{index} ")]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:{pw}@127.0.0.1:26379", "names no master"),
        ("redis+sentinel://:{pw}@127.0.0.1:port/mymaster", "sentinel #1: the port must be"),
        ("redis+sentinel://:{pw}@h1:26379,,h3:26379/mymaster", "sentinel #2: no host"),
        ("redis+sentinel://:{pw}@h1:26379/mymaster/zero", "the database after the master"),
        ("redis+sentinel://:{pw}@h1:26379/mymaster/0/1", "too many path parts"),
        ("redis+sentinel://:{pw}@h1:26379/my master", "the master name must be"),
        ("redis+sentinel://:{pw}@h1:26379/mymaster?ssl=true", "takes no ?query"),
        ("redis+sentinel://:{pw}/x@h1:26379/mymaster", "sentinel #1: no host"),
        ("redis+sentinel://:{pw}@[::1:26379/mymaster", "not a usable URL"),
    ],
)
def test_a_malformed_sentinel_url_names_the_yaml_path_and_not_the_password(
    url: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        sentinel_config("http://127.0.0.1:9", url.format(pw=PASSWORD))
    message = str(caught.value)
    assert message.startswith(f"test.yaml:17: quota.redis_url: {problem}"), message
    assert PASSWORD not in message and "h1" not in message


def test_a_sentinel_url_stands_alone() -> None:
    urls = ["redis://127.0.0.1:6379", f"redis+sentinel://:{PASSWORD}@h1/mymaster"]
    with pytest.raises(ConfigError) as caught:
        sentinel_config("http://127.0.0.1:9", urls)
    message = str(caught.value)
    assert message.startswith("test.yaml:17: quota.redis_url[1]: a redis+sentinel:// URL stands")
    assert PASSWORD not in message


def test_the_url_names_sentinels_master_database_and_credentials() -> None:
    target = parse_sentinel_url("redis+sentinel://us%3Aer:p%2Fw%40d@h1,[::1]:26380/cache-1/3/")
    assert target.sentinels == (("h1", 26379), ("::1", 26380))
    assert (target.master, target.db, target.username, target.password) == (
        "cache-1",
        3,
        "us:er",
        "p/w@d",
    )
    assert "p/w@d" not in repr(target)
    bare = parse_sentinel_url("REDIS+SENTINEL://h1:1/m")
    assert (bare.username, bare.password, bare.db) == (None, None, 0)


async def test_the_client_has_the_same_bounds_as_the_others() -> None:
    """Budget-long socket timeouts to the master, a share of it per Sentinel, no retries, a
    bounded pool that waits at most the budget; closing it closes the Sentinels' sockets."""
    hosts = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    url = f"redis+sentinel://:{PASSWORD}@{hosts}/mymaster/2"
    client = connect(Quota(backend="redis", redis_url=(Secret(url),), timeout_ms=200))
    assert isinstance(client, SentinelRedis)
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool)
    assert (pool.max_connections, pool.timeout) == (MAX_CONNECTIONS, 0.2)
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.2, 0.2)
    assert (kwargs["db"], kwargs["password"], kwargs["retry"].get_retries()) == (2, PASSWORD, 0)
    for sentinel in pool.sentinel_manager.sentinels:
        own = sentinel.connection_pool.connection_kwargs
        assert own["socket_timeout"] == own["socket_connect_timeout"] == pytest.approx(0.05)
        assert own["retry"].get_retries() == 0 and own["password"] is None
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError) as caught:  # no Sentinel listens
        await client.ping()
    assert time.monotonic() - started < 1.0
    assert PASSWORD not in str(caught.value)
    await client.aclose()
