"""YAML configuration, parsed once into frozen, typed objects.

This module and gateway/config_file.py (which reads the file: strict YAML, lines, secret
references) are the only ones that read the environment or secret files. Every problem stops
start-up with one `ConfigError` naming the file, the line and the YAML path
(`gw.yaml:12: tenants.acme.keys[0].sha256: expected 64 hex characters`).
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yarl import URL

from gateway.config_file import Place, Problem, Section, kind, read_yaml, resolve
from gateway.errors import ConfigError
from gateway.sse import DEFAULT_MAX_EVENT

ALL_AGENTS = "*"
_SHA256 = re.compile(r"[0-9a-f]{64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
TENANT_LEVEL_KEY = "all"  # a metric's `key` label for the tenant's own level, never a key
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # an HTTP token


class Secret:
    """A value that must never be printed: repr and str show only that it is set."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ListenTLS:
    """The caller port's certificate chain and key (PEM files), re-read on SIGHUP."""

    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class Listen:
    host: str = "0.0.0.0"  # the caller port serves other hosts by design
    port: int = 8080
    tls: ListenTLS | None = None  # the caller port only; None: plain HTTP
    # The caller port only: connections held at once, past which new ones are closed at
    # once. None: derived from the descriptor limit at start-up (gateway/edge.py).
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `first_byte` runs until upstream's headers, `idle` between stream chunks."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 30.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 2
    backoff: float = 0.2
    budget: float = 5.0


@dataclass(frozen=True, slots=True)
class Limit:
    """Token buckets: `per_minute` has capacity `burst` (or per_minute), `per_day` per_day.

    None means unlimited.
    """

    per_minute: int | None = None
    per_day: int | None = None
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLimit:
    per_minute: int | None = None
    per_day: int | None = None
    burst: int | None = None
    reserve: int = 500


DEFAULT_BASE_URL = URL("https://api.thinnest.ai")


@dataclass(frozen=True, slots=True)
class UpstreamRateLimits:
    """Upstream's own per-key request limit, kept by the gateway for all replicas."""

    requests: Limit = Limit()
    max_wait: float = 2.0  # seconds a request may queue for a slot before its 429


@dataclass(frozen=True, slots=True)
class Breaker:
    failures: int = 5  # consecutive failed calls that open it
    cooldown: float = 10.0  # seconds open before one probe goes through


@dataclass(frozen=True, slots=True)
class Upstream:
    base_url: URL = DEFAULT_BASE_URL
    api_key: Secret | None = None
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    rate_limits: UpstreamRateLimits = UpstreamRateLimits()
    breaker: Breaker = Breaker()
    # An egress proxy URL (it may carry credentials), or "env": HTTPS_PROXY, HTTP_PROXY and
    # NO_PROXY as aiohttp's trust_env reads them. None: connect directly.
    proxy: Secret | Literal["env"] | None = None
    ca_file: str | None = None  # PEM trust anchors added to the system's, not replacing them


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    api_key: Secret | None = None
    rate_limits: Limit | None = None  # its own key's limit, if it differs from upstream's


# Bounds on what upstream can make the gateway hold or read (limits.*, quota.drain_max_bytes).
MAX_ANSWER_BYTES = 8 * 2**20
MAX_EVENT_BYTES = DEFAULT_MAX_EVENT
DRAIN_MAX_BYTES = 16 * 2**20


@dataclass(frozen=True, slots=True)
class Quota:
    backend: Literal["memory", "redis"] = "memory"
    redis_url: tuple[Secret, ...] = ()
    on_backend_error: Literal["local", "open", "closed"] = "local"
    timeout_ms: int = 50
    expected_replicas: int = 1
    drain_timeout: float = 30.0
    # A drain stops reading a stream after this many bytes (charged as one it could not finish).
    drain_max_bytes: int = DRAIN_MAX_BYTES
    # Abandoned exchanges read on at once to charge their exact tokens (each tenant at most
    # an eighth of them); past that they are charged by the admission's rule without reading.
    max_drains: int = 1024
    # Where budgets' days and months begin, and the ledger's days (an IANA zone name).
    timezone: str = "UTC"
    usage_retention_days: int = 400


@dataclass(frozen=True, slots=True)
class TenantLimits:
    requests: Limit = Limit()
    tokens: TokenLimit = TokenLimit()
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class Amount:
    """How much per calendar period (None: no budget for that period)."""

    per_day: int | None = None
    per_month: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """Calendar budgets: reset at midnight and on the 1st in `quota.timezone`."""

    tokens: Amount = Amount()
    requests: Amount = Amount()
    warn_at: tuple[float, ...] = ()  # fractions used, ascending: logged once per period

    @property
    def empty(self) -> bool:
        return self.tokens == Amount() and self.requests == Amount()


