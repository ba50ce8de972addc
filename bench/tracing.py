"""Tracing on at `sample_ratio: 1` against tracing off, in the JSON phase of the same run.

The *tracing on* path is the memory-quota gateway with OpenTelemetry spans for every request
(`tracing: {otlp_endpoint, sample_ratio: 1}`), exporting to bench/otlp_sink.py, a stand-in
collector in a process of its own that decodes and counts what arrives. It runs in every JSON
round beside the memory-quota gateway with tracing off, the ratio taken within each round.
The sink's count against the requests the gateway answered says whether every span was
exported: spans the SDK dropped (its queue full) would not have cost their export.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass

import aiohttp

from bench.procs import Proc, free_ports, wait_ready
from bench.stack import ROOT, Stack
from bench.summary import TRACED, TRACING_PATHS, Summary

SINK = "otlp-sink"
SPANS_PER_REQUEST = 4
"""A sampled chat request: the request span, quota reserve, upstream call, quota settle."""
LABEL = "gateway, memory quotas, tracing on (sample_ratio 1)"
SHORT = "tracing on"
SECTION = "tracing"
SETTLE_SECONDS = 8.0
"""How long the exported count may stay short before it is taken as final: the SDK sends a
batch every 5 s, or sooner once 512 spans are queued."""


@dataclass(frozen=True, slots=True)
class Exported:
    """Spans the sink received, against the chat requests the traced gateway answered."""

    spans: int
    requests: int
    sink_cpu_s: float

    @property
    def per_request(self) -> float:
        return self.spans / self.requests if self.requests else float("nan")


async def start_sink(stack: Stack) -> tuple[Proc, int]:
    (port,) = free_ports(1)
    argv = [sys.executable, "-m", "bench.otlp_sink", "--port", str(port)]
    sink = await stack.procs.start(stack.prefix + SINK, argv, cwd=ROOT)
    await wait_ready(sink, f"http://127.0.0.1:{port}/count")
    return sink, port


def gateway_sections(sink_port: int) -> dict[str, dict[str, object]]:
    """The YAML the traced gateway adds to the memory-quota gateway's."""
    endpoint = f"http://127.0.0.1:{sink_port}"
    return {TRACED: {"tracing": {"otlp_endpoint": endpoint, "sample_ratio": 1}}}


async def _sink_spans(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/count") as response:
        return int((await response.json())["spans"])


async def _answered(session: aiohttp.ClientSession, admin_url: str) -> int:
    async with session.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    return round(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_requests_total{")
        )
    )


async def exported(sink: Proc, port: int, admin_url: str) -> Exported:
    """Once the traced gateway's last batch is in: every span, or no new one for a while."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        requests = await _answered(session, admin_url)
        spans, loop = await _sink_spans(session, port), asyncio.get_running_loop()
        changed = loop.time()
        while spans < requests * SPANS_PER_REQUEST and loop.time() - changed < SETTLE_SECONDS:
            await asyncio.sleep(0.5)  # the SDK's batch timer, in another process: polled
            now = await _sink_spans(session, port)
            if now != spans:
                spans, changed = now, loop.time()
    return Exported(spans, requests, sink.cpu_seconds())


def headline(summary: Summary) -> str | None:
    for name, compared in summary.tracing_vs_off.items():
        base = summary.load[TRACING_PATHS[name]]
        return (
            f"Tracing on at sample_ratio 1 (JSON, memory quotas): "
            f"{compared.cpu_ratio.median:.2f}\u00d7 the gateway's CPU per request with tracing "
            f"off ({summary.load[name].proxy_cpu_us.median:.0f} vs "
            f"{base.proxy_cpu_us.median:.0f} µs), {compared.rps_ratio.median:.2f}\u00d7 its req/s"
        )
    return None


def section(summary: Summary, spans: Exported | None) -> list[str]:
    """docs/benchmarks.md's tracing section."""
    lines = ["### Tracing on against off", ""]
    if TRACED not in summary.load or not summary.tracing_vs_off:
        return [*lines, "Not measured in this run."]
    on, compared = summary.load[TRACED], summary.tracing_vs_off[TRACED]
    off = summary.load[TRACING_PATHS[TRACED]]
    sink_cpu = "-"
    if spans is not None and spans.requests:
        sink_cpu = f"{spans.sink_cpu_s / spans.requests * 1e6:.0f}"

    times, ms = "\u00d7", " ms"
    rows = [
        [
            "gateway CPU µs per request",
            off.proxy_cpu_us.fmt(0),
            on.proxy_cpu_us.fmt(0),
            compared.cpu_ratio.fmt(2, suffix=times),
        ],
        ["req/s", off.rps.fmt(0), on.rps.fmt(0), compared.rps_ratio.fmt(2, suffix=times)],
        [
            "latency p50",
            off.p50_ms.fmt(2, suffix=ms),
            on.p50_ms.fmt(2, suffix=ms),
            compared.p50_delta_ms.fmt(2, sign=True, suffix=ms),
        ],
        [
            "latency p99",
            off.p99_ms.fmt(2, suffix=ms),
            on.p99_ms.fmt(2, suffix=ms),
            compared.p99_delta_ms.fmt(2, sign=True, suffix=ms),
        ],
        ["errors", f"{off.errors} / {off.requests}", f"{on.errors} / {on.requests}", ""],
    ]
    table = [
        "| figure | tracing off | tracing on | on against off, per round |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if spans is None:
        exported_note = "The sink's count was not read."
    else:
        complete = spans.spans >= spans.requests * SPANS_PER_REQUEST
        exported_note = (
            f"The sink received {spans.spans:,} spans for the {spans.requests:,} requests the "
            f"traced gateway answered over the whole run (warm-up and smoke requests included): "
            f"{spans.per_request:.2f} per request, of {SPANS_PER_REQUEST} "
            + (
                "(every span exported: the cost above includes exporting them all)."
                if complete
                else "(**the SDK dropped the rest**, its queue full: the cost above is that "
                "of the spans it did export)."
            )
            + f" Decoding them cost the sink {sink_cpu} µs of CPU per request, in its own "
            "process: a collector's work, not the gateway's (it is counted in the whole-path "
            "CPU ratio, not in the gateway's)."
        )
    return [
        *lines,
        "The *tracing on* path is the memory-quota gateway with "
        "`tracing: {otlp_endpoint: http://127.0.0.1:<sink>, sample_ratio: 1}`: every request "
        "is sampled and records four spans (the request, the quota reservation, the upstream "
        "call, the settlement), which the OpenTelemetry SDK's `BatchSpanProcessor` batches on "
        "its own thread and its `OTLPSpanExporter` posts as protobuf to `bench/otlp_sink.py`, a "
        "stand-in collector on the same box. It runs in every JSON round beside the memory-"
        "quota gateway with tracing off (same configuration otherwise), so the ratio is taken "
        "within each round, then summarised. Tracing off costs only the `traceparent` header "
        "check.",
        "",
        *table,
        "",
        exported_note,
    ]
