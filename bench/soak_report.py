"""The soak's part of docs/benchmarks.md: its section, its method bullet and its headline.

The section sits between two HTML comments (bench/sections.py), so `python -m bench --only
soak` can replace it in a file the full run wrote and leave the rest alone.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence

from bench.soak import KINDS, SETTLE_MARKER_TTL, SoakResult, SoakSettings
from gateway.quota.memory import MAX_SETTLED

KIND_LABELS = {"json": "JSON", "stream": "complete streams", "aborted": "aborted streams"}
LOG_KINDS_SHOWN = 5
TIMES = " \u00d7 "
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
EXPECTED_CODES = frozenset({"200", "499"})
"""What the gateway should count: 200, and 499 for a caller that left before the end."""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _mix(s: SoakSettings) -> str:
    aborted = 1 - s.json_share - s.stream_share
    return (
        f"{s.json_share:.0%} JSON, {s.stream_share:.0%} complete streams, "
        f"{aborted:.0%} aborted streams"
    )


def method_bullet(s: SoakSettings) -> str:
    return (
        "- **Soak** (last, on its own simulator and gateway; "
        "`.venv/bin/python -m bench --only soak` runs it alone and rewrites only its section "
        "of this file; `--soak-requests` (measured requests in all) and `--soak-rounds` change "
        "its size; in a full run it stops starting rounds when the run's time budget would "
        "run out, and says so): one "
        "`thinnest-gateway serve` with memory quotas (limits out of reach, as above) in front "
        f"of a simulator pacing stream events {s.chunk_interval * 1e3:g} ms apart. A Python "
        f"aiohttp client sends {s.rounds} rounds of {s.requests_per_round:,} requests after an "
        f"unmeasured warm-up round of {s.warmup_requests:,}, at most {s.concurrency} at once, "
        f"in a seeded random mix ({_mix(s)}; an aborted stream reads a random number of events, "
        "from none to all but the done event, then closes its connection). After the warm-up "
        "and after each round, once the gateway has settled (`gateway_active_streams`, "
        "`gateway_stream_drains` and `gateway_inflight_requests` on its admin port's /metrics "
        "read 0 twice in a row), the harness reads the gateway process's RSS (`VmRSS` in "
        "`/proc/PID/status`) and its open file descriptors (`/proc/PID/fd`). The memory quota "
        f"backend keeps one settle marker per request for {SETTLE_MARKER_TTL:g} s (at most "
        f"{MAX_SETTLED:,}), so RSS rises until they stop accumulating whatever else happens: "
        "the slope is "
        "a least-squares fit of RSS against requests over the samples taken after the first "
        f"{SETTLE_MARKER_TTL:g} s of measured rounds (over all of them if fewer than three came "
        f"that late). *Flat* means RSS grew by less than {s.growth_limit:.0%} over those "
        f"samples and the fds ended at most {s.concurrency} (the concurrency: client "
        "connections kept alive) above where they started after the warm-up; anything else is "
        "*GROWING*."
    )


def unexpected_codes(result: SoakResult) -> dict[str, int]:
    return {code: n for code, n in result.gateway_codes.items() if code not in EXPECTED_CODES}


def headline(result: SoakResult) -> str:
    errors = f"{result.errors} errors" if result.errors else "0 errors"
    odd = unexpected_codes(result)
    gateway = (
        "; **the gateway itself counted "
        + ", ".join(f"{n:,}{TIMES}{code}" for code, n in odd.items())
        + f" and logged {len(result.log_lines)} warning/error line(s)**"
        if odd
        else ""
    )
    return (
        f"Soak ({result.requests:,} mixed requests, JSON, streams and aborted streams, at "
        f"{result.rate:,.0f} req/s): {result.verdict}; {errors} seen by the client{gateway}"
    )


def _log_kind(line: str) -> str:
    """A JSON log line as its level, event and the last line of its exception, if any."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line[:200]
    if not isinstance(entry, dict):
        return line[:200]
    text = f"{entry.get('level', '?')}: {entry.get('event', '?')}"
    trace = str(entry.get("exception", "")).strip().splitlines()
    if trace:
        # The innermost frame of the gateway's own code, and what was raised.
        frames = [m for m in map(_FRAME.search, trace) if m]
        ours = [m for m in frames if "site-packages" not in m["path"]] or frames
        if ours:
            path = ours[-1]["path"]
            path = path[path.rfind("/gateway/") + 1 :] if "/gateway/" in path else path
            where = f" (at {path}:{ours[-1]['line']}, in {ours[-1]['func']})"
        else:
            where = ""
        text += f": {trace[-1][:200]}{where}"
    return text


def log_kinds(lines: Sequence[str]) -> list[str]:
    kinds = Counter(_log_kind(line) for line in lines if line.strip())
    shown = [f"- {n}{TIMES}`{kind}`" for kind, n in kinds.most_common(LOG_KINDS_SHOWN)]
    if len(kinds) > LOG_KINDS_SHOWN:
        shown.append(f"- and {len(kinds) - LOG_KINDS_SHOWN} other kind(s)")
    return shown


def _status_rows(result: SoakResult) -> list[list[str]]:
    tally = result.tally
    rows = []
    for kind in KINDS:
        statuses = tally.statuses.get(kind)
        ok = statuses[200] if statuses else 0
        other = ", ".join(
            f"{code}: {n}" for code, n in sorted((statuses or {}).items()) if code != 200
        )
        errors = sum(n for key, n in tally.errors.items() if key.startswith(f"{kind}: "))
        rows.append(
            [KIND_LABELS[kind], f"{tally.sent[kind]:,}", f"{ok:,}", other or "-", str(errors)]
        )
    return rows


