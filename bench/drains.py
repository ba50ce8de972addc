"""/healthz latency while 200 drains read endless streams: background work must not starve the
callers' requests (issue 15).

The simulator's `endless_stream` fault answers each stream with content events for as long as
anyone reads and never a `done`. The harness opens that many streams through one gateway, reads
each one's first event and leaves: each becomes a drain, which reads on (the gateway's
drain timeout and byte bound are set out of reach for the phase, so all of them are still
reading when it ends). /healthz is probed on the caller port and on the admin port, one request
at a time, first with the gateway idle and then with every drain reading; the same probes in
the same run, so the ratio is what the drains cost a health check. Then the gateway gets
SIGTERM: with every drain still reading, it must settle them and exit within its grace.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.load import Call
from bench.procs import Proc, run_capped
from bench.soak import rss_kib, settle_gauges
from bench.stack import event_loop_of
from bench.stats import percentile

DRAINS_GAUGE = "gateway_stream_drains"
KIB = 1024


@dataclass(frozen=True, slots=True)
class DrainsSettings:
    drains: int = 200
    burst: int = 100
    """Content events per write of the simulator (about 5 KiB)."""
    probes: int = 300
    """Sequential /healthz requests per port and condition."""
    probe_gap: float = 0.01
    """Seconds between one probe's answer and the next probe."""
    p99_limit_ms: float = 100.0
    """The target: /healthz p99 while the drains read."""
    start_within: float = 60.0

    def gateway_quota(self) -> dict[str, object]:
        """The gateway's `quota` section: memory quotas, every drain out of reach of its time
        and byte bounds, and room for all of them in one tenant (which may hold an eighth)."""
        return {
            "backend": "memory",
            "max_drains": self.drains * 8,
            "drain_timeout": 3600,
            "drain_max_bytes": 2**40,
        }


@dataclass(slots=True)
class Probes:
    """One port's /healthz latencies under one condition, in milliseconds."""

    ms: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def p50(self) -> float:
        return percentile(self.ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.ms, 99)

    @property
    def max(self) -> float:
        return max(self.ms, default=float("nan"))


@dataclass(slots=True)
class DrainsResult:
    settings: DrainsSettings
    idle: dict[str, Probes] = field(default_factory=dict)
    """By port ("caller", "admin"), the gateway idle."""
    busy: dict[str, Probes] = field(default_factory=dict)
    """By port, every drain reading."""
    drains_before: float = 0.0
    drains_after: float = 0.0
    """gateway_stream_drains when the busy probes began and when they ended."""
    gateway_cpu_share: float = 0.0
    """The gateway's CPU seconds per wall second while the busy probes ran (1.0 = one core)."""
    simulator_cpu_share: float = 0.0
    read_mib_per_s: float = math.nan
    """What the drains took from upstream meanwhile: the bytes the simulator's sockets had
    acknowledged (TCP flow control opens the window only as the gateway reads); NaN without
    `ss`."""
    rss_idle_kib: int = 0
    rss_busy_kib: int = 0
    stopped: str = ""
    event_loop: str = "unknown"
    """The loop the gateway said it ran on (its `started` line)."""
    """How the gateway's SIGTERM went, with every drain reading."""
    stop_seconds: float = 0.0
    opened_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        busy = self.busy.get("caller")
        return (
            not self.errors
            and busy is not None
            and busy.failed == 0
            and busy.p99 <= self.settings.p99_limit_ms
            and self.drains_after >= self.settings.drains
            and self.stopped.startswith("exited with 0")
        )


async def acked_bytes(port: int) -> float:
    """Bytes acknowledged on the established TCP connections from local `port`, summed
    (iproute2's `ss`); NaN when `ss` is not there or fails."""
    ss = shutil.which("ss")
    if ss is None:
        return math.nan
    code, out = await run_capped(
        ss, "-tinH", "state", "established", f"( sport = :{port} )", limit=10.0
    )
    if code != 0:
        return math.nan
    return float(sum(int(n) for n in re.findall(r"\bbytes_acked:(\d+)", out)))


async def _gauge(session: aiohttp.ClientSession, admin_url: str) -> float:
    return (await settle_gauges(session, f"{admin_url}/metrics"))[DRAINS_GAUGE]


async def _until_gauge(
    session: aiohttp.ClientSession, admin_url: str, wanted: float, within: float
) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await _gauge(session, admin_url) == wanted:
            return True
        await asyncio.sleep(0.1)
    return False


async def _probe(session: aiohttp.ClientSession, url: str, settings: DrainsSettings) -> Probes:
    probes = Probes()
    timeout = aiohttp.ClientTimeout(total=10)
    for _ in range(settings.probes):
        started = time.perf_counter()
        try:
            async with session.get(url, timeout=timeout) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            probes.ms.append((time.perf_counter() - started) * 1000)
        else:
            probes.failed += 1
        await asyncio.sleep(settings.probe_gap)
    return probes


async def _probe_both(
    session: aiohttp.ClientSession, gateway_url: str, admin_url: str, settings: DrainsSettings
) -> dict[str, Probes]:
    return {
        "caller": await _probe(session, f"{gateway_url}/healthz", settings),
        "admin": await _probe(session, f"{admin_url}/healthz", settings),
    }


