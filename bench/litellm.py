"""The gateway against LiteLLM's proxy: same box, same static upstream, same load.

LiteLLM runs from a venv of its own (`.bench/litellm-venv`, gitignored), as a pass-through
proxy (`general_settings.pass_through_endpoints`) for the chat path, with a master key, one
worker and no database. Our gateway runs with memory quotas and access logs on. Both forward
`POST /v1/agents/ag_support/chat` to one static upstream process (a fixed JSON answer, the
simulator's shape) that checks the upstream key, so neither can skip the key swap.

    python -m bench.litellm --install     # create the venv and pip install 'litellm[proxy]'
    python -m bench.litellm               # measure; prints the Markdown section
    python -m bench.litellm --static-upstream --port 9000   # the upstream alone

`run()` returns the Markdown section. Without the venv it installs LiteLLM first (about a
minute here, bounded), unless BENCH_LITELLM=0 or a `--quick` run: then a "not measured" note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from bench.load import Call, LoadResult, LoadTool, find_load_tool, run_load, write_lua, wrk_version
from bench.phases import rotated
from bench.procs import Proc, ProcessFailed, ProcessSet, free_ports, run_capped, wait_ready
from bench.stack import TENANT, gateway_config
from bench.stats import EN_DASH, Spread

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench" / "litellm-venv"
LITELLM = VENV / "bin" / "litellm"
INSTALLED = VENV / ".bench-installed"
"""Written after a successful install: a venv without it is half-installed and redone."""
ENABLE = "BENCH_LITELLM"
INSTALL_LIMIT = 900.0
REQUIREMENT = "litellm[proxy]"
TIMES = "\u00d7"
HEADING = "## Against LiteLLM's proxy"

AGENT = "ag_support"
SESSION = "sess_bench"
# Not secrets: keys that only this benchmark's throwaway processes accept.
UPSTREAM_KEY = "thns_sk_bench_litellm"
MASTER_KEY = "sk-bench-litellm-master"
CALLER_KEY = "gw_bench_litellm_key"
MESSAGE = "How long does a benchmark of the thinnest gateway take on two shared cores? " * 2
REPLY = (
    f'[{AGENT}] You said: "{MESSAGE}". This is turn 1 of session {SESSION}. '
    "A static upstream answers every request with these same bytes."
)
# The simulator's JSON shape; the session id as upstream sees it behind the gateway.
UPSTREAM_BODY = json.dumps(
    {
        "response": REPLY,
        "session_id": f"gw:{TENANT}:{SESSION}",
        "usage": {"input_tokens": 39, "output_tokens": 62, "total_tokens": 101},
    }
).encode()
TARGET = 25.0
ROUNDS = 3
WARMUP_SECONDS = 3.0
READY_WITHIN = 180.0

GATEWAY_NAME = "gateway"
LITELLM_NAME = "litellm"
UPSTREAM_NAME = "static-upstream"
LITELLM_ENV = {
    # No network here: read the bundled model cost map rather than retry a download.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    # Logging minimal: errors only (uvicorn's access log goes with it).
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
}


def _say(text: str) -> None:
    print(f"bench litellm: {text}", flush=True)


# --- the static upstream -------------------------------------------------------------------


async def _static_chat(request: web.Request) -> web.Response:
    await request.read()
    if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
        return web.json_response({"error": "unauthorized"}, status=401)
    return web.Response(body=UPSTREAM_BODY, content_type="application/json")


async def _static_health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def static_upstream(port: int, host: str = "127.0.0.1") -> None:
    """Answer the chat path with fixed bytes (401 without the upstream key), nothing else."""
    app = web.Application()
    app.router.add_post("/v1/agents/{agent_id}/chat", _static_chat)
    app.router.add_get("/healthz", _static_health)
    web.run_app(app, host=host, port=port, access_log=None, print=None)


# --- the venv --------------------------------------------------------------------------------


def installed() -> bool:
    return INSTALLED.exists() and LITELLM.exists()


@dataclass(frozen=True, slots=True)
class Install:
    ok: bool
    seconds: float
    note: str


def _last_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip() and "is ignored" not in line]
    return lines[-1].strip() if lines else "no output"


async def install(limit: float = INSTALL_LIMIT) -> Install:
    """A fresh venv with `litellm[proxy]`, within `limit` seconds all told."""
    started = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable
    code, out = await run_capped(python, "-m", "venv", str(VENV), limit=120)
    if code == 0:
        remaining = max(limit - (time.monotonic() - started), 1.0)
        pip = str(VENV / "bin" / "pip")
        code, out = await run_capped(pip, "install", "-q", REQUIREMENT, limit=remaining)
    seconds = time.monotonic() - started
    if code != 0 or not LITELLM.exists():
        return Install(False, seconds, f"exit {code}: {_last_line(out)}")
    INSTALLED.write_text(f"{REQUIREMENT} installed in {seconds:.0f} s\n")
    return Install(True, seconds, "")


async def litellm_version() -> str:
    code, out = await run_capped(
        str(VENV / "bin" / "python"),
        "-c",
        "import importlib.metadata as m; print(m.version('litellm'))",
        limit=60,
    )
    return out.strip() if code == 0 else "unknown"


# --- configurations --------------------------------------------------------------------------


def litellm_config(upstream_port: int) -> dict[str, object]:
    return {
        "general_settings": {
            "master_key": MASTER_KEY,
            "pass_through_endpoints": [
                {
                    "path": f"/v1/agents/{AGENT}/chat",
                    "target": f"http://127.0.0.1:{upstream_port}/v1/agents/{AGENT}/chat",
                    "headers": {"Authorization": f"Bearer {UPSTREAM_KEY}"},
                    # Left out, a YAML pass-through endpoint takes no key at all.
                    "auth": True,
                }
            ],
        },
        "litellm_settings": {"set_verbose": False},
    }


def _call(port: int, key: str) -> Call:
    return Call(
        f"http://127.0.0.1:{port}/v1/agents/{AGENT}/chat",
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        json.dumps({"message": MESSAGE, "session_id": SESSION}).encode(),
    )


# --- CPU of a process and its children -------------------------------------------------------


def _family(pid: int) -> tuple[set[int], dict[int, float]]:
    """`pid` and its live descendants, and every process's utime + stime in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces or parentheses: count fields after its ")".
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    family, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        family.update(children)
        frontier.extend(children)
    return family, cpu


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and every live descendant (a worker LiteLLM might fork)."""
    family, cpu = _family(pid)
    return sum(cpu.get(member, 0.0) for member in family)


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proxy:
    name: str
    proc: Proc
    call: Call


@dataclass(frozen=True, slots=True)
class Round:
    result: LoadResult
    cpu_us: float
    """CPU microseconds per request of the proxy (and its children)."""
    upstream_cpu_us: float


@dataclass(slots=True)
class Measured:
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    load_average: tuple[str, str] = ("-", "-")
    """The 1, 5 and 15 min load averages before the first and after the last round."""
    """Processes in each proxy's tree at the end (1: no workers forked)."""
    refused: dict[str, int] = field(default_factory=dict)
    """The HTTP status each proxy gave a wrong key, checked before measuring."""


