"""What a run was: the machine it ran on, its settings, and how it measured."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.phases import Settings


@dataclass(frozen=True, slots=True)
class ProcessLog:
    name: str
    ended: str
    """How it stopped at the end of the run."""
    lines: int
    first: list[str]
    loud: bool = False
    """`first` holds only its warning and error lines (a gateway's log, at level info)."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    started: str
    """UTC date and time."""
    seconds: float
    settings: Settings
    load_tool_note: str
    """Why the Python fallback measured JSON load instead of wrk; empty when wrk did."""
    machine: list[tuple[str, str]]
    logs: list[ProcessLog]


def _proc_field(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def machine(load_tool: str) -> list[tuple[str, str]]:
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    ram = f"{int(mem_kb) / 1024**2:.1f} GiB" if mem_kb.isdigit() else "unknown"
    load = Path("/proc/loadavg").read_text().split()[:3]
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name")),
        ("cores", str(os.cpu_count())),
        ("RAM", ram),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("aiohttp", aiohttp.__version__),
        ("load generator", load_tool),
        ("load average at start (1, 5, 15 min)", " ".join(load)),
    ]


def method(info: RunInfo) -> list[str]:
    s = info.settings
    if info.load_tool_note:
        json_tool = (
            f"**wrk was not available ({info.load_tool_note}), so a Python aiohttp load "
            f"generator ran instead**: {s.connections} concurrent requests for "
            f"{s.seconds:g} s. It is far slower than wrk and shares the two cores, so it "
            "caps req/s itself: the JSON req/s below understate every path, direct most."
        )
    else:
        json_tool = (
            f"`wrk -t1 -c{s.connections} -d{s.seconds:g}s --timeout 5s` with a Lua script "
            'that POSTs `{"message": ...}`; req/s, p50 and p99 are wrk\'s.'
        )
    return [
        "## Method",
        "",
        "- **Five paths**, each a separate process on loopback: *direct* (client → "
        "simulator), *floor* (client → `bench/floor.py` → simulator: one aiohttp route, one "
        "shared ClientSession, bodies relayed with `iter_any()`, nothing else) and three "
        "gateways (client → `thinnest-gateway serve` → simulator) with every feature on: "
        "access logs at level info (one JSON line per request, written to the process's "
        "stderr, which the harness sends to a file), Prometheus metrics, session isolation "
        "(the default), no upstream rate limits; one "
        "configuration but for the tenant's quotas: *quotas off* (the tenant has no `limits`, "
        "so no quota work at all), *memory quotas* (limits far out of reach, "
        "`quota.backend: memory`) and *Redis quotas* (the same limits, `quota.backend: redis` "
        'on a private `redis-server --save "" --appendonly no` the harness starts on a free '
        "loopback port). With the limits out of reach every request reserves and settles and "
        "none is refused. The simulator (`thinnest-gateway simulate`) sends stream events "
        "with no pause and has its rate limits set out of reach.",
        "- **Redis quotas are measured in the JSON and open-loop phases**, memory quotas in the "
        "JSON and streaming phases, alternating with the other paths in every round; the "
        "streaming phases measure direct, floor, quotas off and memory quotas. For the Redis "
        "path, "
        "Redis's own CPU per request is read the same way as the proxy's and counted in its "
        "whole-path CPU, and `INFO stats` gives the Redis commands per request.",
        f"- **Rounds**: {s.rounds}. Each round measures every path back to back, starting "
        "with a different path each round; each phase begins with an untimed warm-up. "
        "Ratios and differences are taken within a round, then summarised over rounds.",
        f"- **JSON requests**: {json_tool} Errors are socket errors, timeouts and non-2xx "
        "answers. At a fixed concurrency the latency mostly mirrors the throughput "
        "(connections ÷ req/s): it is the queueing delay at that load, not an idle "
        "round trip. *CPU per request*: user + system CPU time of the proxy process (and of the "
        "simulator) from `/proc/PID/stat`, read before and after the round, divided by the "
        "requests completed in it.",
        "- **Time to first event (TTFE)**: the time from sending the request to receiving the "
        "first bytes of a `data:` event, from an aiohttp client, after one untimed batch that "
        f"warms its connection pool. *Paced* (the target's figure): {s.paced_streams} streams "
        f"per path per round, {s.paced_concurrency} open at a time, events "
        f"{s.drip_interval * 1e3:g} ms apart (`slow_drip`), the first ones started evenly over "
        "one interval and each later one in the place of one that ended, one path at a time. "
        f"*Back to back*: {s.ttfe_streams} streams per path per round, {s.ttfe_concurrency} at "
        "a time, events unpaced, a new stream as soon as one ends: every path is then "
        "CPU-bound, so it measures queueing as much as latency.",
        f"- **Added per-chunk delay**: the simulator's `slow_drip` fault spaces events "
        f"{s.drip_interval * 1e3:g} ms apart; {s.drip_streams} streams per path per round, "
        f"{s.drip_concurrency} at a time per path, the three paths side by side (the "
        "simulator's pacing drifts with its load, as it sleeps after each write: side by side, "
        "every path sees the same drift), the first streams spread over one interval so that "
        "streams do not move in lockstep. *Added delay*: each event's arrival minus its "
        "stream's first event's arrival, compared with direct's median for the same event "
        "index in the same round; p50 and p99 over all events (the first event's own delay is "
        "TTFE's business). *Gap change*: each inter-event gap minus direct's median gap for "
        "the same index, which leaves out delay that builds up over a stream. Direct's row is "
        "the noise floor (its p50 is about 0 by construction); *gap* is the raw time between "
        "consecutive events.",
    ]
