"""Thousands of streams open at once through one gateway: errors, and its memory per stream.

The simulator drips each stream's events slowly (its `slow_drip` fault), so every stream stays
open for the whole measurement while an event still trickles through now and then. One asyncio
client in the harness opens them all (a few hundred connecting at a time), reads each one's
first event, keeps reading what drips, and once every stream is open samples the gateway's RSS
and fds for a few seconds; then it closes every connection, waits for the gateway to settle (its
own gauges back to 0) and samples again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.load import Call
from bench.procs import Proc
from bench.soak import open_fds, rss_kib, settle_gauges

KIB = 1024


@dataclass(frozen=True, slots=True)
class OpenStreamsSettings:
    streams: int = 5_000
    connecting: int = 200
    """Streams being opened at once (until their first event); the rest wait their turn."""
    drip_interval: float = 5.0
    """Seconds between a stream's events: with 13 events, a stream lasts about a minute."""
    hold_seconds: float = 5.0
    """How long all streams are kept open once the last one has its first event."""
    warmup_requests: int = 300
    open_within: float = 60.0
    settle_within: float = 40.0
    """Past the gateway's `quota.drain_timeout` (30 s): each closed stream becomes a drain that
    reads the slow drip on until its done event or that timeout (30 s waited "no" for ever)."""
    rss_limit_kib: float = 64.0
    """The target: at most this much RSS per open stream."""


@dataclass(slots=True)
class OpenStreamsResult:
    settings: OpenStreamsSettings
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    fds_start: int = 0
    fds_peak: int = 0
    fds_end: int = 0
    sim_rss_start_kib: int = 0
    sim_rss_peak_kib: int = 0
    opened: int = 0
    """Streams whose first event arrived."""
    open_at_peak: int = 0
    """Streams open (first event in, not ended) when the gateway's RSS peaked."""
    active_gauge_at_peak: float = 0.0
    """The gateway's own gateway_active_streams at that moment."""
    open_seconds: float = 0.0
    """From the first connection to the last stream's first event."""
    events: int = 0
    """Events received in all, first events included."""
    ended_early: int = 0
    """Streams that ended (done event or not) before the client closed them."""
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    settled: bool = False
    settle_seconds: float = 0.0
    fd_limit: int = 0
    seconds: float = 0.0
    gateway_pid: int = 0
    second_peak_kib: int = 0
    """The gateway's RSS peak in a second wave of as many streams, after the first closed."""
    second_end_kib: int = 0

    def error(self, what: str, detail: str) -> None:
        self.errors[what] += 1
        self.examples.setdefault(what, detail[:300])

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.ended_early

    @property
    def per_stream_kib(self) -> float:
        return (self.rss_peak_kib - self.rss_start_kib) / max(self.open_at_peak, 1)

    @property
    def met(self) -> bool:
        s = self.settings
        return (
            self.error_count == 0
            and self.open_at_peak >= s.streams
            and self.per_stream_kib <= s.rss_limit_kib
        )


_FIRST_WAVE_FIGURES = (
    "rss_peak_kib",
    "rss_end_kib",
    "fds_peak",
    "fds_end",
    "sim_rss_peak_kib",
    "opened",
    "open_at_peak",
    "active_gauge_at_peak",
    "open_seconds",
    "settled",
    "settle_seconds",
)


