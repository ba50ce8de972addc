"""`python -m bench` (`make bench`): start simulator, floor and gateway; measure; report.

Every process is started here on free loopback ports and stopped before exit, whatever
happens; logs go to a temporary directory, kept (and its path printed) when a run fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench.about import ProcessLog, RunInfo, machine
from bench.load import Call, LoadTool, find_load_tool, wrk_version
from bench.phases import Results, Runner, Settings, Target
from bench.procs import Proc, ProcessFailed, ProcessSet, free_ports, wait_ready
from bench.report import stdout_summary, write_markdown
from bench.summary import DIRECT, FLOOR, GATEWAY, summarise

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


def _say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ProcessFailed(f"{name} is not installed: run `make venv` first")
    return found


def _write_configs(workdir: Path, sim_port: int, gw_port: int, admin_port: int) -> None:
    simulator = {
        "agents": {AGENT: {"name": "Bench", "keys": [AGENT_KEY]}},
        "platform_keys": [PLATFORM_KEY],
        "rate_limit": {"per_minute": 100_000_000, "per_day": 1_000_000_000},
        "chunk_interval": 0.0,
    }
    gateway = {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {
            "base_url": f"http://127.0.0.1:{sim_port}",
            "api_key": "${BENCH_UPSTREAM_KEY}",
        },
        "agents": {AGENT: {}},
        "quota": {"backend": "memory"},
        "tenants": {
            "bench": {
                "keys": [
                    {"name": "loadgen", "sha256": hashlib.sha256(CALLER_KEY.encode()).hexdigest()}
                ],
                "agents": [AGENT],
            }
        },
        "logging": {"level": "warning", "format": "json"},
    }
    (workdir / "simulator.yaml").write_text(yaml.safe_dump(simulator, sort_keys=False))
    (workdir / "gateway.yaml").write_text(yaml.safe_dump(gateway, sort_keys=False))


def _target(name: str, port: int, key: str, proxy: Proc | None) -> Target:
    url = f"http://127.0.0.1:{port}/v1/agents/{AGENT}/chat"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return Target(
        name=name,
        call=Call(url, headers, json.dumps({"message": MESSAGE}).encode()),
        stream_call=Call(url, headers, json.dumps({"message": MESSAGE, "stream": True}).encode()),
        proxy=proxy,
    )


def _log_summary(log_dir: Path, stopped: dict[str, str]) -> list[ProcessLog]:
    summary = []
    for name in ("simulator", "floor", "gateway"):
        path = log_dir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        ended = stopped.get(name, "never started")
        summary.append(ProcessLog(name, ended, len(lines), lines[:LOG_LINES_SHOWN]))
    return summary


async def _measure(
    workdir: Path, tool: LoadTool, settings: Settings
) -> tuple[Results, dict[str, str]]:
    sim_port, gw_port, admin_port, floor_port = free_ports(4)
    _write_configs(workdir, sim_port, gw_port, admin_port)
    cli = _executable("thinnest-gateway")
    sim_url = f"http://127.0.0.1:{sim_port}"
    floor_url = f"http://127.0.0.1:{floor_port}"
    async with ProcessSet(workdir) as procs:
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
        gateway = await procs.start(
            "gateway",
            [cli, "serve", "--config", str(workdir / "gateway.yaml")],
            env={"BENCH_UPSTREAM_KEY": PLATFORM_KEY},
        )
        waits = [
            await wait_ready(sim, f"{sim_url}/healthz"),
            # The floor has no health route by design: any HTTP answer means it is serving.
            await wait_ready(floor, f"{floor_url}/", any_status=True),
            await wait_ready(gateway, f"http://127.0.0.1:{gw_port}/healthz"),
        ]
        _say(f"simulator, floor and gateway ready after {sum(waits):.1f} s; logs in {workdir}")
        targets = [
            _target(DIRECT, sim_port, AGENT_KEY, None),
            _target(FLOOR, floor_port, PLATFORM_KEY, floor),
            _target(GATEWAY, gw_port, CALLER_KEY, gateway),
        ]
        runner = Runner(targets, sim, sim_url, settings, tool, workdir, _say)
        await runner.smoke()
        _say("JSON requests (load) ...")
        await runner.load_phase()
        _say("streams: time to first event ...")
        await runner.ttfe_phase()
        _say("streams: per-chunk delay under slow_drip ...")
        await runner.drip_phase()
    return runner.results, procs.stopped


async def _main() -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (e.g. from make's caller) unwinds like Ctrl-C: every child is stopped first.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started = datetime.now(UTC)
    clock = time.monotonic()
    settings = Settings()
    tool = await find_load_tool()
    if tool.note:
        _say(f"NOTE: {tool.note}; falling back to a Python load generator")
    tool_name = await wrk_version(tool) if tool.wrk else "Python aiohttp (fallback)"
    # Read before the run starts: the load average then says how busy the box already was.
    machine_info = machine(tool_name)
    workdir = Path(tempfile.mkdtemp(prefix="thinnest-bench-"))
    try:
        results, stopped = await _measure(workdir, tool, settings)
    except BaseException:
        _say(f"run did not finish; process logs kept in {workdir}")
        raise
    names = [DIRECT, FLOOR, GATEWAY]
    summary = summarise(results, names)
    info = RunInfo(
        started=started.strftime("%Y-%m-%d %H:%M"),
        seconds=time.monotonic() - clock,
        settings=settings,
        load_tool_note=tool.note,
        machine=machine_info,
        logs=_log_summary(workdir, stopped),
    )
    write_markdown(REPORT, summary, info)
    shutil.rmtree(workdir, ignore_errors=True)
    print(stdout_summary(summary), flush=True)
    _say(f"wrote {REPORT} in {info.seconds:.0f} s")


def main() -> int:
    try:
        asyncio.run(_main())
    except (ProcessFailed, RuntimeError) as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