async def _smoke(paths: Sequence[Proxy]) -> dict[str, int]:
    """Each proxy answers the chat path with upstream's body and refuses a wrong key (it must
    not reach upstream with it); the status each gave the wrong key, by proxy."""
    refused: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path in paths:
            call = path.call
            async with session.post(call.url, data=call.body, headers=call.headers) as r:
                text = await r.text()
                if r.status != 200 or '"response"' not in text:
                    raise RuntimeError(f"{path.name}: {call.url} answered {r.status}: {text[:500]}")
            wrong = {**call.headers, "Authorization": "Bearer not-a-key"}
            async with session.post(call.url, data=call.body, headers=wrong) as r:
                text = await r.text()
                if not 400 <= r.status < 500 or '"response"' in text:
                    raise RuntimeError(
                        f"{path.name}: a wrong key got HTTP {r.status} ({text[:300]}): the proxy "
                        "is not checking keys, so the comparison would be unfair"
                    )
                refused[path.name] = r.status
    return refused


async def _measure(
    paths: Sequence[Proxy],
    upstream: Proc,
    tool: LoadTool,
    workdir: Path,
    seconds: float,
    connections: int,
    say: Callable[[str], None],
) -> Measured:
    measured = Measured()
    before = _load_average()
    luas = {path.name: write_lua(path.call, workdir / f"litellm-{path.name}.lua") for path in paths}
    for path in paths:
        # Untimed: fills connection pools and lets each process reach a steady state.
        await run_load(tool, path.call, connections, WARMUP_SECONDS, luas[path.name])
    for round_no in range(ROUNDS):
        for path in rotated(paths, round_no):
            proxy_before = tree_cpu_seconds(path.proc.pid)
            upstream_before = upstream.cpu_seconds()
            result = await run_load(tool, path.call, connections, seconds, luas[path.name])
            proxy_cpu = tree_cpu_seconds(path.proc.pid) - proxy_before
            upstream_cpu = upstream.cpu_seconds() - upstream_before
            path.proc.check_alive()
            upstream.check_alive()
            done = max(result.requests, 1)
            measured.rounds.setdefault(path.name, []).append(
                Round(result, proxy_cpu / done * 1e6, upstream_cpu / done * 1e6)
            )
            say(
                f"round {round_no + 1}/{ROUNDS} {path.name:8}: {result.rps:7.0f} req/s  "
                f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                f"CPU {proxy_cpu / done * 1e6:6.0f} µs/req  errors {result.errors}"
                + (f" {dict(result.error_kinds)}" if result.errors else "")
            )
    for path in paths:
        measured.processes[path.name] = len(_family(path.proc.pid)[0])
    measured.load_average = (before, _load_average())
    return measured


