"""From raw rounds to figures: per-target spreads, and per-round ratios against direct/floor.

A ratio or difference is taken within each round first (targets ran minutes apart at most, on
the same noisy machine) and only then summarised over rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.phases import LoadRound, Results
from bench.stats import Spread, percentile
from bench.streams import (
    StreamTiming,
    added_delays,
    gap_changes,
    gaps,
    problems,
    reference_offsets,
    ttfes,
)

DIRECT, FLOOR, GATEWAY = "direct", "floor", "gateway"
MEMORY_QUOTAS, REDIS_QUOTAS = "gateway-memq", "gateway-redisq"
MEMORY_LEVELS, REDIS_LEVELS = "gateway-memq-levels", "gateway-redisq-levels"
QUOTA_PATHS = (MEMORY_QUOTAS, REDIS_QUOTAS, MEMORY_LEVELS, REDIS_LEVELS)
"""The gateway with quotas on: measured in the JSON load phase only."""
LEVEL_PATHS = {MEMORY_LEVELS: MEMORY_QUOTAS, REDIS_LEVELS: REDIS_QUOTAS}
"""Tenant and key limits and budgets, each against its tenant-only path on the same backend."""
TLS_UPSTREAM = "gateway-https-upstream"
"""The gateway with quotas off calling the simulator over HTTPS (`upstream.ca_file` trusting
its CA), against GATEWAY calling it over plain HTTP: the JSON load phase only."""
TRACED = "gateway-memq-traced"
TRACING_PATHS = {TRACED: MEMORY_QUOTAS}
"""OpenTelemetry spans at sample_ratio 1 (bench/tracing.py), against the same gateway without."""


@dataclass(frozen=True, slots=True)
class LoadFigures:
    rps: Spread
    p50_ms: Spread
    p99_ms: Spread
    proxy_cpu_us: Spread
    sim_cpu_us: Spread
    helper_cpu_us: Spread
    """Redis's CPU per request (NaN for paths without it)."""
    redis_commands: Spread
    redis_scripts: Spread
    requests: int
    errors: int
    error_kinds: dict[str, int]
    problems: list[str]


@dataclass(frozen=True, slots=True)
class StreamFigures:
    p50_ms: Spread
    p99_ms: Spread
    streams: int
    failed: int
    first_problem: str


@dataclass(frozen=True, slots=True)
class Comparison:
    """One target against a baseline, per round then over rounds."""

    rps_ratio: Spread
    p50_delta_ms: Spread
    p99_delta_ms: Spread
    cpu_ratio: Spread
    """Proxy process against proxy process; NaN against direct, which has none."""
    path_cpu_ratio: Spread
    """Every process on the path (proxy + simulator) per request."""
    ttfe_p50_delta_ms: Spread
    ttfe_p99_delta_ms: Spread
    paced_ttfe_p50_delta_ms: Spread
    paced_ttfe_p99_delta_ms: Spread
    chunk_p50_delta_ms: Spread
    chunk_p99_delta_ms: Spread


@dataclass(frozen=True, slots=True)
class TLSRound:
    """One round of the HTTPS upstream against plain HTTP: CPU microseconds per request."""

    plain_us: float
    tls_us: float
    plain_sim_us: float
    tls_sim_us: float

    @property
    def ratio(self) -> float:
        return self.tls_us / self.plain_us if self.plain_us else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    targets: list[str]
    stream_targets: list[str]
    """The targets measured in the streaming phases too."""
    load: dict[str, LoadFigures]
    ttfe: dict[str, StreamFigures]
    """Back to back, unpaced: a stream starts as soon as one ends (CPU-bound, queueing)."""
    paced_ttfe: dict[str, StreamFigures]
    """Paced slow_drip streams, many open at once, one path at a time: first events."""
    chunk_delay: dict[str, StreamFigures]
    """Added per-chunk delay against direct's median for the same event index."""
    gap_change: dict[str, StreamFigures]
    """Inter-event gaps against direct's median gap for the same index."""
    gap: dict[str, StreamFigures]
    """Raw inter-event gaps under slow_drip, for context."""
    vs_direct: dict[str, Comparison]
    gateway_vs_floor: Comparison | None
    vs_quotas_off: dict[str, Comparison]
    """Each quota path against the gateway with quotas off."""
    quotas_vs_floor: dict[str, Comparison]
    levels_vs_tenant: dict[str, Comparison]
    """Tenant + key limits + budgets against tenant-only limits, per backend."""
    tls_vs_plain: Comparison | None = None
    """The gateway over an HTTPS upstream against the same over plain HTTP."""
    tls_rounds: tuple[TLSRound, ...] = ()
    tracing_vs_off: dict[str, Comparison] = field(default_factory=dict)
    """Tracing on (sample_ratio 1) against the same gateway with tracing off."""


