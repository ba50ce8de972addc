"""`python -m bench` (`make bench`): start simulator, floor and gateways; measure; report.

Every process is started here on free loopback ports and stopped before exit, whatever
happens; logs go to a temporary directory, kept (and its path printed) when a run fails.

The phases, in order: JSON load (wrk), streams (time to first event, per-chunk delay),
open-loop latency at a fixed rate, thousands of concurrent open streams, the LiteLLM comparison
(bench/litellm.py, when it is there) and the soak, which gets whatever is left of the run's
time budget.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import inspect
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import aiohttp

from bench import targets, tracing
from bench.about import ProcessLog, RunInfo, machine
from bench.drains import DrainsResult, DrainsSettings, run_drains
from bench.drains import section as drains_section
from bench.load import Call, LoadTool, find_load_tool, find_redis, wrk_version
from bench.open_streams import (
    OpenStreamsResult,
    OpenStreamsSettings,
    raise_fd_limit,
    run_open_streams,
)
from bench.open_streams import section as open_streams_section
from bench.openloop import OpenLoopResults, OpenLoopSettings, run_open_loop
from bench.openloop import section as open_loop_section
from bench.phases import Results, Runner, Settings
from bench.procs import ProcessFailed, ProcessSet
from bench.report import (
    LABELS,
    MEASUREMENTS_SECTION,
    PROFILE_ANCHOR,
    PROFILE_SECTION,
    TIMES,
    Extras,
    litellm_section,
    measurements_section,
    profile_section,
    quota_notes,
    stdout_summary,
    tables,
    target_rows,
    tls_headline,
    write_markdown,
)
from bench.sections import splice_text
from bench.soak import Kind, Soak, SoakResult, SoakSettings
from bench.soak_report import section as soak_section
from bench.soak_report import stdout_lines as soak_stdout
from bench.stack import (
    AGENT_KEY,
    CALLER_KEY,
    PLATFORM_KEY,
    ROOT,
    Stack,
    count_lines,
    event_loop_of,
    loud_lines,
    target,
)
from bench.summary import (
    DIRECT,
    FLOOR,
    GATEWAY,
    LEVEL_PATHS,
    MEMORY_LEVELS,
    MEMORY_QUOTAS,
    REDIS_LEVELS,
    REDIS_QUOTAS,
    TLS_UPSTREAM,
    TRACED,
    summarise,
)
from bench.tracing import Exported

REPORT = ROOT / "docs" / "benchmarks.md"
LOG_LINES_SHOWN = 5
GATEWAYS = (
    GATEWAY,
    MEMORY_QUOTAS,
    REDIS_QUOTAS,
    MEMORY_LEVELS,
    REDIS_LEVELS,
    TLS_UPSTREAM,
    TRACED,
)
BUDGET = 600.0
"""`make bench` must finish within ten minutes: the soak gets what the other phases left."""
SOAK_MARGIN = 20.0
"""Kept back from the budget after the soak: stopping processes and writing the report."""
FD_LIMIT = 65_536
OPEN_LOOP_PATHS = (DIRECT, REDIS_QUOTAS)
PHASES = ("json", "openloop", "open-streams", "drains", "litellm", "soak")
PRINT_ONLY = frozenset({"json"})
"""Phases `--only` measures and prints without touching the report (the JSON section is one
table of a whole run's summary, so a run of its own is for comparing commits, side by side)."""


def _say(text: str) -> None:
    print(f"bench: {text}", flush=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Every phase's settings, full size or `--quick`."""

    core: Settings
    open_loop: OpenLoopSettings
    open_streams: OpenStreamsSettings
    drains: DrainsSettings
    soak: SoakSettings
    quick: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        soak = SoakSettings.sized(args.soak_requests, args.soak_rounds)
        if not args.quick:
            return cls(
                Settings(),
                OpenLoopSettings(),
                OpenStreamsSettings(streams=args.streams),
                DrainsSettings(),
                soak,
                False,
            )
        return cls(
            Settings(
                rounds=1,
                seconds=3.0,
                warmup_seconds=1.0,
                ttfe_streams=40,
                drip_streams=20,
                paced_streams=50,
            ),
            OpenLoopSettings(rounds=1, seconds=3.0, warmup_seconds=1.0),
            OpenStreamsSettings(streams=min(args.streams, 500), hold_seconds=2.0),
            DrainsSettings(probes=100),
            SoakSettings.sized(min(args.soak_requests, 3_000), 3),
            True,
        )


def _log_summary(procs: ProcessSet) -> list[ProcessLog]:
    summary = []
    for name, ended in procs.stopped.items():
        path = procs.log_dir / f"{name}.log"
        gateway = "gateway" in name
        shown = loud_lines(path, LOG_LINES_SHOWN) if gateway else []
        if not gateway:
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            shown = lines[:LOG_LINES_SHOWN]
        summary.append(ProcessLog(name, ended, count_lines(path), shown, loud=gateway))
    return summary


@dataclasses.dataclass(slots=True)
class Core:
    results: Results
    open_loop: OpenLoopResults | None
    logs: list[ProcessLog]
    event_loop: str
    seconds: dict[str, float]
    spans: Exported | None = None
    """What the tracing-on gateway exported (bench/tracing.py); None when it did not run."""


async def _measure(
    workdir: Path,
    tool: LoadTool,
    plan: Plan,
    redis_server: str,
    *,
    only: Literal["json", "openloop"] | None = None,
) -> Core:
    """The JSON and streaming phases and the open-loop phase, on one set of processes (or
    only the open loop, or only JSON)."""
    seconds: dict[str, float] = {}
    async with ProcessSet(workdir) as procs:
        stack = Stack(procs, workdir)
        clock = time.monotonic()
        redis, redis_port = await stack.start_redis(redis_server)
        sim = await stack.start_simulator()
        open_loop_only = only == "openloop"
        floor, floor_port = (None, 0) if open_loop_only else await stack.start_floor()
        tls = None if open_loop_only else await stack.start_tls_simulator()
        sink, sink_port = (None, 0) if open_loop_only else await tracing.start_sink(stack)
        names = (REDIS_QUOTAS,) if open_loop_only else GATEWAYS
        memory = {"backend": "memory"}
        on_redis = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
        gateways = await stack.start_gateways(
            {
                name: quota
                for name, quota in {
                    GATEWAY: None,
                    MEMORY_QUOTAS: memory,
                    REDIS_QUOTAS: on_redis,
                    MEMORY_LEVELS: memory,
                    REDIS_LEVELS: on_redis,
                    TLS_UPSTREAM: None,
                    TRACED: memory,
                }.items()
                if name in names
            },
            levels=frozenset(LEVEL_PATHS),
            over_tls=frozenset({TLS_UPSTREAM}),
            sections=tracing.gateway_sections(sink_port),
        )
        _say(f"processes ready after {time.monotonic() - clock:.1f} s; logs in {workdir}")
        redis_target = target(
            REDIS_QUOTAS,
            gateways[REDIS_QUOTAS].port,
            CALLER_KEY,
            gateways[REDIS_QUOTAS].proc,
            streams=False,
            helper=redis,
            redis_port=redis_port,
        )
        direct = target(DIRECT, stack.sim_port, AGENT_KEY, None)
        if open_loop_only:
            all_targets = [direct, redis_target]
        else:
            assert floor is not None and tls is not None
            all_targets = [
                direct,
                target(FLOOR, floor_port, PLATFORM_KEY, floor),
                target(GATEWAY, gateways[GATEWAY].port, CALLER_KEY, gateways[GATEWAY].proc),
                # Measured right after the same gateway over plain HTTP: a pair close in time.
                target(
                    TLS_UPSTREAM,
                    gateways[TLS_UPSTREAM].port,
                    CALLER_KEY,
                    gateways[TLS_UPSTREAM].proc,
                    streams=False,
                    upstream=tls.proc,
                ),
                target(
                    MEMORY_QUOTAS,
                    gateways[MEMORY_QUOTAS].port,
                    CALLER_KEY,
                    gateways[MEMORY_QUOTAS].proc,
                ),
                # Right after the same gateway with tracing off: a pair close in time. The sink is
                # the collector: its CPU is on the whole path, not the gateway's.
                target(
                    TRACED,
                    gateways[TRACED].port,
                    CALLER_KEY,
                    gateways[TRACED].proc,
                    streams=False,
                    helper=sink,
                ),
                redis_target,
                target(
                    MEMORY_LEVELS,
                    gateways[MEMORY_LEVELS].port,
                    CALLER_KEY,
                    gateways[MEMORY_LEVELS].proc,
                    streams=False,
                ),
                target(
                    REDIS_LEVELS,
                    gateways[REDIS_LEVELS].port,
                    CALLER_KEY,
                    gateways[REDIS_LEVELS].proc,
                    streams=False,
                    helper=redis,
                    redis_port=redis_port,
                ),
            ]
        runner = Runner(all_targets, sim, stack.sim_url, plan.core, tool, workdir, _say)
        await runner.smoke()
        await _check_quota_state(gateways[name].url for name in names if name != GATEWAY)
        if not open_loop_only:
            clock = time.monotonic()
            _say("JSON requests (load) ...")
            await runner.load_phase()
            await _check_quota_state(gateways[name].url for name in names if name != GATEWAY)
            seconds["JSON"] = time.monotonic() - clock
            if only == "json":
                assert sink is not None
                exported = await tracing.exported(sink, sink_port, gateways[TRACED].admin_url)
                return Core(runner.results, None, _log_summary(procs), "", seconds, exported)
            clock = time.monotonic()
            _say("streams: time to first event ...")
            await runner.ttfe_phase()
            _say("streams: time to first event, paced ...")
            await runner.paced_phase()
            _say("streams: per-chunk delay under slow_drip ...")
            await runner.drip_phase()
            seconds["streams"] = time.monotonic() - clock
        _say(f"open loop at {plan.open_loop.rate:g} req/s ...")
        clock = time.monotonic()
        by_name = {t.name: t for t in all_targets}
        open_loop = await run_open_loop(
            [by_name[name] for name in OPEN_LOOP_PATHS],
            sim,
            plan.open_loop,
            workdir,
            dict(LABELS),
            _say,
        )
        seconds["open loop"] = time.monotonic() - clock
        await _check_quota_state([gateways[REDIS_QUOTAS].url])
        event_loop = event_loop_of(gateways[REDIS_QUOTAS].proc.log)
        spans: Exported | None = None
        if sink is not None:
            spans = await tracing.exported(sink, sink_port, gateways[TRACED].admin_url)
    return Core(runner.results, open_loop, _log_summary(procs), event_loop, seconds, spans)


async def _check_quota_state(urls: Iterable[str]) -> None:
    """Each quota gateway's /readyz: a Redis gateway on its local fallback would say so here."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for url in urls:
            async with session.get(f"{url}/readyz") as response:
                _say(f"{url} /readyz: HTTP {response.status} {await response.text()}")


async def _open_streams(workdir: Path, settings: OpenStreamsSettings) -> OpenStreamsResult:
    """Thousands of open streams through a gateway (memory quotas) and simulator of their own."""
    async with ProcessSet(workdir) as procs:
        stack = Stack(procs, workdir, prefix="open-streams-")
        sim = await stack.start_simulator()
        gateway = (await stack.start_gateways({MEMORY_QUOTAS: {"backend": "memory"}}))[
            MEMORY_QUOTAS
        ]
        calls = target(MEMORY_QUOTAS, gateway.port, CALLER_KEY, gateway.proc)
        return await run_open_streams(
            gateway.proc,
            sim,
            stack.sim_url,
            gateway.admin_url,
            calls.stream_call,
            calls.call,
            settings,
            _say,
        )


async def _drains(workdir: Path, settings: DrainsSettings) -> DrainsResult:
    """Drains reading endless streams through a gateway and simulator of their own."""
    async with ProcessSet(workdir) as procs:
        stack = Stack(procs, workdir, prefix="drains-")
        sim = await stack.start_simulator()
        name = "gateway"
        sections = {name: {"quota": settings.gateway_quota()}}
        gateway = (await stack.start_gateways({name: {"backend": "memory"}}, sections=sections))[
            name
        ]
        calls = target(name, gateway.port, CALLER_KEY, gateway.proc)
        return await run_drains(
            gateway.proc,
            sim,
            stack.sim_port,
            gateway.url,
            gateway.admin_url,
            calls.stream_call,
            settings,
            _say,
        )


async def _soak(workdir: Path, settings: SoakSettings, deadline: float | None) -> SoakResult:
    """The soak on a simulator and a gateway of its own (memory quotas), stopped after it."""
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    async with ProcessSet(workdir) as procs:
        stack = Stack(procs, workdir, prefix="soak-")
        sim = await stack.start_simulator(settings.chunk_interval)
        gateway = (await stack.start_gateways({"gateway": {"backend": "memory"}}))["gateway"]
        _say(f"soak: simulator and gateway (pid {gateway.proc.pid}) ready")
        calls = target("soak-gateway", gateway.port, CALLER_KEY, gateway.proc)
        by_kind: dict[Kind, Call] = {
            "json": calls.call,
            "stream": calls.stream_call,
            "aborted": calls.stream_call,
        }
        soak = Soak(gateway.proc, [sim], by_kind, gateway.admin_url, settings, _say)
        result = await soak.run(started, deadline)
        log = gateway.proc.log
    return dataclasses.replace(result, log_lines=loud_lines(log), log_total=count_lines(log))


async def _litellm(workdir: Path, quick: bool) -> tuple[list[str] | None, str]:
    """bench/litellm.py's `run(...)` (another helper's): its Markdown section, or why none.

    Nothing is agreed with it but the name: `run` gets, by keyword, whichever of `workdir`,
    `say`, `quick` (and `seconds` in a quick run) it accepts; sync or async; a string back.
    """
    try:
        module = importlib.import_module("bench.litellm")
    except ModuleNotFoundError as exc:
        if exc.name == "bench.litellm":
            return None, "bench/litellm.py is not there"
        return None, f"bench/litellm.py could not be imported ({exc})"
    except Exception as exc:
        return None, f"bench/litellm.py could not be imported ({type(exc).__name__}: {exc})"
    run = getattr(module, "run", None)
    if not callable(run):
        return None, "bench/litellm.py has no run()"
    here = workdir / "litellm"
    here.mkdir(exist_ok=True)
    offered: dict[str, object] = {"workdir": here, "say": _say, "quick": quick}
    if quick:
        offered["seconds"] = 3.0
    kwargs: dict[str, object] = {}
    for name, parameter in inspect.signature(run).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in offered:
            kwargs[name] = offered[name]
        elif parameter.default is parameter.empty:
            return None, f"bench.litellm.run() needs {name!r}, which the harness cannot give"
    try:
        if inspect.iscoroutinefunction(run):
            outcome = await run(**kwargs)
        else:
            outcome = await asyncio.to_thread(run, **kwargs)
            if inspect.isawaitable(outcome):
                outcome = await outcome
    except Exception as exc:
        return None, f"bench.litellm.run() failed: {type(exc).__name__}: {exc}"
    if not outcome:
        return None, "bench.litellm.run() returned no section"
    return str(outcome).strip("\n").splitlines(), ""


def _splice_only(phase: str, lines: Sequence[str], rows: Sequence[targets.Row]) -> None:
    """One phase's section and target rows into the existing report; the rest left alone."""
    text = REPORT.read_text() if REPORT.exists() else ""
    text = splice_text(text, phase, lines)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    text = targets.splice_rows(text, rows, f"from `--only {phase}` on {when} UTC")
    text = splice_text(text, PROFILE_SECTION, profile_section(), anchor=PROFILE_ANCHOR)
    # bench/measurements.md is included verbatim: a run of one phase brings it up to date too.
    text = splice_text(text, MEASUREMENTS_SECTION, measurements_section(), anchor=PROFILE_ANCHOR)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)