def raise_fd_limit(wanted: int) -> int:
    """Soft RLIMIT_NOFILE up to `wanted` (or the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        # Root may raise the hard limit too; anyone else gets what the hard limit allows.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


async def run_open_streams(
    gateway: Proc,
    simulator: Proc,
    simulator_url: str,
    admin_url: str,
    call: Call,
    json_call: Call,
    settings: OpenStreamsSettings,
    say: Callable[[str], None],
) -> OpenStreamsResult:
    s = settings
    clock = time.monotonic()
    result = OpenStreamsResult(s, gateway_pid=gateway.pid)
    result.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    metrics_url = f"{admin_url}/metrics"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    # One connection per stream: no pool limit, no keep-alive reuse to speak of.
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as admin,
    ):
        # Warm-up, with events unpaced: imports, pools and caches reach their size first.
        for index in range(s.warmup_requests):
            used = call if index % 2 else json_call
            async with session.post(used.url, data=used.body, headers=used.headers) as r:
                await r.read()
        await _wait_settled(admin, metrics_url, s.settle_within)
        result.rss_start_kib = rss_kib(gateway.pid)
        result.fds_start = open_fds(gateway.pid)
        result.sim_rss_start_kib = rss_kib(simulator.pid)
        say(
            f"open streams: gateway RSS {result.rss_start_kib / KIB:.1f} MiB, "
            f"fds {result.fds_start} before; opening {s.streams:,} streams "
            f"(events {s.drip_interval:g} s apart, fd limit {result.fd_limit:,}) ..."
        )
        for wave in (1, 2):
            first = wave == 1
            first_wave = copy.copy(result)
            if not first:
                # The same again: memory the first wave left to the allocator should be
                # reused, not added to. A leak would show as a higher second peak.
                say(f"open streams: second wave of {s.streams:,} ...")
                result.rss_peak_kib = 0
            async with admin.post(
                f"{simulator_url}/_sim/faults",
                json={"kind": "slow_drip", "interval": s.drip_interval},
            ) as response:
                if response.status >= 300:
                    raise RuntimeError(f"simulator refused slow_drip: {await response.text()}")
            gate = asyncio.Semaphore(s.connecting)
            first_events = 0
            open_now = 0
            all_open = asyncio.Event()

            # Bound now: each wave's tasks are awaited within that wave.
            async def one(
                gate: asyncio.Semaphore = gate, all_open: asyncio.Event = all_open
            ) -> None:
                nonlocal first_events, open_now
                counted = False
                holding = False
                await gate.acquire()
                try:
                    async with session.post(call.url, data=call.body, headers=call.headers) as r:
                        if r.status != 200:
                            body = (await r.read())[:200].decode(errors="replace")
                            result.error(f"HTTP {r.status}", body)
                            return
                        pending = b""
                        async for chunk in r.content.iter_any():
                            *complete, pending = (pending + chunk).split(b"\n\n")
                            result.events += len(complete)
                            if complete and not counted:
                                counted = True
                                first_events += 1
                                open_now += 1
                                holding = True
                                gate.release()
                                if first_events >= s.streams:
                                    all_open.set()
                        result.ended_early += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                finally:
                    if counted:
                        open_now -= 1
                    if not holding:
                        gate.release()
                    if first_events + result.error_count >= s.streams:
                        all_open.set()

            started = time.monotonic()
            tasks = [asyncio.create_task(one()) for _ in range(s.streams)]
            try:
                last_say = started
                while not all_open.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_open.wait(), 1.0)
                    gateway.check_alive()
                    simulator.check_alive()
                    if time.monotonic() - last_say >= 5:
                        last_say = time.monotonic()
                        say(f"open streams: {first_events:,} open after {last_say - started:.0f} s")
                    if time.monotonic() - started > s.open_within:
                        result.error(
                            "not open in time", f"{first_events} open after {s.open_within}"
                        )
                        break
                result.open_seconds = time.monotonic() - started
                result.opened = first_events
                # All open: sample for a while; the peak is the highest reading.
                hold_until = time.monotonic() + s.hold_seconds
                while True:
                    rss = rss_kib(gateway.pid)
                    if rss > result.rss_peak_kib:
                        result.rss_peak_kib = rss
                        result.open_at_peak = open_now
                        result.active_gauge_at_peak = (await settle_gauges(admin, metrics_url))[
                            "gateway_active_streams"
                        ]
                    result.fds_peak = max(result.fds_peak, open_fds(gateway.pid))
                    result.sim_rss_peak_kib = max(result.sim_rss_peak_kib, rss_kib(simulator.pid))
                    if time.monotonic() >= hold_until:
                        break
                    await asyncio.sleep(0.5)
                say(
                    f"open streams: {result.opened:,} open in {result.open_seconds:.1f} s; "
                    f"gateway RSS peak {result.rss_peak_kib / KIB:.1f} MiB with "
                    f"{result.open_at_peak:,} open "
                    f"(its gauge: {result.active_gauge_at_peak:.0f}), fds {result.fds_peak}; "
                    "closing them ..."
                )
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                async with admin.delete(f"{simulator_url}/_sim/faults") as response:
                    response.raise_for_status()
            settle_started = time.monotonic()
            result.settled = await _wait_settled(admin, metrics_url, s.settle_within)
            result.settle_seconds = time.monotonic() - settle_started
            # A moment more: memory freed by the last handlers and their connections.
            await asyncio.sleep(1.0)
            result.rss_end_kib = rss_kib(gateway.pid)
            result.fds_end = open_fds(gateway.pid)
            if first:
                continue
            result.second_peak_kib = result.rss_peak_kib
            result.second_end_kib = result.rss_end_kib
            # The report's figures are the first wave's; errors and events count both.
            for name in _FIRST_WAVE_FIGURES:
                setattr(result, name, getattr(first_wave, name))
    result.seconds = time.monotonic() - clock
    return result


async def _wait_settled(admin: aiohttp.ClientSession, url: str, within: float) -> bool:
    started = time.monotonic()
    zeros = 0
    while time.monotonic() - started < within:
        busy = sum((await settle_gauges(admin, url)).values())
        zeros = zeros + 1 if busy == 0 else 0
        if zeros >= 2:
            return True
        await asyncio.sleep(0.2)
    return False


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summary_line(r: OpenStreamsResult) -> str:
    return (
        f"{r.open_at_peak:,} of {r.settings.streams:,} streams open at once, "
        f"{r.error_count} errors; gateway RSS {r.rss_start_kib / KIB:.1f} → "
        f"{r.rss_peak_kib / KIB:.1f} → {r.rss_end_kib / KIB:.1f} MiB (start → all open → "
        f"closed), {r.per_stream_kib:.1f} KiB per open stream"
    )


REUSE_SLACK = 0.10
"""A second wave may peak this share of the first wave's growth higher and still count as
reusing the first wave's memory (the peak is sampled, and allocators are not exact)."""


