"""YAML configuration, parsed once into frozen, typed objects.

This is the only module that reads the environment or secret files. Every problem stops
start-up with one `ConfigError` naming the file and the YAML path
(`tenants.acme.keys[0].sha256: expected 64 hex characters`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from yarl import URL

from gateway.errors import ConfigError

ALL_AGENTS = "*"
_SECRET_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
class Listen:
    host: str = "0.0.0.0"  # the caller port serves other hosts by design
    port: int = 8080


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


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    api_key: Secret | None = None
    rate_limits: Limit | None = None  # its own key's limit, if it differs from upstream's


@dataclass(frozen=True, slots=True)
class Quota:
    backend: Literal["memory", "redis"] = "memory"
    redis_url: tuple[Secret, ...] = ()
    on_backend_error: Literal["local", "open", "closed"] = "local"
    timeout_ms: int = 50
    expected_replicas: int = 1
    drain_timeout: float = 30.0
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

    def limits_of_key(self, name: str) -> TenantLimits | None:
        """A key's own limits, or None when it has none (only the tenant's apply)."""
        for key in self.keys:
            if key.name == name:
                return key.limits
        return None

    def key(self, name: str) -> TenantKey | None:
        for key in self.keys:
            if key.name == name:
                return key
        return None


@dataclass(frozen=True, slots=True)
class Logging:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 65536


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
    shutdown_grace: float = 30.0
    source: str = "<memory>"


# --- parsing ---------------------------------------------------------------------------


class _Problem(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)


class _Section:
    """One YAML mapping being read; remembers which keys were used so leftovers are errors."""

    def __init__(self, path: str, raw: object) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _Problem(path, f"expected a mapping, got {_kind(raw)}")
        self.path = path
        self.raw: dict[Any, Any] = raw
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str) -> object:
        self._seen.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return key in self.raw

    def section(self, key: str) -> _Section:
        return _Section(self.at(key), self.get(key))

    def text(
        self, key: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None
    ) -> str:
        value = self.get(key)
        if value is None:
            if default is None:
                raise _Problem(self.at(key), "is required")
            return default
        if not isinstance(value, str):
            raise _Problem(self.at(key), f"expected a string, got {_kind(value)}")
        value = _interpolate(self.at(key), value)
        if pattern is not None and not pattern.fullmatch(value):
            raise _Problem(self.at(key), f"{value!r} does not match {pattern.pattern}")
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            raise _Problem(self.at(key), f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def whole(self, key: str, default: int | None, *, minimum: int = 0) -> Any:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Problem(self.at(key), f"expected a whole number, got {_kind(value)}")
        if value < minimum:
            raise _Problem(self.at(key), f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Problem(self.at(key), f"expected a number of seconds, got {_kind(value)}")
        if positive and value <= 0:
            raise _Problem(self.at(key), f"must be greater than 0, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _Problem(self.at(key), f"expected true or false, got {_kind(value)}")
        return value

    def secret(self, key: str) -> Secret | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Problem(self.at(key), f"expected a string, got {_kind(value)}")
        if not _SECRET_REF.search(value):
            raise _Problem(
                self.at(key),
                "secrets are never written inline; reference one as ${ENV_NAME} "
                "or ${file:/path/to/secret}",
            )
        return Secret(_interpolate(self.at(key), value))

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in self._seen)
        if unknown:
            raise _Problem(self.at(unknown[0]), "unknown key")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false"}.get(
        type(value), type(value).__name__
    )


def _interpolate(path: str, value: str) -> str:
    def resolve(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("file:"):
            file = ref.removeprefix("file:")
            try:
                return Path(file).read_text().strip()
            except OSError as exc:
                raise _Problem(path, f"cannot read secret file {file}: {exc.strerror}") from None
        if not _ENV_NAME.fullmatch(ref):
            raise _Problem(path, f"${{{ref}}} is neither ${{ENV_NAME}} nor ${{file:/path}}")
        env = os.environ.get(ref)
        if env is None or env == "":
            raise _Problem(path, f"environment variable {ref} is not set")
        return env

    return _SECRET_REF.sub(resolve, value)


def _items(section: _Section, key: str) -> list[tuple[str, object]]:
    raw = section.get(key)
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise _Problem(section.at(key), f"expected a mapping, got {_kind(raw)}")
    return [(str(k), v) for k, v in raw.items()]


def _listen(s: _Section, default: Listen) -> Listen:
    listen = Listen(host=s.text("host", default.host), port=s.whole("port", default.port))
    if listen.port > 65535:
        raise _Problem(s.at("port"), f"must be at most 65535, got {listen.port}")
    s.done()
    return listen


def _limit(s: _Section) -> Limit:
    limit = Limit(
        per_minute=s.whole("per_minute", None, minimum=1),
        per_day=s.whole("per_day", None, minimum=1),
        burst=s.whole("burst", None, minimum=1),
    )
    s.done()
    return limit


def _upstream_rate_limits(s: _Section) -> UpstreamRateLimits:
    max_wait = s.number("max_wait", 2.0, positive=False)
    return UpstreamRateLimits(requests=_limit(s), max_wait=max_wait)


def _token_limit(s: _Section) -> TokenLimit:
    limit = TokenLimit(
        per_minute=s.whole("per_minute", None, minimum=1),
        per_day=s.whole("per_day", None, minimum=1),
        burst=s.whole("burst", None, minimum=1),
        reserve=s.whole("reserve", 500),
    )
    s.done()
    return limit


def _upstream(s: _Section) -> Upstream:
    base = s.text("base_url", "https://api.thinnest.ai")
    url = URL(base)
    if url.scheme not in ("http", "https") or not url.host:
        raise _Problem(s.at("base_url"), f"expected an http:// or https:// URL, got {base!r}")
    t, r, b = s.section("timeouts"), s.section("retries"), s.section("breaker")
    upstream = Upstream(
        base_url=url,
        api_key=s.secret("api_key"),
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
    )
    t.done()
    r.done()
    b.done()
    s.done()
    return upstream


def _agents(root: _Section, upstream: Upstream) -> dict[str, Agent]:
    agents = {}
    for agent_id, raw in _items(root, "agents"):
        s = _Section(root.at("agents") + f".{agent_id}", raw)
        if not AGENT_ID_PATTERN.fullmatch(agent_id):
            raise _Problem(s.path, "agent ids are letters, digits, _ and - (at most 128)")
        limits = _limit(s.section("rate_limits")) if s.get("rate_limits") is not None else None
        agent = Agent(id=agent_id, api_key=s.secret("api_key"), rate_limits=limits)
        if agent.api_key is None and upstream.api_key is None:
            raise _Problem(s.at("api_key"), "no upstream key: set it here or upstream.api_key")
        s.done()
        agents[agent_id] = agent
    return agents


def _quota(s: _Section) -> Quota:
    # The parser of the Sentinel URL lives with the client it builds (imported late: that
    # module imports this one).
    from gateway.quota.connect import SENTINEL_SCHEME, is_sentinel_url, parse_sentinel_url

    backend = s.choice("backend", "memory", ("memory", "redis"))
    raw_urls = s.get("redis_url")
    urls: tuple[Secret, ...] = ()
    if raw_urls is not None:
        items = raw_urls if isinstance(raw_urls, list) else [raw_urls]
        parsed = []
        for i, item in enumerate(items):
            path = s.at("redis_url") + (f"[{i}]" if isinstance(raw_urls, list) else "")
            if not isinstance(item, str):
                raise _Problem(path, f"expected a redis:// URL, got {_kind(item)}")
            value = _interpolate(path, item)
            # Messages quote no part of a URL: it may carry a password.
            if is_sentinel_url(value):
                if len(items) > 1:
                    raise _Problem(
                        path, f"a {SENTINEL_SCHEME}:// URL stands alone (one URL, not a list)"
                    )
                try:
                    parse_sentinel_url(value)
                except ValueError as exc:
                    raise _Problem(path, str(exc)) from None
            elif URL(value).scheme not in ("redis", "rediss", "unix"):
                raise _Problem(
                    path, f"expected a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL"
                )
            parsed.append(Secret(value))  # URLs may carry a password
        urls = tuple(parsed)
    if backend == "redis" and not urls:
        raise _Problem(s.at("redis_url"), "is required when quota.backend is redis")
    quota = Quota(
        backend=backend,
        redis_url=urls,
        on_backend_error=s.choice("on_backend_error", "local", ("local", "open", "closed")),
        timeout_ms=s.whole("timeout_ms", 50, minimum=1),
        expected_replicas=s.whole("expected_replicas", 1, minimum=1),
        drain_timeout=s.number("drain_timeout", 30.0),
        max_drains=s.whole("max_drains", 1024, minimum=1),
        timezone=_timezone(s),
        usage_retention_days=s.whole("usage_retention_days", 400, minimum=1),
    )
    s.done()
    return quota


def _timezone(s: _Section) -> str:
    zone = s.text("timezone", "UTC")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Problem(
            s.at("timezone"), f"{zone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)"
        ) from None
    return zone


def _instant(s: _Section, key: str) -> float | None:
    """A moment: `2027-06-30T00:00:00Z` (a zone is required: an expiry must not depend on
    where the gateway runs) or a date, `2027-06-30`, meaning its start in UTC."""
    value = s.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _Problem(
                s.at(key), f"expected a date or a time such as 2027-06-30T00:00:00Z, got {value!r}"
            ) from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise _Problem(s.at(key), "give the time zone too, e.g. 2027-06-30T00:00:00Z")
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    raise _Problem(s.at(key), f"expected a date or a time, got {_kind(value)}")


def _amount(s: _Section) -> Amount:
    amount = Amount(
        per_day=s.whole("per_day", None, minimum=1),
        per_month=s.whole("per_month", None, minimum=1),
    )
    s.done()
    return amount


def _budget(s: _Section) -> Budget:
    raw = s.get("warn_at")
    items = [] if raw is None else raw if isinstance(raw, list) else [raw]
    warn_at: list[float] = []
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise _Problem(
                f"{s.at('warn_at')}[{i}]",
                f"expected a fraction above 0 and at most 1, got {value!r}",
            )
        warn_at.append(float(value))
    budget = Budget(
        tokens=_amount(s.section("tokens")),
        requests=_amount(s.section("requests")),
        warn_at=tuple(sorted(set(warn_at))),
    )
    if budget.empty and warn_at:
        raise _Problem(s.at("warn_at"), "there is no budget to warn about: set tokens or requests")
    s.done()
    return budget


def _end_user(s: _Section) -> EndUser:
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


def _key_limits(s: _Section, *, streams: bool = True) -> TenantLimits:
    """A key's (or the end-user level's) `limits`: buckets and a stream cap of its own (its
    tokens are reserved as the tenant's are, so a `reserve` here has no meaning)."""
    if not streams and s.has("max_concurrent_streams"):
        raise _Problem(
            s.at("max_concurrent_streams"),
            "streams are capped per tenant and per key, not per end user",
        )
    tokens = s.section("tokens")
    if tokens.has("reserve"):
        raise _Problem(tokens.at("reserve"), "the reserve is the tenant's; set it there")
    limits = TenantLimits(
        requests=_limit(s.section("requests")),
        tokens=_token_limit(tokens),
        max_concurrent_streams=s.whole("max_concurrent_streams", None, minimum=1),
    )
    s.done()
    return limits


def _tenant(name: str, s: _Section, agents: Mapping[str, Agent]) -> Tenant:
    if not NAME_PATTERN.fullmatch(name):
        raise _Problem(s.path, "tenant names are letters, digits, _ . and - (at most 64)")
    raw_keys = s.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys:
        raise _Problem(s.at("keys"), "expected a list of {name, sha256} entries")
    keys: list[TenantKey] = []
    for i, raw in enumerate(raw_keys):
        k = _Section(s.at("keys") + f"[{i}]", raw)
        key_name = k.text("name", pattern=NAME_PATTERN)
        digest = k.text("sha256").lower()
        if not _SHA256.fullmatch(digest):
            raise _Problem(k.at("sha256"), "expected 64 hex characters")
        key_limits = _key_limits(k.section("limits")) if k.has("limits") else None
        key_budget = _budget(k.section("budget")) if k.has("budget") else None
        expires = _instant(k, "expires")
        k.done()
        if any(key.name == key_name for key in keys):
            raise _Problem(k.at("name"), f"duplicate key name {key_name!r}")
        if key_name == TENANT_LEVEL_KEY:
            raise _Problem(
                k.at("name"),
                f"{key_name!r} names the tenant's own level on /metrics; choose another",
            )
        keys.append(
            TenantKey(
                name=key_name,
                sha256=digest,
                limits=key_limits,
                budget=key_budget,
                expires=expires,
            )
        )

    raw_agents = s.get("agents")
    if not isinstance(raw_agents, list) or not raw_agents:
        raise _Problem(s.at("agents"), 'expected a list of agent ids, or ["*"]')
    for i, agent_id in enumerate(raw_agents):
        if agent_id != ALL_AGENTS and agent_id not in agents:
            raise _Problem(
                s.at("agents") + f"[{i}]", f"agent {agent_id!r} is not configured under agents"
            )

    lim = s.section("limits")
    limits = TenantLimits(
        requests=_limit(lim.section("requests")),
        tokens=_token_limit(lim.section("tokens")),
        max_concurrent_streams=lim.whole("max_concurrent_streams", None, minimum=1),
    )
    lim.done()
    tenant = Tenant(
        name=name,
        keys=tuple(keys),
        agents=frozenset(str(a) for a in raw_agents),
        limits=limits,
        session_isolation=_isolation(s),
        budget=_budget(s.section("budget")),
        end_user=_end_user(s.section("end_user")) if s.has("end_user") else None,
    )
    s.done()
    return tenant


def _parse(raw: object, source: str) -> Config:
    root = _Section("", raw)
    upstream = _upstream(root.section("upstream"))
    agents = _agents(root, upstream)
    tenants: dict[str, Tenant] = {}
    owners: dict[str, str] = {}
    for name, raw_tenant in _items(root, "tenants"):
        tenant = _tenant(name, _Section(f"tenants.{name}", raw_tenant), agents)
        for i, key in enumerate(tenant.keys):
            if key.sha256 in owners:
                raise _Problem(
                    f"tenants.{name}.keys[{i}].sha256",
                    f"the same key hash is already used by {owners[key.sha256]}",
                )
            owners[key.sha256] = f"tenants.{name}"
        tenants[name] = tenant
    if ALL_AGENTS in {a for t in tenants.values() for a in t.agents} and not upstream.api_key:
        raise _Problem("upstream.api_key", 'is required when a tenant may use agents: ["*"]')

    log = root.section("logging")
    logging = Logging(
        level=log.choice("level", "info", ("debug", "info", "warning", "error")),
        format=log.choice("format", "json", ("json", "console")),
    )
    log.done()
    lim = root.section("limits")
    limits = Limits(max_body_bytes=lim.whole("max_body_bytes", 65536, minimum=64))
    lim.done()

    config = Config(
        listen=_listen(root.section("listen"), Listen()),
        admin=_listen(root.section("admin"), ADMIN_DEFAULT),
        upstream=upstream,
        agents=agents,
        quota=_quota(root.section("quota")),
        tenants=tenants,
        logging=logging,
        limits=limits,
        shutdown_grace=root.number("shutdown_grace", 30.0, positive=False),
        source=source,
    )
    root.done()
    return config


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse YAML text; raises ConfigError('<source>: <yaml.path>: <problem>')."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        return _parse(raw, source)
    except _Problem as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    return parse_config(text, str(path))


def config_path(given: str | None) -> str | None:
    """`--config`, else the GATEWAY_CONFIG environment variable."""
    return given or os.environ.get("GATEWAY_CONFIG") or None


def _isolation(s: _Section) -> SessionIsolation:
    """`tenant | key | off`; the booleans of earlier versions still mean tenant and off."""
    value = s.get("session_isolation")
    if isinstance(value, bool):
        return _ISOLATION_FLAGS[value]
    chosen: SessionIsolation = s.choice("session_isolation", "tenant", ("tenant", "key", "off"))
    return chosen
