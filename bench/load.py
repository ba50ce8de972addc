"""Non-streaming load at fixed concurrency: wrk with a Lua POST script, or a Python fallback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.procs import run_capped
from bench.stats import percentile

APT_TIMEOUT = 240.0

# wrk's own report is for humans; done() prints one JSON line for the harness to parse.
_LUA = """\
wrk.method = "POST"
wrk.body = [[{body}]]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True, slots=True)
class Call:
    """One request, as a load generator repeats it."""

    url: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    """Completed responses, errors included."""
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    """Socket errors, timeouts and non-2xx/3xx answers."""
    error_kinds: Mapping[str, int] = field(default_factory=dict)
    """The errors by kind (wrk's connect, read, write, status, timeout), the non-zero ones."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True, slots=True)
class LoadTool:
    wrk: str | None
    note: str

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "python-aiohttp"


async def _installed(program: str, package: str) -> tuple[str | None, str]:
    """`program`'s path, installing `package` with apt-get if missing; else None and why."""
    found = shutil.which(program)
    if found:
        return found, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, f"{program} is not installed and apt-get cannot run here (not root)"
    print(f"bench: {program} is missing; installing it with apt-get ...", flush=True)
    code, out = await run_capped("apt-get", "install", "-y", "-q", package, limit=APT_TIMEOUT)
    if code != 0:
        # A fresh machine may have no package lists yet.
        await run_capped("apt-get", "update", "-q", limit=APT_TIMEOUT)
        code, out = await run_capped("apt-get", "install", "-y", "-q", package, limit=APT_TIMEOUT)
    found = shutil.which(program)
    if found:
        return found, ""
    last = out.strip().splitlines()[-1:] or ["no output"]
    return None, f"`apt-get install -y {package}` failed (exit {code}: {last[0]})"


async def find_load_tool() -> LoadTool:
    """wrk, installing it with apt-get if missing; else the Python fallback, with why."""
    wrk, why = await _installed("wrk", "wrk")
    return LoadTool(wrk, why)


async def find_redis() -> str:
    """redis-server, installing it with apt-get if missing (the Redis quota path needs it)."""
    found, why = await _installed("redis-server", "redis-server")
    if found is None:
        raise RuntimeError(why)
    return found


async def wrk_version(tool: LoadTool) -> str:
    if tool.wrk is None:
        return "-"
    _, out = await run_capped(tool.wrk, "-v", limit=10)
    return out.strip().splitlines()[0] if out.strip() else "wrk"


def write_lua(call: Call, path: Path) -> Path:
    if b"]]" in call.body:
        raise ValueError("the request body cannot hold ']]' (it is a Lua long string)")
    headers = "\n".join(
        f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}"
        for name, value in call.headers.items()
    )
    path.write_text(_LUA.format(body=call.body.decode(), headers=headers))
    return path


async def run_load(
    tool: LoadTool, call: Call, connections: int, seconds: float, lua: Path
) -> LoadResult:
    if tool.wrk is None:
        return await _python_load(call, connections, seconds)
    argv = [tool.wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    code, out = await run_capped(*argv, "-s", str(lua), call.url, limit=seconds + 60)
    summary = next(
        (line for line in reversed(out.splitlines()) if line.startswith('{"requests"')), None
    )
    if code != 0 or summary is None:
        raise RuntimeError(f"wrk failed (exit {code}):\n{out[-2000:]}")
    got = json.loads(summary)
    kinds = {name: got[name] for name in ("connect", "read", "write", "status", "timeout")}
    return LoadResult(
        requests=got["requests"],
        seconds=got["duration_us"] / 1e6,
        p50_ms=got["p50_us"] / 1e3,
        p99_ms=got["p99_us"] / 1e3,
        errors=sum(kinds.values()),
        error_kinds={name: count for name, count in kinds.items() if count},
    )


async def _python_load(call: Call, connections: int, seconds: float) -> LoadResult:
    """The fallback: far slower than wrk, so it measures its own limit as much as the target's."""
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=5.0)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(deadline: float) -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                kind = ""
                try:
                    async with session.post(call.url, data=call.body, headers=call.headers) as r:
                        await r.read()
                        kind = f"HTTP {r.status}" if r.status >= 400 else ""
                except (aiohttp.ClientError, TimeoutError) as exc:
                    kind = type(exc).__name__
                latencies.append(time.perf_counter() - start)
                if kind:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        errors=errors,
        error_kinds=kinds,
    )
