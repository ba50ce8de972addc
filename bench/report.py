"""docs/benchmarks.md and the stdout summary, from a Summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from bench import drains, open_streams, openloop, targets
from bench.about import RunInfo, method
from bench.sections import block
from bench.soak import SoakResult
from bench.soak_report import headline as soak_headline
from bench.soak_report import method_bullet as soak_method
from bench.soak_report import section as soak_section
from bench.stats import EN_DASH, Spread
from bench.summary import (
    DIRECT,
    FLOOR,
    GATEWAY,
    MEMORY_LEVELS,
    MEMORY_QUOTAS,
    REDIS_LEVELS,
    REDIS_QUOTAS,
    TLS_UPSTREAM,
    TRACED,
    Comparison,
    StreamFigures,
    Summary,
)
from bench.tracing import LABEL as TRACED_LABEL
from bench.tracing import SECTION as TRACING_SECTION
from bench.tracing import SHORT as TRACED_SHORT
from bench.tracing import headline as tracing_headline

TIMES = "\u00d7"
LABELS: Mapping[str, str] = MappingProxyType(
    {
        DIRECT: "direct (simulator)",
        FLOOR: "floor proxy",
        GATEWAY: "gateway, quotas off",
        MEMORY_QUOTAS: "gateway, memory quotas",
        REDIS_QUOTAS: "gateway, Redis quotas",
        MEMORY_LEVELS: "gateway, memory quotas, key levels + budgets",
        REDIS_LEVELS: "gateway, Redis quotas, key levels + budgets",
        TLS_UPSTREAM: "gateway, quotas off, HTTPS upstream",
        TRACED: TRACED_LABEL,
    }
)
SHORT: Mapping[str, str] = MappingProxyType(
    {
        MEMORY_QUOTAS: "memory quotas",
        REDIS_QUOTAS: "Redis quotas",
        MEMORY_LEVELS: "memory levels + budgets",
        REDIS_LEVELS: "Redis levels + budgets",
    }
)
REDIS_PATHS = (REDIS_QUOTAS, REDIS_LEVELS)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _x(spread: Spread) -> str:
    return spread.fmt(2, suffix=TIMES)


def _ms(spread: Spread, sign: bool = True) -> str:
    return spread.fmt(2, sign=sign, suffix=" ms")


def headlines(summary: Summary) -> list[str]:
    lines = []
    gw = summary.vs_direct.get(GATEWAY)
    fl = summary.vs_direct.get(FLOOR)
    vf = summary.gateway_vs_floor
    if gw and fl and vf:
        lines += [
            f"JSON req/s: gateway (quotas off) = {gw.rps_ratio.median:.2f}{TIMES} direct, "
            f"{vf.rps_ratio.median:.2f}{TIMES} floor "
            f"(floor = {fl.rps_ratio.median:.2f}{TIMES} direct)",
            f"JSON latency p50: gateway {gw.p50_delta_ms.median:+.2f} ms over direct, "
            f"{vf.p50_delta_ms.median:+.2f} ms over floor",
            f"CPU per request: gateway = {vf.cpu_ratio.median:.2f}{TIMES} the floor's "
            f"({summary.load[GATEWAY].proxy_cpu_us.median:.0f} vs "
            f"{summary.load[FLOOR].proxy_cpu_us.median:.0f} µs); the whole gateway path "
            f"(gateway + simulator) = {gw.path_cpu_ratio.median:.2f}{TIMES} direct's",
            f"Time to first event p50, paced streams: gateway "
            f"{gw.paced_ttfe_p50_delta_ms.median:+.2f} ms over direct, "
            f"{vf.paced_ttfe_p50_delta_ms.median:+.2f} ms over floor (back to back, CPU-bound: "
            f"{gw.ttfe_p50_delta_ms.median:+.2f} ms over direct, "
            f"{vf.ttfe_p50_delta_ms.median:+.2f} ms over floor)",
            f"Added per-chunk delay (each event against direct's same event): gateway p50 "
            f"{summary.chunk_delay[GATEWAY].p50_ms.median:+.2f} ms, p99 "
            f"{summary.chunk_delay[GATEWAY].p99_ms.median:+.2f} ms; floor p50 "
            f"{summary.chunk_delay[FLOOR].p50_ms.median:+.2f} ms, p99 "
            f"{summary.chunk_delay[FLOOR].p99_ms.median:+.2f} ms; direct's own jitter p99 "
            f"{summary.chunk_delay[DIRECT].p99_ms.median:+.2f} ms",
        ]
    quotas = [
        f"{SHORT[n]} {c.rps_ratio.median:.2f}{TIMES} req/s, "
        f"{c.cpu_ratio.median:.2f}{TIMES} gateway CPU per request "
        f"({summary.load[n].proxy_cpu_us.median:.0f} vs "
        f"{summary.load[GATEWAY].proxy_cpu_us.median:.0f} µs), "
        f"p50 {c.p50_delta_ms.median:+.2f} ms"
        for n, c in summary.vs_quotas_off.items()
    ]
    if quotas:
        floor = [
            f"{SHORT[n]} {c.rps_ratio.median:.2f}{TIMES} the floor's req/s"
            for n, c in summary.quotas_vs_floor.items()
        ]
        redis = summary.load.get(REDIS_QUOTAS)
        redis_note = (
            f"; Redis itself spent {redis.helper_cpu_us.median:.0f} µs CPU per request on "
            f"{redis.redis_scripts.median:.1f} script calls"
            if redis is not None
            else ""
        )
        lines.append(
            "Quotas on (JSON only), against the gateway with quotas off: "
            + "; ".join(quotas)
            + (f" ({', '.join(floor)})" if floor else "")
            + redis_note
        )
    levels = [
        f"{SHORT[n]} {c.cpu_ratio.median:.2f}{TIMES} gateway CPU per request "
        f"({summary.load[n].proxy_cpu_us.median:.0f} µs), "
        f"{summary.load[n].redis_scripts.median:.1f} script calls"
        for n, c in summary.levels_vs_tenant.items()
    ]
    if levels:
        lines.append(
            "Key levels and budgets on (JSON only), against tenant-only limits on the same "
            "backend: " + "; ".join(levels)
        )
    tls = tls_headline(summary)
    if tls:
        lines.append(tls)
    traced = tracing_headline(summary)
    if traced is not None:
        lines.append(traced)
    failures = [
        f"{name}: {figures.errors} of {figures.requests} JSON requests failed "
        f"({', '.join(f'{k} {v}' for k, v in figures.error_kinds.items())})"
        + (f"; {figures.problems[0]}" if figures.problems else "")
        for name, figures in summary.load.items()
        if figures.errors
    ] + [
        f"{name}: {figures.failed} of {figures.streams} streams failed ({figures.first_problem})"
        for kind in (summary.ttfe, summary.gap)
        for name, figures in kind.items()
        if figures.failed
    ]
    return lines + [f"ERRORS: {line}" for line in failures]


def _comparison_rows(name: str, c: Comparison) -> list[list[str]]:
    rows = [
        [name, "JSON req/s", _x(c.rps_ratio)],
        [name, "JSON latency p50", _ms(c.p50_delta_ms)],
        [name, "JSON latency p99", _ms(c.p99_delta_ms)],
        [name, "proxy process CPU per request", _x(c.cpu_ratio)],
        [
            name,
            "CPU per request, whole path (proxy + simulator, + Redis for Redis quotas)",
            _x(c.path_cpu_ratio),
        ],
        [name, "time to first event p50", _ms(c.ttfe_p50_delta_ms)],
        [name, "time to first event p99", _ms(c.ttfe_p99_delta_ms)],
        [name, "time to first event p50, paced streams", _ms(c.paced_ttfe_p50_delta_ms)],
        [name, "time to first event p99, paced streams", _ms(c.paced_ttfe_p99_delta_ms)],
        [name, "added per-chunk delay p50", _ms(c.chunk_p50_delta_ms)],
        [name, "added per-chunk delay p99", _ms(c.chunk_p99_delta_ms)],
    ]
    # Proxy CPU against direct has nothing to compare with.
    return [row for row in rows if row[2] != "n/a"]


def tables(summary: Summary) -> dict[str, list[str]]:
    names = summary.stream_targets
    load = _table(
        [
            "path",
            "req/s",
            "p50",
            "p99",
            "proxy CPU µs/req",
            "simulator CPU µs/req",
            "Redis CPU µs/req",
            "errors",
        ],
        [
            [
                LABELS[n],
                summary.load[n].rps.fmt(0),
                _ms(summary.load[n].p50_ms, False),
                _ms(summary.load[n].p99_ms, False),
                summary.load[n].proxy_cpu_us.fmt(0) if n != DIRECT else "-",
                summary.load[n].sim_cpu_us.fmt(0),
                summary.load[n].helper_cpu_us.fmt(0) if n in REDIS_PATHS else "-",
                f"{summary.load[n].errors} / {summary.load[n].requests}",
            ]
            for n in summary.targets
        ],
    )
    ttfe = _ttfe_table(summary.ttfe, names)
    paced = _ttfe_table(summary.paced_ttfe, names)
    chunks = _table(
        ["path", "added delay p50", "p99", "gap change p50", "p99", "gap p50", "failed streams"],
        [
            [
                LABELS[n],
                _ms(summary.chunk_delay[n].p50_ms),
                _ms(summary.chunk_delay[n].p99_ms),
                _ms(summary.gap_change[n].p50_ms),
                _ms(summary.gap_change[n].p99_ms),
                _ms(summary.gap[n].p50_ms, False),
                f"{summary.gap[n].failed} / {summary.gap[n].streams}",
            ]
            for n in names
        ],
    )
    rows = [row for n, c in summary.vs_direct.items() for row in _comparison_rows(LABELS[n], c)]
    if summary.gateway_vs_floor is not None:
        rows += _comparison_rows("gateway, quotas off vs floor", summary.gateway_vs_floor)
    for n, c in summary.vs_quotas_off.items():
        rows += _comparison_rows(f"{SHORT[n]} vs quotas off", c)
    for n, c in summary.quotas_vs_floor.items():
        rows += _comparison_rows(f"{SHORT[n]} vs floor", c)
    for n, c in summary.levels_vs_tenant.items():
        rows += _comparison_rows(f"{SHORT[n]} vs tenant-only", c)
    if summary.tls_vs_plain is not None:
        rows += _comparison_rows("HTTPS upstream vs HTTP upstream", summary.tls_vs_plain)
    for c in summary.tracing_vs_off.values():
        rows += _comparison_rows(f"{TRACED_SHORT} vs off (memory quotas)", c)
    ratios = _table(["compared", "figure", "ratio or difference, per round"], rows)
    return {"load": load, "ttfe": ttfe, "paced": paced, "chunks": chunks, "ratios": ratios}


def tls_headline(summary: Summary) -> str:
    """CPU per request over an HTTPS upstream against plain HTTP, the ratio of each round."""
    c = summary.tls_vs_plain
    if c is None or not summary.tls_rounds:
        return ""
    per_round = ", ".join(f"{r.ratio:.2f}{TIMES}" for r in summary.tls_rounds)
    return (
        f"HTTPS upstream (JSON only): gateway CPU per request {c.cpu_ratio.median:.2f}{TIMES} "
        f"the plain-HTTP upstream's ({summary.load[TLS_UPSTREAM].proxy_cpu_us.median:.0f} vs "
        f"{summary.load[GATEWAY].proxy_cpu_us.median:.0f} µs; per round {per_round}), "
        f"req/s {c.rps_ratio.median:.2f}{TIMES}"
    )


def tls_section(summary: Summary) -> list[str]:
    """The HTTPS upstream path, round by round."""
    if not summary.tls_rounds:
        return []
    rows = [
        [
            str(number),
            f"{r.plain_us:.0f}",
            f"{r.tls_us:.0f}",
            f"{r.ratio:.2f}{TIMES}",
            f"{r.plain_sim_us:.0f}",
            f"{r.tls_sim_us:.0f}",
        ]
        for number, r in enumerate(summary.tls_rounds, 1)
    ]
    return [
        "### HTTPS upstream",
        "",
        "The real API is HTTPS. The gateway with quotas off calls a second simulator served "
        "over HTTPS (TLS 1.3, an ECDSA P-256 certificate from a CA made for the run, trusted "
        "through `upstream.ca_file`) and is compared with the same gateway calling the plain "
        "HTTP simulator, in the same rounds of the JSON phase. Upstream connections are pooled "
        "and kept alive, so a handshake is paid once per connection; what remains per request "
        "is encryption and asyncio's TLS layer.",
        "",
        *_table(
            [
                "round",
                "gateway CPU µs/req, HTTP upstream",
                "HTTPS upstream",
                "ratio",
                "simulator CPU µs/req, HTTP",
                "HTTPS",
            ],
            rows,
        ),
    ]


def _ttfe_table(figures: Mapping[str, StreamFigures], names: Sequence[str]) -> list[str]:
    return _table(
        ["path", "TTFE p50", "TTFE p99", "failed streams"],
        [
            [
                LABELS[n],
                _ms(figures[n].p50_ms, False),
                _ms(figures[n].p99_ms, False),
                f"{figures[n].failed} / {figures[n].streams}",
            ]
            for n in names
        ],
    )


def open_loop_headline(results: openloop.OpenLoopResults, path: str) -> str:
    rate = results.settings.rate
    p50 = openloop.added(results, path, DIRECT, lambda r: r.p50_ms)
    p99 = openloop.added(results, path, DIRECT, lambda r: r.p99_ms)
    return (
        f"Open loop at {rate:g} req/s: {LABELS.get(path, path)} added "
        f"{p50.median:+.2f} ms at p50 and {p99.median:+.2f} ms at p99 over direct"
    )


def quota_notes(summary: Summary) -> list[str]:
    """What the quota rows measured, and whether they answered 200 throughout."""
    quota_paths = [n for n in SHORT if n in summary.load]
    if not quota_paths:
        return []
    notes = [
        "The two quota paths run the same gateway configuration as *quotas off*, with the "
        "tenant's `limits` set far out of reach (requests 100,000,000/min and 1,000,000,000/day; "
        "tokens 1,000,000,000/min and 10,000,000,000/day), so every request makes a real "
        "reservation and settles it, and none is refused (the tenant's "
        "`max_concurrent_streams` is 1,000,000). Memory quotas are measured in the streaming "
        "phases too; Redis quotas in the JSON phase and the open-loop phase."
    ]
    for n in quota_paths:
        figures = summary.load[n]
        if figures.errors:
            kinds = ", ".join(f"{k} {v}" for k, v in figures.error_kinds.items())
            notes.append(
                f"**{LABELS[n]}: {figures.errors} of {figures.requests} requests failed "
                f"({kinds}).** " + " ".join(figures.problems)
            )
        else:
            notes.append(f"{LABELS[n]}: 0 errors in {figures.requests} requests (no 429).")
    if summary.levels_vs_tenant:
        notes.append(
            "The *key levels + budgets* paths add, on the same backend, everything a request "
            "can belong to but an end user: the caller's key has its own request and token "
            "limits and stream cap, and a monthly token budget; the tenant has daily and "
            "monthly token budgets and a monthly request budget with two `warn_at` fractions "
            "(all far out of reach). Still one script call before forwarding and one after on "
            "Redis: the script calls per request below say so."
        )
    redis = summary.load.get(REDIS_QUOTAS)
    if redis is not None:
        notes.append(
            f"Redis quotas, per request over the timed rounds (from Redis's `INFO`): "
            f"{redis.redis_scripts.fmt(2)} script calls (EVALSHA round trips: reserve and "
            f"settle) running {redis.redis_commands.fmt(1)} Redis commands in all, those "
            "inside the scripts included. So the Redis path did go to Redis, not to the "
            "gateway's local fallback."
        )
    return notes


def stdout_summary(summary: Summary) -> str:
    parts = tables(summary)
    return "\n".join(
        ["", f"== thinnest-gateway benchmark: medians over rounds (min{EN_DASH}max) ==", ""]
        + [f"* {line}" for line in headlines(summary)]
        + ["", "JSON (non-streaming):", *parts["load"], ""]
        + [f"* {note}" for note in quota_notes(summary)]
        + ["", "Time to first event, paced (slow_drip, one path at a time):", *parts["paced"]]
        + ["", "Time to first event, back to back (CPU-bound):", *parts["ttfe"]]
        + ["", "Per-chunk delay under slow_drip:", *parts["chunks"], ""]
    )


PROFILE = Path(__file__).resolve().parent / "profile.md"
"""A hand-written profile of the gateway, included verbatim when it exists."""
PROFILE_SECTION = "profile"
MEASUREMENTS = Path(__file__).resolve().parent / "measurements.md"
"""Hand-written measurements by issue (before and after a change), kept verbatim by every run."""
MEASUREMENTS_SECTION = "measurements"
PROFILE_ANCHOR = "## How to read this"


def measurements_section() -> list[str]:
    """bench/measurements.md under its heading (its leading comment left out)."""
    if not MEASUREMENTS.exists():
        return ["## Measurements by issue", "", "(bench/measurements.md is not there.)"]
    text = MEASUREMENTS.read_text()
    if text.startswith("<!--"):
        text = text.partition("-->")[2]
    return [
        "## Measurements by issue",
        "",
        "Hand-written from bench/measurements.md (kept verbatim by every run): runs of one "
        "phase, before and after a change.",
        "",
        *text.strip("\n").splitlines(),
    ]


def profile_section() -> list[str]:
    """bench/profile.md verbatim under its heading; a pointer to it when it is missing."""
    if not PROFILE.exists():
        return ["## Where the time goes", "", "(bench/profile.md is not there: no profile yet.)"]
    return ["## Where the time goes", "", *PROFILE.read_text().strip("\n").splitlines()]


@dataclass(slots=True)
class Extras:
    """The phases beyond the JSON and streaming ones; None for one that did not run."""

    open_loop: openloop.OpenLoopResults | None = None
    open_loop_path: str = REDIS_QUOTAS
    open_streams: open_streams.OpenStreamsResult | None = None
    drains: drains.DrainsResult | None = None
    litellm: list[str] | None = None
    litellm_why: str = ""
    soak: SoakResult | None = None
    budget: float = 600.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    tracing: list[str] | None = None
    """bench/tracing.py's section."""


