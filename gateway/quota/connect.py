"""The one Redis client, built so that redis-py's defaults cannot stall a request.

Every bound is the admission budget: connect and read timeouts, the wait for a pooled
connection; and no retries, because a retry after a timeout would double the worst case and the
circuit breaker decides what happens next. One URL is a single server (or a proxy in front of
many); several URLs are the startup nodes of a Redis Cluster. A URL may carry a password, so no
URL ever goes into an error message.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.config import Quota
from gateway.errors import ConfigError

MAX_CONNECTIONS = 64  # per node; waiting beyond it is bounded by the budget


def connect(config: Quota) -> Redis | RedisCluster:
    """The client for `config.redis_url`; connects lazily, on first use."""
    if not config.redis_url:
        raise ConfigError("quota.redis_url: is required when quota.backend is redis")
    budget = config.timeout_ms / 1000
    bounded: dict[str, Any] = {
        "socket_timeout": budget,
        "socket_connect_timeout": budget,
        "retry": Retry(NoBackoff(), 0),
    }
    urls = [secret.reveal() for secret in config.redis_url]
    if len(urls) == 1:
        try:
            pool = BlockingConnectionPool.from_url(
                urls[0], max_connections=MAX_CONNECTIONS, timeout=budget, **bounded
            )
        except ValueError:
            raise ConfigError("quota.redis_url: not a usable Redis URL") from None
        return Redis.from_pool(pool)

    nodes: list[ClusterNode] = []
    for i, url in enumerate(urls):
        try:
            parsed = parse_url(url)
        except ValueError:
            raise ConfigError(f"quota.redis_url[{i}]: not a usable Redis URL") from None
        if "path" in parsed:
            raise ConfigError(f"quota.redis_url[{i}]: cluster nodes need redis:// or rediss://")
        nodes.append(ClusterNode(parsed.get("host", "localhost"), parsed.get("port", 6379)))
    first = parse_url(urls[0])
    return RedisCluster(
        startup_nodes=nodes,
        username=first.get("username"),
        password=first.get("password"),
        ssl=first.get("connection_class") is SSLConnection,
        max_connections=MAX_CONNECTIONS,
        **bounded,
    )