@dataclass(frozen=True, slots=True)
class EndUser:
    """A level below the key: each value of `header` (set by the service) is its own bucket."""

    header: str
    limits: TenantLimits = TenantLimits()
    budget: Budget = Budget()


@dataclass(frozen=True, slots=True)
class TenantKey:
    name: str
    sha256: str
    # The key's (a service's) own limits and budget inside its tenant's: a request passes both.
    limits: TenantLimits | None = None
    budget: Budget | None = None
    expires: float | None = None  # epoch seconds from which the key is refused


SessionIsolation = Literal["tenant", "key", "off"]
"""Whose conversations a session id names: the tenant's, each key's (service's), or upstream's
as sent (see gateway/sessions.py)."""
_ISOLATION_FLAGS: dict[bool, SessionIsolation] = {True: "tenant", False: "off"}


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    keys: tuple[TenantKey, ...]
    agents: frozenset[str]
    limits: TenantLimits = TenantLimits()
    session_isolation: SessionIsolation = "tenant"
    budget: Budget = Budget()
    end_user: EndUser | None = None

    def may_use(self, agent_id: str) -> bool:
        return ALL_AGENTS in self.agents or agent_id in self.agents

    def key(self, name: str) -> TenantKey | None:
        for key in self.keys:
            if key.name == name:
                return key
        return None


@dataclass(frozen=True, slots=True)
class Streams:
    """Event streams on their way to the caller."""

    # Seconds of upstream silence before an SSE comment line (`: keep-alive`) goes to the
    # caller, so idle timeouts on the way (load balancers, proxies) do not cut it; 0: never.
    heartbeat: float = 15.0


@dataclass(frozen=True, slots=True)
class Logging:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 65536
    # Upstream's side: a JSON answer is read whole, so it is capped; one SSE event likewise
    # (longer ones than sse.MAX_EVENT go on in pieces, but an endless one would never end).
    max_answer_bytes: int = MAX_ANSWER_BYTES
    max_event_bytes: int = MAX_EVENT_BYTES


@dataclass(frozen=True, slots=True)
class Tracing:
    """OpenTelemetry spans, exported over OTLP/HTTP to `otlp_endpoint` (None: no spans; W3C
    trace context is passed upstream either way, see gateway/tracing.py)."""

    otlp_endpoint: URL | None = None
    sample_ratio: float = 1.0  # of the traces the gateway starts; a caller's decision stands


ADMIN_DEFAULT = Listen(host="127.0.0.1", port=9091)


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = Listen()
    admin: Listen = ADMIN_DEFAULT
    upstream: Upstream = Upstream()
    agents: Mapping[str, Agent] = field(default_factory=dict)
    quota: Quota = Quota()
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    logging: Logging = Logging()
    limits: Limits = Limits()
    streams: Streams = Streams()
    shutdown_grace: float = 30.0
    tracing: Tracing = Tracing()
    source: str = "<memory>"


# --- parsing (the file is read by gateway/config_file.py) --------------------------------


def _listen(s: Section, default: Listen, *, caller: bool = False) -> Listen:
    """`caller`: the caller port's section, which also takes `tls` and `max_connections`."""
    listen = Listen(
        host=s.text("host", default.host),
        port=s.whole("port", default.port),
        tls=_listen_tls(s.section("tls")) if caller and s.has("tls") else None,
        max_connections=s.whole("max_connections", None, minimum=1) if caller else None,
    )
    if listen.port > 65535:
        raise Problem(s.at("port"), f"must be at most 65535, got {listen.port}")
    s.done()
    return listen


_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})


def _ports_apart(listen_s: Section, listen: Listen, admin_s: Section, admin: Listen) -> None:
    """The caller port and the admin port cannot be one socket: refused here, by name, rather
    than by a bind error at start-up (or by metrics served to callers)."""
    hosts = {listen.host.lower(), admin.host.lower()}
    if listen.port != admin.port or listen.port == 0:
        return
    if len(hosts) > 1 and not hosts & _ANY_ADDRESS:
        return
    if not admin_s.has("port"):
        raise Problem(
            listen_s.at("port"),
            f"{listen.port} is the admin port too (admin.port's default), on the same "
            "address; set admin.port to another port",
        )
    where = f"line {listen_s.at('port').line}" if listen_s.has("port") else "its default"
    raise Problem(
        admin_s.at("port"),
        f"{admin.port} is listen.port too ({where}), on the same address; "
        "the admin port needs a port of its own",
    )