# --- the report ------------------------------------------------------------------------------


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "-"


def _not_measured(why: str) -> str:
    return "\n".join([HEADING, "", f"**Not measured**: {why}", ""])


def _ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    return Spread.of(
        [n / d if d else math.nan for n, d in zip(numerators, denominators, strict=True)]
    )


def section(
    measured: Measured,
    *,
    version: str,
    litellm_yaml: str,
    seconds: float,
    connections: int,
    tool_name: str,
    install_note: str,
    gateway_loop: str,
) -> str:
    gw = measured.rounds[GATEWAY_NAME]
    refused = measured.refused

    def busy(rounds: Sequence[Round]) -> float:
        return statistics.median(r.cpu_us * r.result.rps / 1e6 for r in rounds)

    ll = measured.rounds[LITELLM_NAME]
    rps = _ratio([r.result.rps for r in gw], [r.result.rps for r in ll])
    cpu = _ratio([r.cpu_us for r in ll], [r.cpu_us for r in gw])
    met = rps.median >= TARGET
    verdict = (
        f"**MET**: the gateway served {rps.median:.1f}{TIMES} LiteLLM's requests per second "
        f"(target ≥ {TARGET:g}{TIMES})"
        if met
        else f"**NOT MET**: the gateway served {rps.median:.1f}{TIMES} LiteLLM's requests per "
        f"second; the target is ≥ {TARGET:g}{TIMES}"
    )
    rows = [
        "| proxy | req/s | p50 | p99 | proxy CPU µs/req | upstream CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        GATEWAY_NAME: "thinnest-gateway (memory quotas, access logs)",
        LITELLM_NAME: f"LiteLLM {version} proxy (pass-through, master key)",
    }
    for name in (GATEWAY_NAME, LITELLM_NAME):
        rounds = measured.rounds[name]
        errors = sum(r.result.errors for r in rounds)
        total = sum(r.result.requests for r in rounds)
        rows.append(
            f"| {labels[name]} "
            f"| {Spread.of([r.result.rps for r in rounds]).fmt(0)} "
            f"| {Spread.of([r.result.p50_ms for r in rounds]).fmt(2, suffix=' ms')} "
            f"| {Spread.of([r.result.p99_ms for r in rounds]).fmt(2, suffix=' ms')} "
            f"| {Spread.of([r.cpu_us for r in rounds]).fmt(0)} "
            f"| {Spread.of([r.upstream_cpu_us for r in rounds]).fmt(0)} "
            f"| {errors} / {total} |"
        )
    lines = [
        HEADING,
        "",
        f"Target: at least {TARGET:g}{TIMES} LiteLLM proxy's requests per second, same box, same "
        f"static upstream. {verdict}; LiteLLM spent {cpu.median:.1f}{TIMES} the gateway's CPU per "
        "request.",
        "",
        *rows,
        "",
        f"Ratios, taken within each round (median, lowest{EN_DASH}highest round): gateway ÷ "
        f"LiteLLM req/s {rps.fmt(1, suffix=TIMES)}; LiteLLM ÷ gateway CPU per request "
        f"{cpu.fmt(1, suffix=TIMES)}. Cores kept busy (CPU per request {TIMES} req/s, "
        f"median): gateway {busy(gw):.2f}, LiteLLM {busy(ll):.2f}; near 1.0 a proxy is CPU-bound "
        "on its one event loop, and the req/s ratio follows the CPU ratio.",
        "",
        f"- **Setup**: one static upstream process (aiohttp, answers `POST "
        f"/v1/agents/{AGENT}/chat` with the same {len(UPSTREAM_BODY)}-byte JSON body, the "
        "simulator's shape, and 401 unless it gets the upstream key) serves both proxies. "
        "Each proxy swaps the caller's key for the upstream key. Before measuring, a request "
        f"with a wrong key was refused by both (gateway HTTP {refused.get(GATEWAY_NAME, '-')}, "
        f"LiteLLM HTTP {refused.get(LITELLM_NAME, '-')}: without a database LiteLLM accepts "
        "only its master key).",
        "- **Gateway**: `thinnest-gateway serve`, memory quotas with limits far out of reach "
        "(every request reserves and settles), session isolation on (the session id is "
        "namespaced going up and translated back), `logging.level: info` (one JSON access log "
        f"line per request), event loop: {gateway_loop}.",
        f"- **LiteLLM**: `litellm --config litellm.yaml --host 127.0.0.1 --port P "
        f"--num_workers 1` from its own venv (`{REQUIREMENT}`, LiteLLM {version}), no database, "
        f"`LITELLM_LOG=ERROR` (no access log), uvicorn on uvloop (LiteLLM's default), the chat "
        "path as a "
        f"`general_settings.pass_through_endpoints` entry with `auth: true` (the master key "
        f"is required, as the gateway requires a gateway key). Its process tree had "
        f"{measured.processes.get(LITELLM_NAME, 1)} process(es) at the end; CPU is summed "
        "over it.",
        f"- **Load**: {tool_name}, `-t1 -c{connections} -d{seconds:g}s`, POSTing "
        f'`{{"message": …, "session_id": "{SESSION}"}}`; an untimed '
        f"{WARMUP_SECONDS:g} s warm-up each, then {ROUNDS} rounds alternating the two proxies, "
        "each round starting with the other. CPU per request is user + system time from "
        "`/proc/PID/stat` over the round, divided by the requests completed. Load average "
        f"(1, 5, 15 min) before the rounds {measured.load_average[0]}, after them "
        f"{measured.load_average[1]}; "
        "a box busy with other work shares its cores with both proxies.",
    ]
    if install_note:
        lines.append(f"- **Install**: {install_note}")
    lines += [
        "",
        "LiteLLM's configuration (the keys are throwaway, accepted only by this run):",
        "",
        "```yaml",
        litellm_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _event_loop(log: Path) -> str:
    """The event loop the gateway says it runs on, from its start-up log line."""
    with contextlib.suppress(OSError, ValueError):
        for line in log.read_text(errors="replace").splitlines()[:20]:
            if '"event_loop"' in line:
                return str(json.loads(line)["event_loop"])
    return "unknown"


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ProcessFailed(f"{name} is not installed: run `make venv` first")
    return found


async def run(
    workdir: Path,
    *,
    seconds: float = 10.0,
    connections: int = 32,
    say: Callable[[str], None] = _say,
    quick: bool = False,
) -> str:
    """Measure both proxies; the Markdown section (a "not measured" one when LiteLLM is absent).

    Installs LiteLLM first when its venv is missing, unless BENCH_LITELLM=0 or `quick`.
    """
    install_note = ""
    if not installed():
        if os.environ.get(ENABLE) == "0" or quick:
            why = f"{ENABLE}=0" if os.environ.get(ENABLE) == "0" else "`--quick`"
            return _not_measured(
                f"LiteLLM is not installed in `{VENV.relative_to(ROOT)}` and {why} said not "
                "to install it. Install it with `.venv/bin/python -m bench.litellm --install` "
                "(about a minute here), or run `make bench`, which installs it first."
            )
        say(f"installing {REQUIREMENT} into {VENV} (at most {INSTALL_LIMIT:.0f} s) ...")
        done = await install()
        if not done.ok:
            return _not_measured(
                f"`pip install '{REQUIREMENT}'` into a fresh venv failed after "
                f"{done.seconds:.0f} s ({done.note})."
            )
        install_note = f"`pip install '{REQUIREMENT}'` took {done.seconds:.0f} s in this run."
        say(install_note)
    version = await litellm_version()
    tool = await find_load_tool()
    tool_name = await wrk_version(tool) if tool.wrk else "Python aiohttp (fallback)"
    upstream_port, ll_port, gw_port, admin_port = free_ports(4)
    ll_yaml = yaml.safe_dump(litellm_config(upstream_port), sort_keys=False)
    (workdir / "litellm.yaml").write_text(ll_yaml)
    # The benchmark's gateway (memory quotas, access log at info) for this upstream's agent.
    gw_config = gateway_config(
        upstream_port,
        gw_port,
        admin_port,
        {"backend": "memory"},
        agent=AGENT,
        caller_key=CALLER_KEY,
    )
    gw_yaml = yaml.safe_dump(gw_config, sort_keys=False)
    (workdir / "litellm-gateway.yaml").write_text(gw_yaml)
    async with ProcessSet(workdir) as procs:
        upstream = await procs.start(
            UPSTREAM_NAME,
            [
                sys.executable,
                "-m",
                "bench.litellm",
                "--static-upstream",
                "--port",
                str(upstream_port),
            ],
            cwd=ROOT,
        )
        gateway = await procs.start(
            f"litellm-{GATEWAY_NAME}",
            [
                _executable("thinnest-gateway"),
                "serve",
                "--config",
                str(workdir / "litellm-gateway.yaml"),
            ],
            env={"BENCH_UPSTREAM_KEY": UPSTREAM_KEY},
        )
        litellm = await procs.start(
            LITELLM_NAME,
            [
                str(LITELLM),
                "--config",
                str(workdir / "litellm.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ll_port),
                "--num_workers",
                "1",
            ],
            env=LITELLM_ENV,
            cwd=workdir,
        )
        waits = [
            await wait_ready(upstream, f"http://127.0.0.1:{upstream_port}/healthz"),
            await wait_ready(gateway, f"http://127.0.0.1:{gw_port}/healthz"),
            await wait_ready(
                litellm, f"http://127.0.0.1:{ll_port}/health/liveliness", within=READY_WITHIN
            ),
        ]
        say(f"static upstream, gateway and LiteLLM {version} ready after {max(waits):.1f} s")
        paths = [
            Proxy(GATEWAY_NAME, gateway, _call(gw_port, CALLER_KEY)),
            Proxy(LITELLM_NAME, litellm, _call(ll_port, MASTER_KEY)),
        ]
        refused = await _smoke(paths)
        measured = await _measure(paths, upstream, tool, workdir, seconds, connections, say)
        measured.refused = refused
    return section(
        measured,
        version=version,
        litellm_yaml=ll_yaml,
        seconds=seconds,
        connections=connections,
        tool_name=tool_name,
        install_note=install_note,
        gateway_loop=_event_loop(workdir / f"litellm-{GATEWAY_NAME}.log"),
    )


# --- command line ----------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> int:
    if args.install:
        _say(f"installing {REQUIREMENT} into {VENV} ...")
        done = await install()
        if not done.ok:
            _say(f"FAILED after {done.seconds:.0f} s: {done.note}")
            return 1
        _say(f"installed LiteLLM {await litellm_version()} in {done.seconds:.0f} s")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="thinnest-bench-litellm-"))
    try:
        text = await run(workdir, seconds=args.seconds, connections=args.connections)
    except BaseException:
        _say(f"run did not finish; process logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    print(text, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.litellm", description=__doc__)
    parser.add_argument("--install", action="store_true", help="(re)create the LiteLLM venv")
    parser.add_argument("--seconds", type=float, default=10.0, help="each timed wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--static-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.static_upstream:
        static_upstream(args.port)
        return 0
    try:
        return asyncio.run(_main(args))
    except (ProcessFailed, RuntimeError) as exc:
        print(f"bench litellm: FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