def target_rows(summary: Summary, extras: Extras) -> list[targets.Row]:
    return [
        *targets.json_rows(summary),
        *targets.open_loop_rows(extras.open_loop, extras.open_loop_path),
        *targets.stream_rows(summary),
        *targets.open_streams_rows(extras.open_streams),
        *targets.drains_row(extras.drains),
        *targets.litellm_row(extras.litellm, extras.litellm_why),
        *targets.soak_row(extras.soak),
    ]


def litellm_section(lines: Sequence[str] | None, why: str) -> list[str]:
    if lines is None:
        return ["### LiteLLM comparison", "", f"Not measured: {why}."]
    first = next((line for line in lines if line.strip()), "")
    return list(lines) if first.startswith("#") else ["### LiteLLM comparison", "", *lines]


def how_to_run() -> list[str]:
    return [
        "## How to run",
        "",
        "```sh",
        "make bench        # or: .venv/bin/python -m bench (installs wrk and redis-server "
        "with apt-get, and LiteLLM in .bench/, if missing)",
        ".venv/bin/python -m bench --quick      # every phase, shortened: a smoke test of the "
        "harness",
        ".venv/bin/python -m bench --only openloop       # one phase alone: rewrites only its "
        "section",
        ".venv/bin/python -m bench --only open-streams   # and its rows of the targets table",
        ".venv/bin/python -m bench --only drains         # /healthz under 200 drains",
        ".venv/bin/python -m bench --only litellm",
        ".venv/bin/python -m bench --only soak --soak-requests 200000",
        "```",
        "",
        "It starts the simulator (and a second one over HTTPS), the floor proxy, the gateways "
        "(quotas off, memory and Redis quotas, with and without key levels, quotas off over an "
        "HTTPS upstream, and memory quotas with tracing on, exporting to a stand-in collector, "
        "`bench/otlp_sink.py`) and a private `redis-server` on free loopback ports, "
        "measures JSON "
        "load, streams and open-loop latency, and stops them; then the open-streams and drains "
        "phases, the "
        "LiteLLM comparison (bench/litellm.py, when it is there) and the soak start processes "
        "of their own. It rewrites this file at the end.",
    ]