def _listen_tls(s: Section) -> ListenTLS:
    # Loaded here once, so check-config and a SIGHUP refuse a bad pair before it serves
    # (imported late: gateway/tls.py imports this module).
    from gateway.tls import server_context

    tls = ListenTLS(cert_file=_readable(s, "cert_file"), key_file=_readable(s, "key_file"))
    s.done()
    try:
        server_context(tls)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise Problem(s.place, f"cannot load the certificate and key: {_tls_reason(exc)}") from None
    return tls


def _readable(s: Section, key: str) -> str:
    """A file's path that can be opened now (TLS material: it is read by the ssl module)."""
    path = s.text(key)
    try:
        Path(path).open("rb").close()
    except OSError as exc:
        raise Problem(s.at(key), f"cannot read {path}: {exc.strerror}") from None
    return path


def _tls_reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _proxy(s: Section) -> Secret | Literal["env"] | None:
    """`upstream.proxy`: `env`, or an http(s) URL; no message quotes it (it may hold a
    password)."""
    value = s.text("proxy", "")
    if not value:
        return None
    if value == "env":
        return "env"
    url = _url(value)
    if url is None or url.scheme not in ("http", "https") or not url.host or url.path != "/":
        raise Problem(
            s.at("proxy"), "expected env or a proxy URL such as http://proxy.example:3128"
        )
    return Secret(value)


def _ca_file(s: Section) -> str | None:
    if not s.has("ca_file"):
        return None
    path = _readable(s, "ca_file")
    from gateway.tls import client_context  # imported late: gateway/tls.py imports this module

    try:
        client_context(path)
    except (OSError, ValueError) as exc:
        raise Problem(s.at("ca_file"), f"cannot load trust anchors: {_tls_reason(exc)}") from None
    return path


def _limit(s: Section) -> Limit:
    limit = Limit(
        per_minute=s.whole("per_minute", None, minimum=1),
        per_day=s.whole("per_day", None, minimum=1),
        burst=s.whole("burst", None, minimum=1),
    )
    s.done()
    return limit


def _upstream_rate_limits(s: Section) -> UpstreamRateLimits:
    max_wait = s.number("max_wait", 2.0, positive=False)
    return UpstreamRateLimits(requests=_limit(s), max_wait=max_wait)


def _token_limit(s: Section) -> TokenLimit:
    limit = TokenLimit(
        per_minute=s.whole("per_minute", None, minimum=1),
        per_day=s.whole("per_day", None, minimum=1),
        burst=s.whole("burst", None, minimum=1),
        reserve=s.whole("reserve", 500),
    )
    s.done()
    return limit


def _url(text: str) -> URL | None:
    try:
        return URL(text)
    except ValueError:  # e.g. an unclosed [ipv6]
        return None


def _secret(s: Section, key: str) -> Secret | None:
    value = s.secret(key)
    return None if value is None else Secret(value)


def _upstream(s: Section) -> Upstream:
    url = _url(s.text("base_url", "https://api.thinnest.ai"))
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise Problem(
            s.at("base_url"), f"expected an http:// or https:// URL, got {s.quoted('base_url')}"
        )
    t, r, b = s.section("timeouts"), s.section("retries"), s.section("breaker")
    upstream = Upstream(
        base_url=url,
        api_key=_secret(s, "api_key"),
        timeouts=Timeouts(
            connect=t.number("connect", 5.0),
            first_byte=t.number("first_byte", 60.0),
            idle=t.number("idle", 30.0),
            total=t.number("total", 600.0),
        ),
        retries=Retries(
            attempts=r.whole("attempts", 2),
            backoff=r.number("backoff", 0.2, positive=False),
            budget=r.number("budget", 5.0),
        ),
        rate_limits=_upstream_rate_limits(s.section("rate_limits")),
        breaker=Breaker(
            failures=b.whole("failures", 5, minimum=1),
            cooldown=b.number("cooldown", 10.0),
        ),
        proxy=_proxy(s),
        ca_file=_ca_file(s),
    )
    t.done()
    r.done()
    b.done()
    s.done()
    return upstream


