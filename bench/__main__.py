"""`python -m bench` (`make bench`): start simulator, floor and gateway; measure; report.

Every process is started here on free loopback ports and stopped before exit, whatever
happens; logs go to a temporary directory, kept (and its path printed) when a run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import yaml

from bench.about import ProcessLog, RunInfo, machine
from bench.load import Call, LoadTool, find_load_tool, find_redis, wrk_version
from bench.phases import Results, Runner, Settings, Target
from bench.procs import Proc, ProcessFailed, ProcessSet, free_ports, wait_ready, wait_redis
from bench.report import stdout_summary, write_markdown
from bench.soak import Kind, Soak, SoakResult, SoakSettings
from bench.soak_report import section as soak_section
from bench.soak_report import splice as splice_soak
from bench.soak_report import stdout_lines as soak_stdout
from bench.summary import DIRECT, FLOOR, GATEWAY, MEMORY_QUOTAS, REDIS_QUOTAS, summarise

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
AGENT = "ag_bench"
AGENT_KEY = "ak_bench_0001"
PLATFORM_KEY = "thns_sk_bench_0001"
# Not a secret: a key that only this benchmark's throwaway gateway accepts.
CALLER_KEY = "gw_bench_key"
# Long enough for the simulator to cut its reply into the most pieces it sends.
MESSAGE = "How long does a benchmark of the thinnest gateway take on two shared cores? " * 2
LOG_LINES_SHOWN = 5
GATEWAYS = (GATEWAY, MEMORY_QUOTAS, REDIS_QUOTAS)
SOAK_SIMULATOR, SOAK_GATEWAY = "soak-simulator", "soak-gateway"


def _say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ProcessFailed(f"{name} is not installed: run `make venv` first")
    return found


# Far out of reach: every request reserves and settles, and none is refused.
QUOTA_LIMITS = {
    "requests": {"per_minute": 100_000_000, "per_day": 1_000_000_000},
    "tokens": {"per_minute": 1_000_000_000, "per_day": 10_000_000_000},
}


def _gateway_config(
    sim_port: int, gw_port: int, admin_port: int, quota: dict[str, str] | None
) -> dict[str, object]:
    """One gateway's YAML; `quota` None is quotas off (the tenant has no `limits`)."""
    tenant: dict[str, object] = {
        "keys": [{"name": "loadgen", "sha256": hashlib.sha256(CALLER_KEY.encode()).hexdigest()}],
        "agents": [AGENT],
    }
    if quota is not None:
        tenant["limits"] = QUOTA_LIMITS
    return {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {
            "base_url": f"http://127.0.0.1:{sim_port}",
            "api_key": "${BENCH_UPSTREAM_KEY}",
        },
        "agents": {AGENT: {}},
        "quota": quota or {"backend": "memory"},
        "tenants": {"bench": tenant},
        "logging": {"level": "warning", "format": "json"},
    }


def _simulator_config(chunk_interval: float) -> dict[str, object]:
    return {
        "agents": {AGENT: {"name": "Bench", "keys": [AGENT_KEY]}},
        "platform_keys": [PLATFORM_KEY],
        "rate_limit": {"per_minute": 100_000_000, "per_day": 1_000_000_000},
        "chunk_interval": chunk_interval,
    }