async def _only(phase: str, plan: Plan, workdir: Path) -> None:
    clock = time.monotonic()
    if phase == "soak":
        soak = await _soak(workdir, plan.soak, None)
        _splice_only(phase, soak_section(soak), targets.soak_row(soak))
        print("\n".join(["", *soak_stdout(soak), ""]), flush=True)
    elif phase == "json":
        tool = await find_load_tool()
        core = await _measure(workdir, tool, plan, await find_redis(), only="json")
        summary = summarise(core.results, [DIRECT, FLOOR, *GATEWAYS])
        lines = ["JSON (non-streaming):", *tables(summary)["load"], ""]
        ratios = {GATEWAY: summary.gateway_vs_floor, **summary.quotas_vs_floor}
        lines += [
            f"* CPU per request, {LABELS[name]}: {summary.load[name].proxy_cpu_us.fmt(0)} µs = "
            f"{compared.cpu_ratio.fmt(2, suffix=TIMES)} the floor's"
            for name, compared in ratios.items()
            if compared is not None
        ]
        lines += [
            f"* CPU per request, {LABELS[name]}: {compared.cpu_ratio.fmt(2, suffix=TIMES)} "
            f"the tenant-only path's on the same backend (per round)"
            for name, compared in summary.levels_vs_tenant.items()
        ]
        lines += [f"* {line}" for line in (*quota_notes(summary), tls_headline(summary)) if line]
        lines += ["", *tracing.section(summary, core.spans)]
        print("\n".join(["", *lines, ""]), flush=True)
    elif phase == "openloop":
        tool = await find_load_tool()
        core = await _measure(workdir, tool, plan, await find_redis(), only="openloop")
        assert core.open_loop is not None
        lines = open_loop_section(core.open_loop, DIRECT)
        _splice_only(phase, lines, targets.open_loop_rows(core.open_loop, REDIS_QUOTAS))
        print("\n".join(["", *lines, ""]), flush=True)
    elif phase == "open-streams":
        result = await _open_streams(workdir, plan.open_streams)
        lines = open_streams_section(result)
        _splice_only(phase, lines, targets.open_streams_rows(result))
        print("\n".join(["", *lines, ""]), flush=True)
    elif phase == "drains":
        drains = await _drains(workdir, plan.drains)
        lines = drains_section(drains)
        _splice_only(phase, lines, targets.drains_row(drains))
        print("\n".join(["", *lines, ""]), flush=True)
    elif phase == "litellm":
        section, why = await _litellm(workdir, plan.quick)
        lines = litellm_section(section, why)
        _splice_only(phase, lines, targets.litellm_row(section, why))
        print("\n".join(["", *lines, ""]), flush=True)
    done = "printed" if phase in PRINT_ONLY else f"replaced its section of {REPORT}"
    _say(f"{phase} took {time.monotonic() - clock:.0f} s; {done}")