def reuses_memory(r: OpenStreamsResult) -> bool:
    growth = max(r.rss_peak_kib - r.rss_start_kib, 1)
    return r.second_peak_kib <= r.rss_peak_kib + REUSE_SLACK * growth


def reuse_verdict(r: OpenStreamsResult) -> str:
    if r.second_peak_kib == 0:
        return "not measured"
    if reuses_memory(r):
        return "the memory the first wave left behind was reused, not added to (no leak)"
    return "**the second wave needed more memory than the first: something is kept per stream**"


def section(r: OpenStreamsResult) -> list[str]:
    s = r.settings
    errors = [
        f"- **{what}: {n}** (first: `{r.examples.get(what, '')}`)"
        for what, n in r.errors.most_common()
    ]
    if r.ended_early:
        errors.append(f"- **streams that ended before the client closed them: {r.ended_early}**")
    return [
        f"### {s.streams:,} concurrent open streams through one gateway",
        "",
        f"Measured in {r.seconds:.0f} s. The simulator's `slow_drip` fault spaced each "
        f"stream's events {s.drip_interval:g} s apart, so a stream lasts about a minute; one "
        f"asyncio client opened {s.streams:,} streams, {s.connecting} connecting at a time, "
        "read each one's first event and kept reading what dripped; with all open it sampled "
        f"the gateway's RSS and fds for {s.hold_seconds:g} s (the peak is the highest "
        "reading), then closed every connection and waited for the gateway's "
        "`gateway_active_streams`, `gateway_stream_drains` and `gateway_inflight_requests` to "
        f"read 0 (settled: {'yes' if r.settled else '**no**'}, in {r.settle_seconds:.1f} s). "
        f"The gateway (memory quotas, all features on) and the simulator are processes of "
        f"their own, started for this phase; before the streams, {s.warmup_requests} "
        "unpaced requests (half JSON, half streams) warmed the gateway up. Open-file limit: "
        f"{r.fd_limit:,} (the harness raises its soft limit, which the children inherit).",
        "",
        f"**{summary_line(r)}.**",
        "",
        *_table(
            ["", "start", "all open (peak)", "closed"],
            [
                [
                    "gateway RSS",
                    f"{r.rss_start_kib / KIB:.1f} MiB",
                    f"{r.rss_peak_kib / KIB:.1f} MiB",
                    f"{r.rss_end_kib / KIB:.1f} MiB",
                ],
                ["gateway fds", str(r.fds_start), str(r.fds_peak), str(r.fds_end)],
                [
                    "gateway RSS, second wave",
                    f"{r.rss_end_kib / KIB:.1f} MiB",
                    f"{r.second_peak_kib / KIB:.1f} MiB",
                    f"{r.second_end_kib / KIB:.1f} MiB",
                ],
                [
                    "simulator RSS",
                    f"{r.sim_rss_start_kib / KIB:.1f} MiB",
                    f"{r.sim_rss_peak_kib / KIB:.1f} MiB",
                    "-",
                ],
            ],
        ),
        "",
        f"Opening all of them took {r.open_seconds:.1f} s; {r.opened:,} first events arrived, "
        f"{r.events:,} events in all. At the peak the client held {r.open_at_peak:,} streams "
        f"and the gateway's own `gateway_active_streams` read {r.active_gauge_at_peak:.0f}. "
        f"Per open stream: (peak - start) / open = {r.per_stream_kib:.1f} KiB "
        f"(target ≤ {s.rss_limit_kib:g} KiB). After closing, RSS was "
        f"{(r.rss_end_kib - r.rss_start_kib) / KIB:+.1f} MiB from its start (CPython returns "
        "freed memory to the system only when whole arenas empty, and glibc's heap only from "
        f"its top). A second wave of {s.streams:,} streams then peaked at "
        f"{r.second_peak_kib / KIB:.1f} MiB, {(r.second_peak_kib - r.rss_peak_kib) / KIB:+.1f} "
        "MiB from the first wave's peak, and ended at "
        f"{r.second_end_kib / KIB:.1f} MiB: {reuse_verdict(r)}.",
        "",
        *(errors or ["Errors: none."]),
    ]