async def _abandon(session: aiohttp.ClientSession, call: Call) -> str | None:
    """A stream whose caller leaves after its first bytes; what went wrong, if anything."""
    try:
        async with session.post(call.url, data=call.body, headers=call.headers) as response:
            if response.status != 200:
                return f"HTTP {response.status}"
            await response.content.readany()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__
    return None


async def run_drains(
    gateway: Proc,
    simulator: Proc,
    sim_port: int,
    gateway_url: str,
    admin_url: str,
    stream_call: Call,
    settings: DrainsSettings,
    say: Callable[[str], None],
) -> DrainsResult:
    result = DrainsResult(settings)
    clock = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(20):  # warm-up: the first requests import and allocate
            async with session.get(f"{gateway_url}/healthz") as response:
                await response.read()
        result.idle = await _probe_both(session, gateway_url, admin_url, settings)
        result.rss_idle_kib = rss_kib(gateway.pid)

        spec = {"kind": "endless_stream", "burst": settings.burst}
        async with session.post(f"http://127.0.0.1:{sim_port}/_sim/faults", json=spec) as response:
            response.raise_for_status()
        say(f"drains: opening {settings.drains} endless streams and leaving each ...")
        opened = time.monotonic()
        outcomes = await asyncio.gather(
            *(_abandon(session, stream_call) for _ in range(settings.drains))
        )
        result.errors += [why for why in outcomes if why is not None]
        if not await _until_gauge(session, admin_url, settings.drains, settings.start_within):
            result.errors.append(
                f"{DRAINS_GAUGE} did not reach {settings.drains} within {settings.start_within:g} s"
            )
        result.opened_seconds = time.monotonic() - opened

        result.drains_before = await _gauge(session, admin_url)
        before = gateway.cpu_seconds(), simulator.cpu_seconds(), await acked_bytes(sim_port)
        began = time.monotonic()
        result.busy = await _probe_both(session, gateway_url, admin_url, settings)
        wall = time.monotonic() - began
        result.gateway_cpu_share = (gateway.cpu_seconds() - before[0]) / wall
        result.simulator_cpu_share = (simulator.cpu_seconds() - before[1]) / wall
        result.read_mib_per_s = (await acked_bytes(sim_port) - before[2]) / wall / 2**20
        result.rss_busy_kib = rss_kib(gateway.pid)
        result.drains_after = await _gauge(session, admin_url)

    # With every drain still reading: a graceful stop settles them and exits in time.
    stopping = time.monotonic()
    result.stopped = await gateway.stop()
    result.event_loop = event_loop_of(gateway.log)
    result.stop_seconds = time.monotonic() - stopping
    result.seconds = time.monotonic() - clock
    return result


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def summary_line(r: DrainsResult) -> str:
    caller = r.busy.get("caller", Probes())
    idle = r.idle.get("caller", Probes())
    return (
        f"/healthz p99 {_ms(caller.p99)} (max {_ms(caller.max)}) while "
        f"{r.drains_after:.0f} drains read endless streams, vs {_ms(idle.p99)} idle; the "
        f"gateway meanwhile used {r.gateway_cpu_share:.0%} of a core"
    )


def section(r: DrainsResult) -> list[str]:
    s = r.settings
    rows = []
    for port in ("caller", "admin"):
        for condition, probes in (("idle", r.idle), (f"{s.drains} drains reading", r.busy)):
            p = probes.get(port, Probes())
            rows.append(
                f"| {port} port | {condition} | {_ms(p.p50)} | {_ms(p.p99)} | {_ms(p.max)} "
                f"| {p.failed} |"
            )
    problems = [f"- **{why}**" for why in r.errors]
    return [
        f"### /healthz while {s.drains} drains read endless streams",
        "",
        f"Measured in {r.seconds:.0f} s. The simulator's `endless_stream` fault ({s.burst} "
        "content events per write, never `done`) answered every stream; one client opened "
        f"{s.drains} streams through one gateway (memory quotas, all features on, "
        f"{r.event_loop}'s event loop), read each "
        "one's first bytes and left, so each became a drain reading on as fast as the "
        "simulator writes (the phase sets `quota.drain_timeout` and `quota.drain_max_bytes` "
        "out of reach, and `quota.max_drains` to hold them all). /healthz was then probed "
        f"{s.probes} times per port, one request at a time, {s.probe_gap * 1000:g} ms apart: "
        "first with the gateway idle, then with every drain reading. The simulator and the "
        "gateway are processes of their own, on a machine with two shared cores.",
        "",
        f"**{summary_line(r)}.**",
        "",
        "| port | condition | p50 | p99 | max | failed |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"- Drains reading: {r.drains_before:.0f} when the probes began, {r.drains_after:.0f} "
        f"when they ended (opened in {r.opened_seconds:.1f} s). Meanwhile the drains "
        f"read {r.read_mib_per_s:.1f} MiB/s from upstream (TCP bytes acknowledged, by `ss`), "
        f"which took the simulator {r.simulator_cpu_share:.0%} of a core to write.",
        f"- Gateway RSS: {r.rss_idle_kib / KIB:.1f} MiB idle, {r.rss_busy_kib / KIB:.1f} MiB "
        "with every drain reading.",
        f"- SIGTERM with every drain reading: the gateway {r.stopped}"
        + ("." if r.stopped.startswith("exited with 0") else " **(expected exit 0)**."),
        *problems,
    ]