def _load_figures(rounds: Sequence[LoadRound], problems: Sequence[str]) -> LoadFigures:
    kinds: dict[str, int] = {}
    for r in rounds:
        for kind, count in r.result.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    return LoadFigures(
        rps=Spread.of([r.result.rps for r in rounds]),
        p50_ms=Spread.of([r.result.p50_ms for r in rounds]),
        p99_ms=Spread.of([r.result.p99_ms for r in rounds]),
        proxy_cpu_us=Spread.of([r.proxy_cpu_us for r in rounds]),
        sim_cpu_us=Spread.of([r.sim_cpu_us for r in rounds]),
        helper_cpu_us=Spread.of([r.helper_cpu_us for r in rounds]),
        redis_commands=Spread.of([r.redis_commands for r in rounds]),
        redis_scripts=Spread.of([r.redis_scripts for r in rounds]),
        requests=sum(r.result.requests for r in rounds),
        errors=sum(r.result.errors for r in rounds),
        error_kinds=kinds,
        problems=list(problems),
    )


def _ms(values: Sequence[float], pct: float) -> float:
    return percentile([v * 1e3 for v in values], pct)


def _stream_figures(rounds: Sequence[Sequence[StreamTiming]], per_round: PerRound) -> StreamFigures:
    failed = [p for timings in rounds for p in problems(timings)]
    return StreamFigures(
        p50_ms=Spread.of(per_round(50)),
        p99_ms=Spread.of(per_round(99)),
        streams=sum(len(timings) for timings in rounds),
        failed=len(failed),
        first_problem=failed[0] if failed else "",
    )


PerRound = Callable[[float], list[float]]
"""A percentile of some stream sample, one value per round."""


def _ttfe(results: Results, name: str) -> PerRound:
    return lambda pct: [_ms(ttfes(timings), pct) for timings in results.ttfe.get(name, [])]


def _paced_ttfe(results: Results, name: str) -> PerRound:
    return lambda pct: [_ms(ttfes(timings), pct) for timings in results.paced.get(name, [])]


def _gap(results: Results, name: str) -> PerRound:
    return lambda pct: [_ms(gaps(timings), pct) for timings in results.drip[name]]


def _chunk(results: Results, name: str) -> PerRound:
    # Each round's streams against direct's streams of the same round (none in a JSON-only run).
    direct = results.drip.get(DIRECT, [])
    return lambda pct: [
        _ms(added_delays(timings, reference_offsets(direct[index])), pct)
        for index, timings in enumerate(results.drip.get(name, []))
    ]


def _gap_change(results: Results, name: str) -> PerRound:
    direct = results.drip[DIRECT]
    return lambda pct: [
        _ms(gap_changes(timings, reference_offsets(direct[index])), pct)
        for index, timings in enumerate(results.drip[name])
    ]


def _load(results: Results, name: str, pick: Callable[[LoadRound], float]) -> list[float]:
    return [pick(r) for r in results.load[name]]


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _ratio(a: Sequence[float], b: Sequence[float]) -> Spread:
    return Spread.of([x / y if y else float("nan") for x, y in zip(a, b, strict=False)])


def _minus(a: Sequence[float], b: Sequence[float]) -> Spread:
    return Spread.of([x - y for x, y in zip(a, b, strict=False)])