def _agents(root: Section, upstream: Upstream) -> dict[str, Agent]:
    agents = {}
    for agent_id, s in root.entries("agents"):
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise Problem(s.place, "agent ids are letters, digits, _ and - (at most 128)")
        limits = _limit(s.section("rate_limits")) if s.get("rate_limits") is not None else None
        agent = Agent(id=agent_id, api_key=_secret(s, "api_key"), rate_limits=limits)
        s.done()
        if agent.api_key is None and upstream.api_key is None:
            raise Problem(s.at("api_key"), "no upstream key: set it here or upstream.api_key")
        agents[agent_id] = agent
    return agents


def _quota(s: Section) -> Quota:
    # The parser of the Sentinel URL lives with the client it builds (imported late: that
    # module imports this one).
    from gateway.quota.connect import SENTINEL_SCHEME, is_sentinel_url, redis_url_problem

    backend = s.choice("backend", "memory", ("memory", "redis"))
    items = s.many("redis_url")
    urls: list[Secret] = []
    for place, item in items:
        if not isinstance(item, str):
            raise Problem(place, f"expected a redis:// URL, got {kind(item)}")
        value = resolve(place, item)
        # Messages quote no part of a URL: it may carry a password.
        if is_sentinel_url(value) and len(items) > 1:
            raise Problem(place, f"a {SENTINEL_SCHEME}:// URL stands alone (one URL, not a list)")
        problem = redis_url_problem(value, cluster_node=len(items) > 1)
        if problem is not None:
            raise Problem(place, problem)
        urls.append(Secret(value))  # URLs may carry a password
    if backend == "redis" and not urls:
        raise s.missing("redis_url", "is required when quota.backend is redis")
    quota = Quota(
        backend=backend,
        redis_url=tuple(urls),
        on_backend_error=s.choice("on_backend_error", "local", ("local", "open", "closed")),
        timeout_ms=s.whole("timeout_ms", 50, minimum=1),
        expected_replicas=s.whole("expected_replicas", 1, minimum=1),
        drain_timeout=s.number("drain_timeout", 30.0),
        drain_max_bytes=s.whole("drain_max_bytes", DRAIN_MAX_BYTES, minimum=1024),
        max_drains=s.whole("max_drains", 1024, minimum=1),
        timezone=_timezone(s),
        usage_retention_days=s.whole("usage_retention_days", 400, minimum=1),
    )
    s.done()
    return quota


def _timezone(s: Section) -> str:
    zone = s.text("timezone", "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise Problem(
            s.at("timezone"),
            f"{s.quoted('timezone')} is not an IANA time zone (e.g. UTC, Europe/Berlin)",
        ) from None
    return zone


OTLP_TRACES_PATH = "/v1/traces"


def _tracing(s: Section) -> Tracing:
    endpoint: URL | None = None
    if s.get("otlp_endpoint") is not None:
        endpoint = _url(s.text("otlp_endpoint"))
        if endpoint is None or endpoint.scheme not in ("http", "https") or not endpoint.host:
            raise Problem(
                s.at("otlp_endpoint"),
                "expected an http:// or https:// URL (OTLP/HTTP, e.g. http://collector:4318), "
                f"got {s.quoted('otlp_endpoint')}",
            )
        if endpoint.user is not None or endpoint.password is not None:
            raise Problem(
                s.at("otlp_endpoint"),
                "credentials do not belong in the URL; send them in a header "
                "(OTEL_EXPORTER_OTLP_HEADERS)",
            )
        # A collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it, or the full path.
        if not endpoint.path.endswith(OTLP_TRACES_PATH):
            endpoint = endpoint.with_path(endpoint.path.rstrip("/") + OTLP_TRACES_PATH)
    ratio = s.get("sample_ratio")
    if ratio is None:
        ratio = 1.0
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise Problem(
            s.at("sample_ratio"),
            f"expected a fraction from 0 to 1, got {s.quoted('sample_ratio')}",
        )
    s.done()
    return Tracing(otlp_endpoint=endpoint, sample_ratio=float(ratio))


