"""The measurements: each target in turn, round after round, so drift hits all of them alike."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp

from bench.load import Call, LoadResult, LoadTool, run_load, write_lua
from bench.procs import Proc, redis_commands
from bench.streams import StreamTiming, problems, run_streams, stream_once

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int = 3
    connections: int = 32
    seconds: float = 8.0
    warmup_seconds: float = 2.0
    ttfe_streams: int = 200
    ttfe_concurrency: int = 20
    drip_streams: int = 60
    drip_concurrency: int = 10
    paced_streams: int = 100
    paced_concurrency: int = 50
    drip_interval: float = 0.05


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    call: Call
    stream_call: Call
    proxy: Proc | None
    """The process between caller and simulator; None when calling the simulator directly."""
    streams: bool = True
    """False: measured in the JSON load phase only (the quota paths, to keep the run short)."""
    helper: Proc | None = None
    """A process the proxy calls on every request (Redis); its CPU is on the path too."""
    redis_port: int | None = None
    """The helper's Redis port, to count the commands each request costs."""
    upstream: Proc | None = None
    """The simulator this path calls when it is not the run's own (the HTTPS one); its CPU is
    the path's simulator CPU."""


@dataclass(frozen=True, slots=True)
class LoadRound:
    result: LoadResult
    proxy_cpu_us: float
    """CPU microseconds per request of the proxy process (NaN going direct)."""
    sim_cpu_us: float
    helper_cpu_us: float = math.nan
    """CPU microseconds per request of the helper process (NaN without one)."""
    redis_commands: float = math.nan
    """Redis commands processed per request, those its scripts ran included (NaN without Redis)."""
    redis_scripts: float = math.nan
    """EVAL/EVALSHA calls per request: round trips to Redis (NaN without Redis)."""


@dataclass(slots=True)
class Results:
    load: dict[str, list[LoadRound]] = field(default_factory=dict)
    load_problems: dict[str, list[str]] = field(default_factory=dict)
    """Per target, what went wrong in rounds with errors: wrk's error kinds and a probe."""
    ttfe: dict[str, list[list[StreamTiming]]] = field(default_factory=dict)
    drip: dict[str, list[list[StreamTiming]]] = field(default_factory=dict)
    paced: dict[str, list[list[StreamTiming]]] = field(default_factory=dict)


def rotated(items: Sequence[T], by: int) -> list[T]:
    """Round r starts with a different target, so none always runs first (or last)."""
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


