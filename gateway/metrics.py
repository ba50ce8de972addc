"""Prometheus metrics: one registry per app, names and labels as DESIGN.md fixes them.

Label values come only from configuration (tenant names, configured agent ids and key names),
status codes and fixed enums, so no caller can grow the series count: an agent id nobody
configured is `other`, a request nobody authenticated is tenant `none`, and a budget reported for
a tenant or key the configuration does not name is not shown at all.

Histogram buckets span this traffic: the gateway's own time is sub-millisecond, upstream's
first byte takes up to a minute, and a stream may run for ten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.config import ALL_AGENTS, TENANT_LEVEL_KEY, Config
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.logs import AccessRecord
from gateway.quota.plan import (
    BUDGET_LABELS,
    CONCURRENT_STREAMS,
    REQUESTS_PER_DAY,
    REQUESTS_PER_MINUTE,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    level_of,
)
from gateway.usage import Usage

NONE = "none"  # no tenant (unauthenticated) or no agent (a path that names none)
OTHER = "other"  # an agent id that is not in the configuration
TENANT_LEVEL = TENANT_LEVEL_KEY  # the `key` of a tenant's own budget (all its keys together)
BUDGETS = ("tokens_per_day", "tokens_per_month", "requests_per_day", "requests_per_month")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Reader = Callable[[], float]
_M = TypeVar("_M", bound=MetricWrapperBase)

# Whole requests: a JSON answer in tens of ms to a stream of ten minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Upstream's first byte: a model's think time, bounded by timeouts.first_byte (60 s default).
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
# The gateway's own share of a request: 100 µs … 1 s (past that something is wrong).
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# One chunk from upstream read to written on: 10 µs … 50 ms.
CHUNK_GAP_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05)

# Which upstream failure a request met (the `reason` label); set along the pipeline.
STREAM_BROKEN = "stream_broken"
STREAM_TIMEOUT = "stream_timeout"
STREAM_INCOMPLETE = "stream_incomplete"
STREAM_TOO_LARGE = "stream_event_too_large"  # an event over limits.max_event_bytes
UPSTREAM_REASONS = (
    "unavailable",
    "timeout",
    "server_error",
    "rate_limited",
    STREAM_BROKEN,
    STREAM_TIMEOUT,
    STREAM_INCOMPLETE,
    STREAM_TOO_LARGE,
)


def limit_label(bucket_name: str) -> str:
    """`tokens per minute` → `tokens_per_minute`, `key billing-service: requests per day` →
    `key_requests_per_day` (a fixed set: key names stay out of labels)."""
    return level_of(bucket_name).replace(" ", "_")


_BUCKETS = (
    REQUESTS_PER_MINUTE,
    REQUESTS_PER_DAY,
    TOKENS_PER_MINUTE,
    TOKENS_PER_DAY,
    *BUDGET_LABELS,  # "tokens per month", "requests per calendar day", ...
)
LIMITS = tuple(
    limit_label(name)
    for name in (
        *_BUCKETS,
        CONCURRENT_STREAMS,
        *(f"key {bucket}" for bucket in (*_BUCKETS, CONCURRENT_STREAMS)),
        *(f"end user: {bucket}" for bucket in _BUCKETS),
        f"upstream {REQUESTS_PER_MINUTE}",
        f"upstream {REQUESTS_PER_DAY}",
    )
)


def upstream_reason(record: AccessRecord) -> str | None:
    """The `reason` an upstream failure is counted under, or None when upstream did fine."""
    if record.upstream_error is not None:
        return record.upstream_error
    if record.error == UpstreamTimeout.code:
        return "timeout"
    if record.error == UpstreamUnavailable.code:
        return "unavailable"
    status = record.upstream_status
    if status is not None and status >= 500:
        return "server_error"
    if status == 429:
        return "rate_limited"
    return None


@dataclass(frozen=True, slots=True)
class MetricLabels:
    """The tenant, agent and key label values one configuration allows."""

    tenants: frozenset[str]
    agents: frozenset[str]
    keys: Mapping[str, frozenset[str]]  # tenant → its key names

    @classmethod
    def of(cls, config: Config) -> MetricLabels:
        agents = frozenset(config.agents) | {
            agent for tenant in config.tenants.values() for agent in tenant.agents
        }
        keys = {
            tenant.name: frozenset(key.name for key in tenant.keys)
            for tenant in config.tenants.values()
        }
        return cls(frozenset(config.tenants), agents - {ALL_AGENTS}, keys)

    def allows_budget(self, tenant: str, key: str) -> bool:
        """A budget ratio's (tenant, key) labels: a configured tenant, and one of its keys or
        `all` (the tenant level)."""
        keys = self.keys.get(tenant)
        return keys is not None and (key == TENANT_LEVEL or key in keys)


class Metrics:
    """Every metric of one gateway app, and the label rules that keep their series bounded."""

    def __init__(self, labels: Callable[[], MetricLabels]) -> None:
        """`labels` reads the label values in force (a reload replaces them: `_current`)."""
        self._labels = labels
        self._prepared: MetricLabels | None = None
        # Budgets' fractions used, read at scrape time from whoever keeps them (the quota
        # service): (tenant, key or None, budget, ratio).
        self.budget_source: Callable[[], Iterable[tuple[str, str | None, str, float]]] | None = None
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered on the caller port (health probes excluded), by status code.",
            ["tenant", "agent", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Whole request, from its first byte in to its last byte out (streams included).",
            ["tenant", "agent", "stream"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "gateway_upstream_ttfb_seconds",
            "From sending a request upstream to its response headers.",
            ["agent", "stream"],
            buckets=TTFB_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time per request: its duration less the time spent waiting on "
            "upstream (writes to the caller are included).",
            ["stream"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "LLM tokens upstream reported (JSON usage/tokens_used, SSE done event).",
            ["tenant", "agent", "kind"],
            registry=r,
        )
        self.tokens_estimated = Counter(
            "gateway_tokens_estimated",
            "Tokens charged by estimate because upstream never reported them (chars / 4).",
            ["tenant"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "gateway_quota_rejections",
            "Requests refused with 429 by a tenant limit.",
            ["tenant", "limit"],
            registry=r,
        )
        self.active_streams = Gauge(
            "gateway_active_streams",
            "Event streams being relayed to callers now.",
            ["tenant"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Requests upstream failed: unreachable, timed out, 5xx, 429, or a stream cut short.",
            ["reason"],
            registry=r,
        )
        self.chunk_gap = Histogram(
            "gateway_stream_chunk_gap_seconds",
            "Time the gateway held a stream chunk: from reading it upstream to having written it.",
            buckets=CHUNK_GAP_BUCKETS,
            registry=r,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Callers that left before their answer was complete.",
            ["tenant", "stage"],
            registry=r,
        )
        self.inflight = Gauge(
            "gateway_inflight_requests", "Requests being handled now.", registry=r
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads (SIGHUP), by outcome.",
            ["result"],
            registry=r,
        )
        self.budget_used_ratio = Gauge(
            "gateway_budget_used_ratio",
            "Fraction of a calendar budget used in the current period; key is a configured key "
            "name, or all for the tenant level; budget is tokens_per_day, tokens_per_month, "
            "requests_per_day or requests_per_month.",
            ["tenant", "key", "budget"],
            registry=r,
        )
        self._budgets: dict[tuple[str, str, str], Gauge] = {}
        Gauge(
            "gateway_build_info", "The running gateway's version.", ["version"], registry=r
        ).labels(__version__).set(1)
        for reason in UPSTREAM_REASONS:
            self.upstream_errors.labels(reason)
        for result in ("ok", "invalid"):
            self.config_reloads.labels(result)
        self._current()

    def _current(self) -> MetricLabels:
        """The label values in force. The first read of new ones (a reload) creates the series
        that alerts and rate() need to exist before the first event, and removes the budget
        ratios of tenants and keys no longer configured (a gauge left behind would keep an
        alert firing); counters of removed tenants and agents stay until restart, they only
        stop growing. Every scrape reads them first."""
        labels = self._labels()
        if labels is not self._prepared:
            for values in list(self._budgets):
                tenant_name, key_name, _ = values
                if not labels.allows_budget(tenant_name, key_name):
                    self.budget_used_ratio.remove(*values)
                    del self._budgets[values]
            for tenant in labels.tenants:
                self.active_streams.labels(tenant)
                self.tokens_estimated.labels(tenant)
                for limit in LIMITS:
                    self.quota_rejections.labels(tenant, limit)
                for stage in ("before_upstream", "streaming"):
                    self.client_disconnects.labels(tenant, stage)
            self._prepared = labels
        return labels

    def tenant_label(self, tenant: str | None) -> str:
        return tenant if tenant in self._current().tenants else NONE

    def agent_label(self, agent_id: str | None) -> str:
        if agent_id is None:
            return NONE
        return agent_id if agent_id in self._current().agents else OTHER

    def finished(self, record: AccessRecord, duration: float) -> None:
        """Everything one request's end tells: counts, latencies, rejections, failures."""
        tenant = self.tenant_label(record.tenant)
        agent = self.agent_label(record.agent)
        stream = "true" if record.stream else "false"
        self._child(self.requests, tenant, agent, str(record.status)).inc()
        self._child(self.request_duration, tenant, agent, stream).observe(duration)
        if record.upstream_ttfb is not None:
            self._child(self.upstream_ttfb, agent, stream).observe(record.upstream_ttfb)
            self._child(self.overhead, stream).observe(max(duration - record.upstream_wait, 0.0))
        if record.quota_limit is not None:
            self._child(self.quota_rejections, tenant, limit_label(record.quota_limit)).inc()
        reason = upstream_reason(record)
        if reason is not None:
            self._child(self.upstream_errors, reason).inc()
        if record.client_closed and tenant != NONE:
            stage = "streaming" if record.stream else "before_upstream"
            self._child(self.client_disconnects, tenant, stage).inc()

    def settled(
        self, tenant: str, agent: str | None, usage: Usage | None, estimated: int | None
    ) -> None:
        """Tokens of one settled request (a drain settles after the access line is written)."""
        agent_label = self.agent_label(agent)
        if usage is not None:
            tokens = self.tokens
            if usage.input is not None:
                self._child(tokens, tenant, agent_label, "input").inc(usage.input)
            if usage.output is not None:
                self._child(tokens, tenant, agent_label, "output").inc(usage.output)
            self._child(tokens, tenant, agent_label, "total").inc(usage.total)
        if estimated is not None:
            self._child(self.tokens_estimated, tenant).inc(estimated)

    def budget_used(self, tenant: str, key: str | None, budget: str, ratio: float) -> None:
        """Set the fraction (used / limit, not clamped: a budget in debt shows over 1) of
        `budget`, one of BUDGETS, that `tenant` (key None) or its key `key` has used in the
        current period. The series keeps the last value set, so the caller reports the fall
        to 0 when a period begins too. A tenant or key the configuration does not name adds
        no series: the report is dropped. An unknown budget is a programming error."""
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}: expected one of {', '.join(BUDGETS)}")
        level = TENANT_LEVEL if key is None else key
        # A key configured as `all` is dropped too: it must not overwrite its tenant's level.
        if key == TENANT_LEVEL or not self._current().allows_budget(tenant, level):
            return
        values = (tenant, level, budget)
        series = self._budgets.get(values)
        if series is None:
            series = self._budgets[values] = self.budget_used_ratio.labels(*values)
        series.set(ratio)

    def streams_of(self, tenant: str | None) -> Gauge:
        """The tenant's `gateway_active_streams` series."""
        return self._child(self.active_streams, self.tenant_label(tenant))

    def _child(self, metric: _M, *values: str) -> _M:
        """`metric.labels(*values)`, remembered: label sets are few (see the module docstring)
        and prometheus_client's lookup validates and locks on every call."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)

    def exposition(self) -> bytes:
        self._current()
        if self.budget_source is not None:
            for tenant, key, budget, ratio in self.budget_source():
                self.budget_used(tenant, key, budget, ratio)
        return generate_latest(self.registry)


class Sampled(Collector):
    """One value another part already keeps (quota backend errors, drains, the upstream
    breaker), read at scrape time rather than mirrored into a metric of our own."""

    def __init__(
        self, kind: Literal["counter", "gauge"], name: str, documentation: str, read: Reader
    ) -> None:
        self._family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        self._name = name
        self._documentation = documentation
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield self._family(self._name, self._documentation, value=self._read())


def quota_backend_errors(read: Reader) -> Sampled:
    return Sampled(
        "counter",
        "gateway_quota_backend_errors",
        "Quota backend (Redis) calls that failed or overran quota.timeout_ms.",
        read,
    )


def connections_refused(read: Reader) -> Sampled:
    return Sampled(
        "counter",
        "gateway_connections_refused",
        "Caller-port connections closed at once because listen.max_connections were open.",
        read,
    )


def stream_drains(read: Reader) -> Sampled:
    return Sampled(
        "gauge",
        "gateway_stream_drains",
        "Abandoned streams being read on in the background to charge their tokens.",
        read,
    )


class KeyExpiry(Collector):
    """`gateway_key_expiry_timestamp_seconds{tenant,key}`: each key's expiry as configured,
    read from the tenancy in force at scrape time (a reload adds and removes series)."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_key_expiry_timestamp_seconds",
            "When a gateway key is refused from (keys[].expires), epoch seconds; keys without "
            "an expiry have no series.",
            labels=["tenant", "key"],
        )
        for tenant, key, expires in self._read():
            family.add_metric([tenant, key], expires)
        yield family


class UpstreamCircuits(Collector):
    """`gateway_upstream_circuit_open{agent}`: each configured agent's circuit (and `other`,
    the one agents reached through the platform key without being named share), read at
    scrape time."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, bool]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_upstream_circuit_open",
            "1 while an agent's upstream circuit breaker is open or probing (its callers get "
            "502 at once).",
            labels=["agent"],
        )
        for agent, is_open in self._read():
            family.add_metric([agent], 1.0 if is_open else 0.0)
        yield family