def _instant(s: Section, key: str) -> float | None:
    """A moment: `2027-06-30T00:00:00Z` (a zone is required: an expiry must not depend on
    where the gateway runs) or a date, `2027-06-30`, meaning its start in UTC."""
    value = s.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise Problem(
                s.at(key),
                f"expected a date or a time such as 2027-06-30T00:00:00Z, got {s.quoted(key)}",
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise Problem(s.at(key), "give the time zone too, e.g. 2027-06-30T00:00:00Z")
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    raise Problem(s.at(key), f"expected a date or a time, got {kind(value)}")


def _streams(s: Section) -> Streams:
    heartbeat = s.number("heartbeat", 15.0, positive=False)
    if not (math.isfinite(heartbeat) and heartbeat >= 0):
        raise Problem(
            s.at("heartbeat"), f"expected seconds >= 0 (0 turns heartbeats off), got {heartbeat:g}"
        )
    s.done()
    return Streams(heartbeat=heartbeat)


def _amount(s: Section) -> Amount:
    amount = Amount(
        per_day=s.whole("per_day", None, minimum=1),
        per_month=s.whole("per_month", None, minimum=1),
    )
    s.done()
    return amount


def _budget(s: Section) -> Budget:
    warn_at: list[float] = []
    for place, value in s.many("warn_at"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise Problem(place, f"expected a fraction above 0 and at most 1, got {value!r}")
        warn_at.append(float(value))
    budget = Budget(
        tokens=_amount(s.section("tokens")),
        requests=_amount(s.section("requests")),
        warn_at=tuple(sorted(set(warn_at))),
    )
    if budget.empty and warn_at:
        raise Problem(s.at("warn_at"), "there is no budget to warn about: set tokens or requests")
    s.done()
    return budget


def _end_user(s: Section) -> EndUser:
    header = s.text("header", pattern=_HEADER_NAME)
    end_user = EndUser(
        header=header,
        limits=_key_limits(s.section("limits"), streams=False)
        if s.has("limits")
        else TenantLimits(),
        budget=_budget(s.section("budget")),
    )
    s.done()
    return end_user


def _key_limits(s: Section, *, streams: bool = True) -> TenantLimits:
    """A key's (or the end-user level's) `limits`: buckets and a stream cap of its own (its
    tokens are reserved as the tenant's are, so a `reserve` here has no meaning)."""
    if not streams and s.has("max_concurrent_streams"):
        raise Problem(
            s.at("max_concurrent_streams"),
            "streams are capped per tenant and per key, not per end user",
        )
    tokens = s.section("tokens")
    if tokens.has("reserve"):
        raise Problem(tokens.at("reserve"), "the reserve is the tenant's; set it there")
    limits = TenantLimits(
        requests=_limit(s.section("requests")),
        tokens=_token_limit(tokens),
        max_concurrent_streams=s.whole("max_concurrent_streams", None, minimum=1),
    )
    s.done()
    return limits


def _key_hash(k: Section) -> str:
    from gateway.auth import KEY_PREFIX  # auth imports this module

    digest = k.text("sha256")
    if digest.startswith(KEY_PREFIX):
        # Never quoted: it is a caller's key.
        raise Problem(
            k.at("sha256"),
            "this looks like a gateway key itself; put its sha256 here: "
            "`thinnest-gateway keys hash` or the `keys new` output",
        )
    digest = digest.lower()
    if not _SHA256.fullmatch(digest):
        raise Problem(k.at("sha256"), "expected 64 hex characters")
    return digest


def _tenant_key(k: Section, named: dict[str, Place], hashes: dict[str, Place]) -> TenantKey:
    """One of a tenant's keys; `named` holds its tenant's key names so far, `hashes` every
    tenant's key hashes (a key belongs to one tenant)."""
    key_name = k.text("name", pattern=NAME_PATTERN)
    digest = _key_hash(k)
    key = TenantKey(
        name=key_name,
        sha256=digest,
        limits=_key_limits(k.section("limits")) if k.has("limits") else None,
        budget=_budget(k.section("budget")) if k.has("budget") else None,
        expires=_instant(k, "expires"),
    )
    k.done()
    if key_name in named:
        raise Problem(
            k.at("name"), f"duplicate key name {key_name!r} (line {named[key_name].line})"
        )
    if key_name == TENANT_LEVEL_KEY:
        raise Problem(
            k.at("name"), f"{key_name!r} names the tenant's own level on /metrics; choose another"
        )
    if digest in hashes:
        used = hashes[digest]
        raise Problem(
            k.at("sha256"),
            f"the same key hash is already used by {used.path} (line {used.line})",
        )
    named[key_name] = k.at("name")
    hashes[digest] = k.place
    return key


def _tenant(name: str, s: Section, agents: Mapping[str, Agent], hashes: dict[str, Place]) -> Tenant:
    if not NAME_PATTERN.fullmatch(name):
        raise Problem(s.place, "tenant names are letters, digits, _ . and - (at most 64)")
    raw_keys = s.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise s.missing("keys", "expected a list of {name, sha256} entries")
    named: dict[str, Place] = {}
    keys = tuple(_tenant_key(Section(place, raw), named, hashes) for place, raw in s.many("keys"))

    raw_agents = s.get("agents")
    if not isinstance(raw_agents, list) or not raw_agents:
        raise s.missing("agents", 'expected a list of agent ids, or ["*"]')
    for place, agent_id in s.many("agents"):
        if agent_id != ALL_AGENTS and agent_id not in agents:
            raise Problem(place, f"agent {agent_id!r} is not configured under agents")

    lim = s.section("limits")
    limits = TenantLimits(
        requests=_limit(lim.section("requests")),
        tokens=_token_limit(lim.section("tokens")),
        max_concurrent_streams=lim.whole("max_concurrent_streams", None, minimum=1),
    )
    lim.done()
    tenant = Tenant(
        name=name,
        keys=keys,
        agents=frozenset(str(a) for a in raw_agents),
        limits=limits,
        session_isolation=_isolation(s),
        budget=_budget(s.section("budget")),
        end_user=_end_user(s.section("end_user")) if s.has("end_user") else None,
    )
    s.done()
    return tenant


def _parse(root: Section, source: str) -> Config:
    upstream_s = root.section("upstream")
    upstream = _upstream(upstream_s)
    agents = _agents(root, upstream)
    hashes: dict[str, Place] = {}
    tenants = {name: _tenant(name, s, agents, hashes) for name, s in root.entries("tenants")}
    if ALL_AGENTS in {a for t in tenants.values() for a in t.agents} and not upstream.api_key:
        raise Problem(upstream_s.at("api_key"), 'is required when a tenant may use agents: ["*"]')

    log = root.section("logging")
    logging = Logging(
        level=log.choice("level", "info", ("debug", "info", "warning", "error")),
        format=log.choice("format", "json", ("json", "console")),
    )
    log.done()
    lim = root.section("limits")
    limits = Limits(
        max_body_bytes=lim.whole("max_body_bytes", 65536, minimum=64),
        max_answer_bytes=lim.whole("max_answer_bytes", MAX_ANSWER_BYTES, minimum=1024),
        max_event_bytes=lim.whole("max_event_bytes", MAX_EVENT_BYTES, minimum=1024),
    )
    lim.done()
    listen_s, admin_s = root.section("listen"), root.section("admin")
    listen, admin = _listen(listen_s, Listen(), caller=True), _listen(admin_s, ADMIN_DEFAULT)
    _ports_apart(listen_s, listen, admin_s, admin)

    config = Config(
        listen=listen,
        admin=admin,
        upstream=upstream,
        agents=agents,
        quota=_quota(root.section("quota")),
        tenants=tenants,
        logging=logging,
        limits=limits,
        streams=_streams(root.section("streams")),
        shutdown_grace=root.number("shutdown_grace", 30.0, positive=False),
        tracing=_tracing(root.section("tracing")),
        source=source,
    )
    root.done()
    return config


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse YAML text; raises ConfigError('<source>:<line>: <yaml.path>: <problem>')."""
    try:
        return _parse(read_yaml(text), source)
    except Problem as exc:
        raise ConfigError(exc.message(source)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    return parse_config(text, str(path))


def config_path(given: str | None) -> str | None:
    """`--config`, else the GATEWAY_CONFIG environment variable."""
    return given or os.environ.get("GATEWAY_CONFIG") or None


EVENT_LOOP = "THINNEST_GATEWAY_EVENT_LOOP"
EventLoop = Literal["auto", "asyncio", "uvloop"]
_EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", "asyncio", "uvloop")


def event_loop() -> EventLoop:
    """The THINNEST_GATEWAY_EVENT_LOOP environment variable: `auto` (unset or empty: uvloop
    when the `speed` extra is installed, else asyncio's own), `asyncio` or `uvloop`."""
    value = os.environ.get(EVENT_LOOP) or "auto"
    for known in _EVENT_LOOPS:
        if value == known:
            return known
    raise ConfigError(f"{EVENT_LOOP}={value!r}: expected one of auto, asyncio, uvloop")


def _isolation(s: Section) -> SessionIsolation:
    """`tenant | key | off`; the booleans of earlier versions still mean tenant and off."""
    value = s.get("session_isolation")
    if isinstance(value, bool):
        return _ISOLATION_FLAGS[value]
    chosen: SessionIsolation = s.choice("session_isolation", "tenant", ("tenant", "key", "off"))
    return chosen