def _compare(results: Results, name: str, base: str) -> Comparison:
    def load(pick: Callable[[LoadRound], float]) -> tuple[list[float], list[float]]:
        return _load(results, name, pick), _load(results, base, pick)

    return Comparison(
        rps_ratio=_ratio(*load(lambda r: r.result.rps)),
        p50_delta_ms=_minus(*load(lambda r: r.result.p50_ms)),
        p99_delta_ms=_minus(*load(lambda r: r.result.p99_ms)),
        cpu_ratio=_ratio(*load(lambda r: r.proxy_cpu_us)),
        path_cpu_ratio=_ratio(
            *load(lambda r: r.sim_cpu_us + _or_zero(r.proxy_cpu_us) + _or_zero(r.helper_cpu_us))
        ),
        ttfe_p50_delta_ms=_minus(_ttfe(results, name)(50), _ttfe(results, base)(50)),
        ttfe_p99_delta_ms=_minus(_ttfe(results, name)(99), _ttfe(results, base)(99)),
        paced_ttfe_p50_delta_ms=_minus(
            _paced_ttfe(results, name)(50), _paced_ttfe(results, base)(50)
        ),
        paced_ttfe_p99_delta_ms=_minus(
            _paced_ttfe(results, name)(99), _paced_ttfe(results, base)(99)
        ),
        chunk_p50_delta_ms=_minus(_chunk(results, name)(50), _chunk(results, base)(50)),
        chunk_p99_delta_ms=_minus(_chunk(results, name)(99), _chunk(results, base)(99)),
    )


def summarise(results: Results, targets: Sequence[str]) -> Summary:
    streamed = [name for name in targets if name in results.ttfe]
    quota_paths = [name for name in QUOTA_PATHS if name in targets]
    return Summary(
        targets=list(targets),
        stream_targets=streamed,
        load={
            name: _load_figures(results.load[name], results.load_problems.get(name, []))
            for name in targets
        },
        ttfe={name: _stream_figures(results.ttfe[name], _ttfe(results, name)) for name in streamed},
        paced_ttfe={
            name: _stream_figures(results.paced[name], _paced_ttfe(results, name))
            for name in streamed
        },
        chunk_delay={
            name: _stream_figures(results.drip[name], _chunk(results, name)) for name in streamed
        },
        gap_change={
            name: _stream_figures(results.drip[name], _gap_change(results, name))
            for name in streamed
        },
        gap={name: _stream_figures(results.drip[name], _gap(results, name)) for name in streamed},
        vs_direct={name: _compare(results, name, DIRECT) for name in targets if name != DIRECT},
        gateway_vs_floor=(
            _compare(results, GATEWAY, FLOOR) if {GATEWAY, FLOOR} <= set(targets) else None
        ),
        vs_quotas_off=(
            {name: _compare(results, name, GATEWAY) for name in quota_paths}
            if GATEWAY in targets
            else {}
        ),
        quotas_vs_floor=(
            {name: _compare(results, name, FLOOR) for name in quota_paths}
            if FLOOR in targets
            else {}
        ),
        levels_vs_tenant={
            name: _compare(results, name, base)
            for name, base in LEVEL_PATHS.items()
            if name in targets and base in targets
        },
        tls_vs_plain=(
            _compare(results, TLS_UPSTREAM, GATEWAY)
            if {TLS_UPSTREAM, GATEWAY} <= set(targets)
            else None
        ),
        tls_rounds=_tls_rounds(results) if {TLS_UPSTREAM, GATEWAY} <= set(targets) else (),
        tracing_vs_off={
            name: _compare(results, name, base)
            for name, base in TRACING_PATHS.items()
            if name in targets and base in targets
        },
    )


def _tls_rounds(results: Results) -> tuple[TLSRound, ...]:
    return tuple(
        TLSRound(plain.proxy_cpu_us, tls.proxy_cpu_us, plain.sim_cpu_us, tls.sim_cpu_us)
        for plain, tls in zip(results.load[GATEWAY], results.load[TLS_UPSTREAM], strict=False)
    )