class Runner:
    def __init__(
        self,
        targets: Sequence[Target],
        simulator: Proc,
        simulator_url: str,
        settings: Settings,
        tool: LoadTool,
        workdir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.targets = list(targets)
        self.simulator = simulator
        self.simulator_url = simulator_url
        self.settings = settings
        self.tool = tool
        self.workdir = workdir
        self.say = say
        self.results = Results()

    def _check_alive(self) -> None:
        self.simulator.check_alive()
        for target in self.targets:
            for proc in (target.proxy, target.helper, target.upstream):
                if proc is not None:
                    proc.check_alive()

    @property
    def stream_targets(self) -> list[Target]:
        return [target for target in self.targets if target.streams]

    async def smoke(self) -> None:
        """One JSON and one streamed request per target, so nothing below measures errors."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for target in self.targets:
                call = target.call
                async with session.post(call.url, data=call.body, headers=call.headers) as r:
                    text = await r.text()
                    if r.status != 200 or '"response"' not in text:
                        raise RuntimeError(f"{target.name}: {call.url} answered {r.status}: {text}")
                if not target.streams:
                    continue
                timing = await stream_once(session, target.stream_call)
                if timing.problem:
                    raise RuntimeError(f"{target.name}: stream failed: {timing.problem}")

    async def load_phase(self) -> None:
        s = self.settings
        luas = {t.name: write_lua(t.call, self.workdir / f"{t.name}.lua") for t in self.targets}
        for target in self.targets:
            # Untimed: fills connection pools and lets each process reach a steady state.
            await run_load(
                self.tool, target.call, s.connections, s.warmup_seconds, luas[target.name]
            )
        for round_no in range(s.rounds):
            for target in rotated(self.targets, round_no):
                measured = await self._load_round(target, luas[target.name])
                self.results.load.setdefault(target.name, []).append(measured)
                result = measured.result
                self.say(
                    f"JSON round {round_no + 1}/{s.rounds} {target.name:14}: "
                    f"{result.rps:7.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                    + (f" {dict(result.error_kinds)}" if result.errors else "")
                )
                if result.errors:
                    problem = f"round {round_no + 1}: {await self._probe(target)}"
                    self.results.load_problems.setdefault(target.name, []).append(problem)
                    self.say(f"  {target.name}: {problem}")

    async def _load_round(self, target: Target, lua: Path) -> LoadRound:
        s = self.settings

        def cpu(proc: Proc | None) -> float:
            return proc.cpu_seconds() if proc else math.nan

        simulator = target.upstream or self.simulator
        proxy_before, helper_before = cpu(target.proxy), cpu(target.helper)
        sim_before = simulator.cpu_seconds()
        redis_before = await redis_commands(target.redis_port) if target.redis_port else (0, 0)
        result = await run_load(self.tool, target.call, s.connections, s.seconds, lua)
        sim_cpu = simulator.cpu_seconds() - sim_before
        proxy_cpu = cpu(target.proxy) - proxy_before
        helper_cpu = cpu(target.helper) - helper_before
        redis_after = await redis_commands(target.redis_port) if target.redis_port else (0, 0)
        # The two INFO calls made before the round count as commands too.
        redis_ops = redis_after[0] - redis_before[0] - 2 if target.redis_port else math.nan
        redis_scripts = redis_after[1] - redis_before[1] if target.redis_port else math.nan
        self._check_alive()
        done = max(result.requests, 1)
        return LoadRound(
            result,
            proxy_cpu / done * 1e6,
            sim_cpu / done * 1e6,
            helper_cpu / done * 1e6,
            redis_ops / done,
            redis_scripts / done,
        )

    async def _probe(self, target: Target) -> str:
        """One more request after a round with errors: what does the path answer now?"""
        call = target.call
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(call.url, data=call.body, headers=call.headers) as r,
            ):
                text = (await r.text())[:300]
                return f"a probe request then got HTTP {r.status}: {text}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"a probe request then failed: {type(exc).__name__}: {exc}"

    async def ttfe_phase(self) -> None:
        s = self.settings
        await self._streams(self.results.ttfe, "TTFE", s.ttfe_streams, s.ttfe_concurrency)

    async def paced_phase(self) -> None:
        """Time to first event of paced streams, many open, one path at a time: a stream's
        own latency on a box that is not saturated (the back-to-back phase saturates it)."""
        s = self.settings
        async with self._slow_drip():
            await self._streams(
                self.results.paced,
                "paced TTFE",
                s.paced_streams,
                s.paced_concurrency,
                spread_over=s.drip_interval,
            )

    async def drip_phase(self) -> None:
        s = self.settings
        async with self._slow_drip():
            await self._streams(
                self.results.drip,
                "drip",
                s.drip_streams,
                s.drip_concurrency,
                spread_over=s.drip_interval,
                # The simulator's pacing drifts with its load (it sleeps after each write);
                # run side by side, every path sees the same drift.
                together=True,
            )

    @contextlib.asynccontextmanager
    async def _slow_drip(self) -> AsyncIterator[None]:
        s = self.settings
        async with aiohttp.ClientSession(base_url=self.simulator_url) as control:
            fault = {"kind": "slow_drip", "interval": s.drip_interval}
            async with control.post("/_sim/faults", json=fault) as response:
                if response.status >= 300:
                    text = await response.text()
                    raise RuntimeError(f"simulator refused {fault}: {response.status} {text}")
            try:
                yield
            finally:
                async with control.delete("/_sim/faults") as response:
                    response.raise_for_status()

    async def _streams(
        self,
        into: dict[str, list[list[StreamTiming]]],
        label: str,
        total: int,
        concurrency: int,
        *,
        spread_over: float = 0.0,
        together: bool = False,
    ) -> None:
        """Each round, every target in turn; or with `together`, all targets at once."""
        for round_no in range(self.settings.rounds):
            order = rotated(self.stream_targets, round_no)
            batches = [order] if together else [[target] for target in order]
            for batch in batches:
                measured = await asyncio.gather(
                    *(
                        run_streams(t.stream_call, total, concurrency, spread_over=spread_over)
                        for t in batch
                    )
                )
                self._check_alive()
                for target, timings in zip(batch, measured, strict=True):
                    into.setdefault(target.name, []).append(timings)
                    failed = problems(timings)
                    self.say(
                        f"{label} round {round_no + 1}/{self.settings.rounds} {target.name:8}: "
                        f"{len(timings) - len(failed)} streams ok, {len(failed)} failed"
                        + (f" (first: {failed[0]})" if failed else "")
                    )