async def _full(plan: Plan, workdir: Path) -> None:
    started = datetime.now(UTC)
    clock = time.monotonic()
    tool = await find_load_tool()
    redis_server = await find_redis()
    if tool.note:
        _say(f"NOTE: {tool.note}; falling back to a Python load generator")
    tool_name = await wrk_version(tool) if tool.wrk else "Python aiohttp (fallback)"
    # Read before the run starts: the load average then says how busy the box already was.
    machine_info = machine(tool_name)
    core = await _measure(workdir, tool, plan, redis_server)
    seconds = dict(core.seconds)
    _say(f"{plan.open_streams.streams:,} concurrent open streams ...")
    phase = time.monotonic()
    streams = await _open_streams(workdir, plan.open_streams)
    seconds["open streams"] = time.monotonic() - phase
    _say(f"/healthz while {plan.drains.drains} drains read endless streams ...")
    phase = time.monotonic()
    drains = await _drains(workdir, plan.drains)
    seconds["drains"] = time.monotonic() - phase
    _say("LiteLLM comparison (bench/litellm.py) ...")
    phase = time.monotonic()
    litellm, litellm_why = await _litellm(workdir, plan.quick)
    seconds["LiteLLM"] = time.monotonic() - phase
    if litellm is None:
        _say(f"LiteLLM comparison skipped: {litellm_why}")
    _say("soak: mixed requests, the gateway's RSS and fds after each round ...")
    phase = time.monotonic()
    soak = await _soak(workdir, plan.soak, clock + BUDGET - SOAK_MARGIN)
    seconds["soak"] = time.monotonic() - phase
    names = [DIRECT, FLOOR, *GATEWAYS]
    summary = summarise(core.results, names)
    fd_soft = raise_fd_limit(0)
    info = RunInfo(
        started=started.strftime("%Y-%m-%d %H:%M"),
        seconds=time.monotonic() - clock,
        settings=plan.core,
        load_tool_note=tool.note,
        machine=[
            *machine_info,
            ("gateway event loop", core.event_loop),
            ("open-file limit (soft, inherited by every process)", f"{fd_soft:,}"),
        ],
        logs=core.logs,
    )
    extras = Extras(
        open_loop=core.open_loop,
        open_streams=streams,
        drains=drains,
        litellm=litellm,
        litellm_why=litellm_why,
        soak=soak,
        budget=BUDGET,
        phase_seconds=seconds,
        tracing=tracing.section(summary, core.spans),
    )
    write_markdown(REPORT, summary, info, extras)
    print(stdout_summary(summary), flush=True)
    print("\n".join(targets.table(target_rows(summary, extras))), flush=True)
    print("\n".join(["", *soak_stdout(soak), ""]), flush=True)
    _say(f"wrote {REPORT} in {info.seconds:.0f} s (budget {BUDGET:.0f} s)")