def _write_configs(workdir: Path, sim_port: int, gateways: dict[str, dict[str, object]]) -> None:
    simulator = _simulator_config(0.0)
    (workdir / "simulator.yaml").write_text(yaml.safe_dump(simulator, sort_keys=False))
    for name, config in gateways.items():
        (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _target(
    name: str,
    port: int,
    key: str,
    proxy: Proc | None,
    *,
    streams: bool = True,
    helper: Proc | None = None,
    redis_port: int | None = None,
) -> Target:
    url = f"http://127.0.0.1:{port}/v1/agents/{AGENT}/chat"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return Target(
        name=name,
        call=Call(url, headers, json.dumps({"message": MESSAGE}).encode()),
        stream_call=Call(url, headers, json.dumps({"message": MESSAGE, "stream": True}).encode()),
        proxy=proxy,
        streams=streams,
        helper=helper,
        redis_port=redis_port,
    )


def _log_summary(log_dir: Path, stopped: dict[str, str]) -> list[ProcessLog]:
    summary = []
    for name in ("simulator", "floor", *GATEWAYS, "redis"):
        path = log_dir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        ended = stopped.get(name, "never started")
        summary.append(ProcessLog(name, ended, len(lines), lines[:LOG_LINES_SHOWN]))
    return summary


async def _measure(
    workdir: Path, tool: LoadTool, settings: Settings, redis_server: str
) -> tuple[Results, dict[str, str]]:
    sim_port, floor_port, redis_port, *gw_ports = free_ports(3 + 2 * len(GATEWAYS))
    quotas: dict[str, dict[str, str] | None] = {
        GATEWAY: None,
        MEMORY_QUOTAS: {"backend": "memory"},
        REDIS_QUOTAS: {"backend": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
    }
    ports = {name: (gw_ports[2 * i], gw_ports[2 * i + 1]) for i, name in enumerate(GATEWAYS)}
    _write_configs(
        workdir,
        sim_port,
        {name: _gateway_config(sim_port, *ports[name], quotas[name]) for name in GATEWAYS},
    )
    cli = _executable("thinnest-gateway")
    sim_url = f"http://127.0.0.1:{sim_port}"
    floor_url = f"http://127.0.0.1:{floor_port}"
    async with ProcessSet(workdir) as procs:
        redis = await procs.start(
            "redis",
            [
                redis_server,
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ],
        )
        sim = await procs.start(
            "simulator",
            [
                cli,
                "simulate",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--config",
                str(workdir / "simulator.yaml"),
            ],
        )
        floor = await procs.start(
            "floor",
            [
                sys.executable,
                "-m",
                "bench.floor",
                "--port",
                str(floor_port),
                "--upstream",
                sim_url,
                "--key",
                PLATFORM_KEY,
            ],
            cwd=ROOT,
        )
        # Redis first: the Redis-quota gateway connects to it as it starts.
        waits = [await wait_redis(redis, redis_port)]
        gateways = {
            name: await procs.start(
                name,
                [cli, "serve", "--config", str(workdir / f"{name}.yaml")],
                env={"BENCH_UPSTREAM_KEY": PLATFORM_KEY},
            )
            for name in GATEWAYS
        }
        waits += [
            await wait_ready(sim, f"{sim_url}/healthz"),
            # The floor has no health route by design: any HTTP answer means it is serving.
            await wait_ready(floor, f"{floor_url}/", any_status=True),
        ]
        for name, gateway in gateways.items():
            waits.append(await wait_ready(gateway, f"http://127.0.0.1:{ports[name][0]}/healthz"))
        _say(
            f"redis, simulator, floor and gateways ready after {sum(waits):.1f} s; "
            f"logs in {workdir}"
        )
        targets = [
            _target(DIRECT, sim_port, AGENT_KEY, None),
            _target(FLOOR, floor_port, PLATFORM_KEY, floor),
            _target(GATEWAY, ports[GATEWAY][0], CALLER_KEY, gateways[GATEWAY]),
            _target(
                MEMORY_QUOTAS,
                ports[MEMORY_QUOTAS][0],
                CALLER_KEY,
                gateways[MEMORY_QUOTAS],
                streams=False,
            ),
            _target(
                REDIS_QUOTAS,
                ports[REDIS_QUOTAS][0],
                CALLER_KEY,
                gateways[REDIS_QUOTAS],
                streams=False,
                helper=redis,
                redis_port=redis_port,
            ),
        ]
        runner = Runner(targets, sim, sim_url, settings, tool, workdir, _say)
        await runner.smoke()
        await _check_quota_state(ports)
        _say("JSON requests (load) ...")
        await runner.load_phase()
        await _check_quota_state(ports)
        _say("streams: time to first event ...")
        await runner.ttfe_phase()
        _say("streams: per-chunk delay under slow_drip ...")
        await runner.drip_phase()
    return runner.results, procs.stopped


async def _check_quota_state(ports: dict[str, tuple[int, int]]) -> None:
    """Each quota gateway's /readyz: a Redis gateway on its local fallback would say so here."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for name in (MEMORY_QUOTAS, REDIS_QUOTAS):
            async with session.get(f"http://127.0.0.1:{ports[name][0]}/readyz") as response:
                _say(f"{name} /readyz: HTTP {response.status} {await response.text()}")


async def _soak(workdir: Path, settings: SoakSettings) -> SoakResult:
    """The soak on a simulator and a gateway of its own (memory quotas), stopped after it."""
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    sim_port, gw_port, admin_port = free_ports(3)
    simulator = _simulator_config(settings.chunk_interval)
    gateway_config = _gateway_config(sim_port, gw_port, admin_port, {"backend": "memory"})
    (workdir / f"{SOAK_SIMULATOR}.yaml").write_text(yaml.safe_dump(simulator, sort_keys=False))
    (workdir / f"{SOAK_GATEWAY}.yaml").write_text(yaml.safe_dump(gateway_config, sort_keys=False))
    cli = _executable("thinnest-gateway")
    sim_url = f"http://127.0.0.1:{sim_port}"
    async with ProcessSet(workdir) as procs:
        sim = await procs.start(
            SOAK_SIMULATOR,
            [
                cli,
                "simulate",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--config",
                str(workdir / f"{SOAK_SIMULATOR}.yaml"),
            ],
        )
        gateway = await procs.start(
            SOAK_GATEWAY,
            [cli, "serve", "--config", str(workdir / f"{SOAK_GATEWAY}.yaml")],
            env={"BENCH_UPSTREAM_KEY": PLATFORM_KEY},
        )
        waits = [
            await wait_ready(sim, f"{sim_url}/healthz"),
            await wait_ready(gateway, f"http://127.0.0.1:{gw_port}/healthz"),
        ]
        _say(f"soak: simulator and gateway (pid {gateway.pid}) ready after {sum(waits):.1f} s")
        target = _target(SOAK_GATEWAY, gw_port, CALLER_KEY, gateway)
        calls: dict[Kind, Call] = {
            "json": target.call,
            "stream": target.stream_call,
            "aborted": target.stream_call,
        }
        soak = Soak(gateway, [sim], calls, f"http://127.0.0.1:{admin_port}", settings, _say)
        result = await soak.run(started)
    log = workdir / f"{SOAK_GATEWAY}.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return dataclasses.replace(result, log_lines=lines)


async def _soak_only(settings: SoakSettings) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="thinnest-bench-soak-"))
    try:
        result = await _soak(workdir, settings)
    except BaseException:
        _say(f"soak did not finish; process logs kept in {workdir}")
        raise
    splice_soak(REPORT, soak_section(result))
    shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(["", *soak_stdout(result), ""]), flush=True)
    _say(f"soak took {result.seconds:.0f} s; replaced its section of {REPORT}")


async def _main(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (e.g. from make's caller) unwinds like Ctrl-C: every child is stopped first.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    soak_settings = SoakSettings(
        rounds=args.soak_rounds,
        requests_per_round=args.soak_requests,
        warmup_requests=args.soak_requests,
    )
    if args.only == "soak":
        await _soak_only(soak_settings)
        return
    started = datetime.now(UTC)
    clock = time.monotonic()
    settings = Settings()
    tool = await find_load_tool()
    redis_server = await find_redis()
    if tool.note:
        _say(f"NOTE: {tool.note}; falling back to a Python load generator")
    tool_name = await wrk_version(tool) if tool.wrk else "Python aiohttp (fallback)"
    # Read before the run starts: the load average then says how busy the box already was.
    machine_info = machine(tool_name)
    workdir = Path(tempfile.mkdtemp(prefix="thinnest-bench-"))
    try:
        results, stopped = await _measure(workdir, tool, settings, redis_server)
        _say("soak: mixed requests, the gateway's RSS and fds after each round ...")
        soak = await _soak(workdir, soak_settings)
    except BaseException:
        _say(f"run did not finish; process logs kept in {workdir}")
        raise
    names = [DIRECT, FLOOR, *GATEWAYS]
    summary = summarise(results, names)
    info = RunInfo(
        started=started.strftime("%Y-%m-%d %H:%M"),
        seconds=time.monotonic() - clock,
        settings=settings,
        load_tool_note=tool.note,
        machine=machine_info,
        logs=_log_summary(workdir, stopped),
    )
    write_markdown(REPORT, summary, info, soak)
    shutil.rmtree(workdir, ignore_errors=True)
    print(stdout_summary(summary), flush=True)
    print("\n".join([*soak_stdout(soak), ""]), flush=True)
    _say(f"wrote {REPORT} in {info.seconds:.0f} s")


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
        choices=["soak"],
        help="run only this part: `soak` rewrites only the soak section of the report",
    )
    parser.add_argument(
        "--soak-rounds",
        type=_positive,
        default=defaults.rounds,
        metavar="K",
        help=f"measured soak rounds (default {defaults.rounds})",
    )
    parser.add_argument(
        "--soak-requests",
        type=_positive,
        default=defaults.requests_per_round,
        metavar="N",
        help=f"requests per soak round, and in its warm-up (default "
        f"{defaults.requests_per_round:,})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_main(args))
    except (ProcessFailed, RuntimeError) as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