def marker_note(result: SoakResult) -> str:
    """The growth the memory quota backend is expected to show in a soak shorter than its TTL."""
    span = result.samples[-1].elapsed
    if result.steady is not result.samples:
        first = result.steady[0]
        return (
            f"The measured rounds ran {span:.0f} s, longer than the {SETTLE_MARKER_TTL:g} s the "
            "memory quota backend keeps each request's settle marker; the slope and the verdict "
            f"use the {len(result.steady)} samples from {first.elapsed:.0f} s on, once the "
            "markers had stopped accumulating (over every sample, the first minute's included, "
            f"the slope is {result.slope_all_mib_per_1k:+.3f} MiB per 1,000 requests)."
        )
    return (
        f"Expected growth: the measured rounds ran {span:.0f} s, less than the "
        f"{SETTLE_MARKER_TTL:g} s the memory quota backend (used with quotas on or off) keeps "
        "one settle marker per request (`settled_ttl` in gateway/app.py, at most "
        f"{MAX_SETTLED:,} in gateway/quota/memory.py), so markers may still have been "
        "accumulating at the last sample: part of the slope may be those markers, and it stops "
        "once they start to expire. Growth beyond them is what would keep going."
    )


def _extent(result: SoakResult) -> list[str]:
    """How far the soak got, and what its rate says about the 200,000-request target."""
    s = result.settings
    rate = result.rate
    planned = s.total_requests
    lines = [
        f"It sent {result.requests:,} measured requests at {rate:,.0f} req/s (round time; "
        f"settling between rounds left out)."
    ]
    if result.stopped_early:
        lines[0] += (
            f" **It stopped after {len(result.samples) - 1} of {s.rounds} rounds "
            f"({result.requests:,} of {planned:,} planned) to keep the run within its time "
            "budget.**"
        )
    target = 200_000
    if result.requests < target and rate:
        lines[0] += (
            f" At that rate {target:,} requests would take {target / rate:,.0f} s; this is an "
            f"extrapolation from {result.requests:,}, not a measurement."
        )
    return [*lines, ""]


def section(result: SoakResult) -> list[str]:
    s = result.settings
    samples = _table(
        ["round", "requests so far", "time in", "RSS MiB", "fds", "round took", "settled in"],
        [
            [
                "warm-up" if index == 0 else str(index),
                f"{sample.requests:,}",
                f"{sample.elapsed:.0f} s",
                f"{sample.rss_mib:.1f}",
                str(sample.fds),
                f"{sample.round_seconds:.1f} s",
                f"{sample.settle_seconds:.1f} s" + ("" if sample.settled else " (NOT settled)"),
            ]
            for index, sample in enumerate(result.samples)
        ],
    )
    codes = ", ".join(f"{code}: {n:,}" for code, n in result.gateway_codes.items()) or "none"
    aborted = result.tally.sent["aborted"]
    errors = [
        f"- **{key}: {n}** (first: `{result.tally.examples[key]}`)"
        for key, n in result.tally.errors.most_common()
    ]
    logs = log_kinds(result.log_lines)
    odd = unexpected_codes(result)
    flagged = (
        [
            "**The gateway counted answers other than 200 and 499 (a caller who left): "
            + ", ".join(f"{code}: {n:,}" for code, n in odd.items())
            + ".** The client got 200 and its stream for each: the gateway's own record of "
            "those requests is wrong (see its log below).",
            "",
        ]
        if odd
        else []
    )
    return [
        f"### Soak: the gateway's memory and file descriptors over {result.requests:,} requests",
        "",
        f"Run on {result.started} UTC, in {result.seconds:.0f} s: {len(result.samples) - 1} "
        f"rounds of {s.requests_per_round:,} requests after a warm-up round of "
        f"{s.warmup_requests:,}, "
        f"{s.concurrency} at a time, seed {s.seed}, {_mix(s)}; "
        f"{result.events_per_stream} events per complete stream, "
        f"{s.chunk_interval * 1e3:g} ms apart. Each row is read once the gateway has settled "
        "after that round.",
        "",
        f"**Verdict: {result.verdict}.**",
        "",
        *_extent(result),
        *samples,
        "",
        f"Slope (least squares over {len(result.steady)} samples): "
        f"{result.slope_mib_per_1k:+.3f} MiB ({result.slope_mib_per_1k * 1024:+.0f} KiB) of RSS "
        "per 1,000 requests. " + marker_note(result),
        "",
        "Requests as the client saw them (an aborted stream counts as its 200; an error is a "
        "non-200 answer, a failed connection or a stream that broke off on its own):",
        "",
        *_table(["kind", "sent", "HTTP 200", "other statuses", "errors"], _status_rows(result)),
        "",
        f"The gateway's own count over the measured rounds (`gateway_requests_total` by code): "
        f"{codes}; callers it saw leave (`gateway_client_disconnects_total`): "
        f"{result.gateway_disconnects:,}, for {aborted:,} aborted streams (a stream aborted "
        "after its last content event may have been complete on the gateway's side).",
        "",
        *flagged,
        *(errors or ["Errors seen by the client: none."]),
        "",
        f"The soak gateway logged {result.log_total:,} line(s) at level info or above, access "
        f"lines included; {len(result.log_lines)} of them at level warning or above "
        "(warm-up included)" + (", by kind:" if logs else "."),
        *([""] if logs else []),
        *logs,
    ]


def stdout_lines(result: SoakResult) -> list[str]:
    return [
        "Soak:",
        *section(result)[2:],
    ]