async def _main(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (e.g. from make's caller) unwinds like Ctrl-C: every child is stopped first.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    # Children inherit it: the open-streams phase needs a descriptor per connection.
    raise_fd_limit(FD_LIMIT)
    plan = Plan.of(args)
    workdir = Path(tempfile.mkdtemp(prefix="thinnest-bench-"))
    try:
        if args.only:
            await _only(args.only, plan, workdir)
        else:
            await _full(plan, workdir)
    except BaseException:
        _say(f"run did not finish; process logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the gateway against the floor proxy and the simulator, then "
        f"soak it; writes {REPORT.relative_to(ROOT)}.",
    )
    parser.add_argument(
        "--only",
        choices=PHASES,
        help="run only this phase and rewrite only its section (and its rows of the targets "
        "table) of the report; `json` only prints its figures, for comparing commits",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every phase shortened (1 round, a few seconds each, 500 open streams, a "
        "3,000-request soak): checks the harness, not the gateway",
    )
    parser.add_argument(
        "--streams",
        type=_positive,
        default=OpenStreamsSettings().streams,
        metavar="N",
        help=f"concurrent open streams (default {OpenStreamsSettings().streams:,})",
    )
    parser.add_argument(
        "--soak-requests",
        type=_positive,
        default=defaults.total_requests,
        metavar="N",
        help=f"measured soak requests in all (default {defaults.total_requests:,}; a full run "
        f"stops starting soak rounds when its {BUDGET:.0f} s budget would run out)",
    )
    parser.add_argument(
        "--soak-rounds",
        type=_positive,
        default=defaults.rounds,
        metavar="K",
        help=f"soak rounds, one RSS/fd sample after each (default {defaults.rounds})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    clock = time.monotonic()
    try:
        asyncio.run(_main(args))
    except (ProcessFailed, RuntimeError) as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    finally:
        print(f"bench: total {time.monotonic() - clock:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