def write_markdown(
    path: Path, summary: Summary, info: RunInfo, extras: Extras | None = None
) -> None:
    extras = extras or Extras()
    soak = extras.soak
    parts = tables(summary)
    logs = []
    for log in info.logs:
        logs.append(
            f"- `{log.name}`: {log.ended}; {log.lines} log line(s)"
            + (f", {len(log.first)} at level warning or above" if log.loud else "")
            + (", the first:" if log.first else "")
        )
        logs += [f"  `{line[:300]}`" for line in log.first]
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in extras.phase_seconds.items())
    within = "within" if info.seconds <= extras.budget else "**over**"
    extra_headlines = []
    if extras.open_loop is not None:
        extra_headlines.append(open_loop_headline(extras.open_loop, extras.open_loop_path))
    if extras.open_streams is not None:
        extra_headlines.append("Open streams: " + open_streams.summary_line(extras.open_streams))
    if extras.drains is not None:
        extra_headlines.append("Drains: " + drains.summary_line(extras.drains))
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {info.started} UTC, in {info.seconds:.0f} s "
        f"({within} its {extras.budget:.0f} s budget; {phases}). Each run overwrites this "
        "file, but for the measurements by issue (bench/measurements.md, included as written).",
        "",
        "## Targets (issue 7)",
        "",
        *block(
            targets.SECTION,
            [
                *targets.table(target_rows(summary, extras)),
                "",
                *targets.why_missed(target_rows(summary, extras)),
                "",
                "Each figure is the median over rounds (lowest and highest round in brackets) of "
                "this run; ratios and differences are taken within a round first. Details and "
                "method below.",
            ],
        ),
        "",
        "## Headlines",
        "",
        *(f"- {line}" for line in headlines(summary)),
        *(f"- {line}" for line in extra_headlines),
        *([f"- {soak_headline(soak)}"] if soak is not None else []),
        "",
        *how_to_run(),
        "",
        "## Machine",
        "",
        *_table(["", ""], info.machine),
        "",
        *method(info),
        *([openloop.method_bullet(extras.open_loop.settings)] if extras.open_loop else []),
        *([soak_method(soak.settings)] if soak is not None else []),
        "",
        "## Results",
        "",
        "Every figure is the median over rounds, with the lowest and highest round in brackets.",
        "",
        "### JSON (non-streaming) requests",
        "",
        *parts["load"],
        "",
        *(line for note in quota_notes(summary) for line in (note, "")),
        "### Streaming: time to first event",
        "",
        f"Paced: {info.settings.paced_streams} slow_drip streams per path and round (events "
        f"{info.settings.drip_interval * 1000:g} ms apart, {info.settings.paced_concurrency} "
        "open at once, the first ones started evenly over one interval, one path at a time). "
        "The box is not saturated, so this is a stream's own added latency: what the target "
        "is measured on.",
        "",
        *parts["paced"],
        "",
        f"Back to back: {info.settings.ttfe_concurrency} at once per path, a new stream the "
        "moment one ends, events unpaced, one path at a time. Every path is then CPU-bound, "
        "so this mostly measures queueing behind the other streams' work: the gateway's "
        "larger CPU cost per request (see the JSON table) shows up here as milliseconds.",
        "",
        *parts["ttfe"],
        "",
        "### Streaming: added per-chunk delay",
        "",
        *parts["chunks"],
        "",
        "### Ratios and differences",
        "",
        "Taken within each round (the targets ran back to back), then summarised.",
        "",
        *parts["ratios"],
        "",
        *tls_section(summary),
        *([""] if summary.tls_rounds else []),
        *([*block(TRACING_SECTION, extras.tracing), ""] if extras.tracing is not None else []),
        *(
            [*block("openloop", openloop.section(extras.open_loop, DIRECT)), ""]
            if extras.open_loop is not None
            else []
        ),
        *(
            [*block("open-streams", open_streams.section(extras.open_streams)), ""]
            if extras.open_streams is not None
            else []
        ),
        *(
            [*block("drains", drains.section(extras.drains)), ""]
            if extras.drains is not None
            else []
        ),
        *block("litellm", litellm_section(extras.litellm, extras.litellm_why)),
        "",
        *([*block("soak", soak_section(soak)), ""] if soak is not None else []),
        "### Processes and their logs",
        "",
        "The gateways log at level info: one access line per request, to their log file. "
        "Listed here are the warning and error lines only (a Redis failure would show as "
        "`quota backend failed`).",
        "",
        *(logs or ["- (none)"]),
        "",
        *block(PROFILE_SECTION, profile_section()),
        "",
        *block(MEASUREMENTS_SECTION, measurements_section()),
        "",
        "## How to read this",
        "",
        "The machine is shared and noisy: absolute req/s and milliseconds move from run to "
        f"run, and between rounds of one run (see the min{EN_DASH}max). Compare the ratios and "
        "differences within one run, which measure every path under the same conditions, "
        "not absolute figures across runs or machines. CPU per request depends less on how "
        "busy the other cores were than req/s does, but it too moves between runs (CPU "
        "steal, clock speed), so compare it within a run as well. The floor is what "
        "any aiohttp proxy pays; the distance from the floor to the gateway is the price of "
        "the gateway's own work (auth, validation, logging, SSE scanning); the distance from "
        "*quotas off* to the quota rows is the price of the quota reserve and settle.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
