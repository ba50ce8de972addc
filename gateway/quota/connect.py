"""The one Redis client, built so that redis-py's defaults cannot stall a request.

Every bound is the admission budget: connect and read timeouts, the wait for a pooled
connection; and no retries, because a retry after a timeout would double the worst case and the
circuit breaker decides what happens next. One URL is a single server (or a proxy in front of
many); several URLs are the startup nodes of a Redis Cluster; one `redis+sentinel://` URL names
the Sentinels that know a replicated master. A URL may carry a password, so no URL (nor any part
of one) ever goes into an error message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from gateway.config import Quota
from gateway.errors import ConfigError

MAX_CONNECTIONS = 64  # per node; waiting beyond it is bounded by the budget
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[[user]:password@]host:port[,host:port...]/master-name[/db]"
_ESCAPE = " (a / ? or # in a password must be percent-encoded)"
_MASTER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


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
    if len(urls) == 1 and is_sentinel_url(urls[0]):
        return _sentinel_master(urls[0], budget, bounded)
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
        if is_sentinel_url(url):
            raise ConfigError(f"quota.redis_url[{i}]: a {SENTINEL_SCHEME}:// URL stands alone")
        problem = redis_url_problem(url, cluster_node=True)
        if problem is not None:
            raise ConfigError(f"quota.redis_url[{i}]: {problem}")
        parsed = parse_url(url)
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


def redis_url_problem(url: str, *, cluster_node: bool) -> str | None:
    """Why `url` cannot be used (quoting no part of it), or None. The configuration asks this
    at load time, so `check-config` finds what connecting would."""
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return str(exc)
        return None
    if url.partition("://")[0].lower() not in ("redis", "rediss", "unix"):
        return f"expected a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL"
    try:
        parsed = parse_url(url)
    except ValueError:
        return "not a usable Redis URL" + _ESCAPE
    if cluster_node and "path" in parsed:
        return "cluster nodes need redis:// or rediss://"
    return None


# --- Sentinel ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed `redis+sentinel://` URL. The credentials are the master's (the Sentinels
    themselves are asked without a password)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def peer(config: Quota) -> str:
    """Where the quota backend is, for a log line: hosts and ports (a socket's path), the
    Sentinels and their master's name; never a password, a user or a query."""
    described = []
    for secret in config.redis_url:
        url = secret.reveal()
        if is_sentinel_url(url):
            try:
                target = parse_sentinel_url(url)
            except ValueError:
                return "redis (sentinel)"
            hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
            return f"sentinel {hosts} master {target.master}"
        try:
            parts = urlsplit(url)
            described.append(
                parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
            )
        except ValueError:
            described.append("redis")
    return ",".join(described)


def is_sentinel_url(url: str) -> bool:
    return url[: len(SENTINEL_SCHEME) + 3].lower() == f"{SENTINEL_SCHEME}://"


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[[user]:password@]host1:26379,host2:26379/<master-name>[/db]`.

    Raises ValueError with a message that quotes no part of the URL: a password with an
    unescaped `/`, `?` or `#` would land in whichever part is quoted."""
    if not is_sentinel_url(url):
        raise ValueError(f"expected a {SENTINEL_FORM} URL")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"not a usable URL; expected {SENTINEL_FORM}{_ESCAPE}") from None
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"takes no ?query or #fragment{_ESCAPE}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = tuple(
        _sentinel_address(i, item) for i, item in enumerate(hostlist.split(","), start=1)
    )
    segments = parts.path.split("/")[1:] if parts.path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments:
        raise ValueError(f"names no master: expected {SENTINEL_FORM}")
    master = unquote(segments[0])
    if not _MASTER_NAME.fullmatch(master):
        raise ValueError(
            "the master name must be 1 to 128 letters, digits, _ . : or - "
            "(the name in the Sentinels' `sentinel monitor <name>`)"
        )
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit() or not segments[1].isascii() or len(segments[1]) > 5:
            raise ValueError("the database after the master name must be a number")
        db = int(segments[1])
    elif len(segments) > 2:
        raise ValueError(f"too many path parts: expected {SENTINEL_FORM}")
    return SentinelTarget(sentinels, master, db, username, password)


def _sentinel_address(index: int, item: str) -> tuple[str, int]:
    where = f"sentinel #{index}"
    if item.startswith("["):  # [::1]:26379
        host, bracket, rest = item[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError(f"{where}: expected [ipv6]:port")
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = item.partition(":")
        if colon and not port_text:
            raise ValueError(f"{where}: a ':' without a port")
    if not host:
        raise ValueError(f"{where}: no host; expected {SENTINEL_FORM}{_ESCAPE}")
    if any(c in host for c in " \t@/?#[]"):
        raise ValueError(f"{where}: not a host name or address")
    if not port_text:
        return host, SENTINEL_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= 65535:
        raise ValueError(f"{where}: the port must be a number from 1 to 65535{_ESCAPE}")
    return host, int(port_text)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's connections: found through the Sentinels, at most `max_connections`, and
    waiting for a free one up to `timeout` (like the single server's BlockingConnectionPool)
    instead of failing at once as the plain SentinelConnectionPool does."""


class SentinelRedis(Redis):
    """The master's client; closing it also closes the connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def _sentinel_master(url: str, budget: float, bounded: dict[str, Any]) -> Redis:
    try:
        target = parse_sentinel_url(url)
    except ValueError as exc:
        raise ConfigError(f"quota.redis_url: {exc}") from None
    # redis-py asks the Sentinels one after another, only when it opens a connection to the
    # master (a cold pool, or after a failover). Each Sentinel gets a share of the budget, so
    # a dead or hung one (a host gone with its master) leaves time to ask the next.
    share = budget / (len(target.sentinels) + 1)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py: untyped
        target.sentinels,
        sentinel_kwargs={
            "socket_timeout": share,
            "socket_connect_timeout": share,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": MAX_CONNECTIONS,
        },
    )
    client: Redis = sentinel.master_for(
        target.master,
        redis_class=SentinelRedis,
        connection_pool_class=BlockingSentinelPool,
        max_connections=MAX_CONNECTIONS,
        timeout=budget,
        db=target.db,
        username=target.username,
        password=target.password,
        **bounded,
    )
    return client
