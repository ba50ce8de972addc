"""Open-loop latency: requests on a fixed schedule, whatever the answers do.

wrk is closed-loop: each connection sends its next request when the last one answered, so a
stall delays the requests that would have been sent during it and they are never measured (the
"coordinated omission" of wrk's latency figures). Here request i is due at start + i / rate and
its own timer fires it then, on an idle keep-alive connection or on a new one if none is idle
(nothing queues in the client); its latency is counted from its *due* time to the end of its
answer. A client that fell behind, or a path that stalled, shows in the latency instead of
disappearing from it.

The generator runs in a process of its own (`python -m bench.openloop`), so its CPU is not the
harness's; it prints one JSON line with its raw figures. On two cores it still shares a core
with what it measures, the same for every path.

    python -m bench.openloop --call call.json --rate 500 --seconds 10 --warmup 2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from bench.load import Call
from bench.phases import Target, rotated
from bench.procs import Proc, die_with_parent
from bench.stats import EN_DASH, Spread, percentile

ROOT = Path(__file__).resolve().parent.parent

REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class OpenLoopSettings:
    rate: float = 500.0
    seconds: float = 10.0
    rounds: int = 3
    warmup_seconds: float = 2.0


# --- the generator (its own process) ----------------------------------------------------------
#
# A small HTTP/1.1 keep-alive client on asyncio's protocols and timer callbacks: no task per
# request, no aiohttp. aiohttp's client costs about 400 µs of CPU per request here, a fifth of a
# core at 500 req/s taken from the processes it measures; this costs a fraction of that.


def parse_response(buffer: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes it took, keep-alive) once a whole response is in `buffer`; else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif name == "connection":
            close = "close" in value.lower()
    start = end + 4
    if not chunked:
        return (status, start + length, not close) if len(buffer) >= start + length else None
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
        position = line_end + 2 + size + 2
        if len(buffer) < position:
            return None
        if size == 0:
            return status, position, not close


class _Connection(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: tuple[float, float, bool] | None = None
        """(due, began, record) of the request awaiting its answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, due: float, began: float, record: bool) -> None:
        assert self.transport is not None
        self.pending = (due, began, record)
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        parsed = parse_response(self.buffer)
        if parsed is None or self.pending is None:
            return
        status, used, keep_alive = parsed
        del self.buffer[:used]
        pending, self.pending = self.pending, None
        self.client.finished(pending, "" if status == 200 else f"HTTP {status}")
        if keep_alive and self.transport is not None and not self.transport.is_closing():
            self.client.idle.append(self)
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.client.idle:
            self.client.idle.remove(self)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.client.finished(pending, "connection lost")


class _Client:
    def __init__(self, call: Call) -> None:
        url = URL(call.url)
        assert url.host is not None and url.port is not None
        self.host, self.port = url.host, url.port
        headers = {"Host": f"{url.host}:{url.port}", **call.headers}
        headers["Content-Length"] = str(len(call.body))
        head = f"POST {url.raw_path_qs} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.request = head.encode() + b"\r\n" + call.body
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Connection] = []
        self.opening: set[asyncio.Task[None]] = set()
        self.outstanding = 0
        self.latencies: list[float] = []
        self.service: list[float] = []
        self.lags: list[float] = []
        self.errors: Counter[str] = Counter()
        self.all_done = asyncio.Event()

    def fire(self, due: float, record: bool) -> None:
        began = self.loop.time()
        self.outstanding += 1
        self.all_done.clear()
        if self.idle:
            self.idle.pop().send(due, began, record)
            return
        task = self.loop.create_task(self._open_and_send(due, began, record))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    async def _open_and_send(self, due: float, began: float, record: bool) -> None:
        try:
            _, connection = await self.loop.create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError as exc:
            self.finished((due, began, record), type(exc).__name__)
            return
        connection.send(due, began, record)

    def finished(self, pending: tuple[float, float, bool], error: str) -> None:
        due, began, record = pending
        ended = self.loop.time()
        self.outstanding -= 1
        if self.outstanding == 0:
            self.all_done.set()
        if not record:
            return
        if error:
            self.errors[error] += 1
        self.latencies.append(ended - due)
        self.service.append(ended - began)
        self.lags.append(began - due)

    async def schedule(self, count: int, interval: float, record: bool) -> None:
        """`count` requests `interval` apart, each fired by its own timer; then all answers."""
        start = self.loop.time() + 0.05
        for index in range(count):
            self.loop.call_at(start + index * interval, self.fire, start + index * interval, record)
        await asyncio.sleep(max(0.0, start + count * interval - self.loop.time()))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                while self.outstanding:
                    await self.all_done.wait()
        except TimeoutError:
            self.errors["timeout"] += self.outstanding

    def close(self) -> None:
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()


async def _generate(call: Call, rate: float, seconds: float, warmup: float) -> dict[str, object]:
    client = _Client(call)
    interval = 1.0 / rate
    # Warm-up at the same rate: connections open, caches fill; not counted.
    await client.schedule(int(warmup * rate), interval, record=False)
    gc.collect()
    gc.freeze()
    cpu_before = time.process_time()
    await client.schedule(int(seconds * rate), interval, record=True)
    cpu = time.process_time() - cpu_before
    client.close()
    sent = len(client.latencies)
    latencies, service, lags = client.latencies, client.service, client.lags
    return {
        "sent": sent,
        "errors": sum(client.errors.values()),
        "error_kinds": dict(client.errors),
        "connections": len(client.idle),
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p90_ms": percentile(latencies, 90) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "p999_ms": percentile(latencies, 99.9) * 1e3,
        "max_ms": max(latencies, default=math.nan) * 1e3,
        "service_p50_ms": percentile(service, 50) * 1e3,
        "service_p99_ms": percentile(service, 99) * 1e3,
        "lag_p50_ms": percentile(lags, 50) * 1e3,
        "lag_p99_ms": percentile(lags, 99) * 1e3,
        "client_cpu_us": cpu / max(sent, 1) * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__)
    parser.add_argument("--call", type=Path, required=True, help="JSON: url, headers, body")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args(argv)
    spec = json.loads(args.call.read_text())
    call = Call(spec["url"], spec["headers"], spec["body"].encode())
    result = asyncio.run(_generate(call, args.rate, args.seconds, args.warmup))
    print(json.dumps(result), flush=True)


# --- the phase (in the harness) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenLoopRound:
    sent: int
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    service_p50_ms: float
    service_p99_ms: float
    lag_p50_ms: float
    lag_p99_ms: float
    client_cpu_us: float
    proxy_cpu_us: float = math.nan
    sim_cpu_us: float = math.nan
    helper_cpu_us: float = math.nan


@dataclass(slots=True)
class OpenLoopResults:
    settings: OpenLoopSettings
    paths: list[str]
    labels: dict[str, str]
    rounds: dict[str, list[OpenLoopRound]] = field(default_factory=dict)
    seconds: float = 0.0


def _write_call(call: Call, path: Path) -> Path:
    spec = {"url": call.url, "headers": dict(call.headers), "body": call.body.decode()}
    path.write_text(json.dumps(spec))
    return path


async def _run_generator(
    call_file: Path, settings: OpenLoopSettings, warmup: float
) -> dict[str, object]:
    argv = [sys.executable, "-m", "bench.openloop", "--call", str(call_file)]
    argv += ["--rate", f"{settings.rate:g}", "--seconds", f"{settings.seconds:g}"]
    argv += ["--warmup", f"{warmup:g}"]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        preexec_fn=die_with_parent,
    )
    try:
        limit = warmup + settings.seconds + REQUEST_TIMEOUT + 30
        out, err = await asyncio.wait_for(process.communicate(), limit)
    finally:
        if process.returncode is None:
            process.kill()
            await asyncio.shield(process.wait())
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(
            f"open-loop generator failed (exit {process.returncode}): {err.decode()[-2000:]}"
        )
    parsed: dict[str, object] = json.loads(lines[-1])
    return parsed


def _round(raw: dict[str, object], cpu: Sequence[float]) -> OpenLoopRound:
    def number(name: str) -> float:
        value = raw.get(name)
        return float(value) if isinstance(value, int | float) else math.nan

    kinds = raw.get("error_kinds")
    return OpenLoopRound(
        sent=int(number("sent")),
        errors=int(number("errors")),
        error_kinds={str(k): int(v) for k, v in kinds.items()} if isinstance(kinds, dict) else {},
        p50_ms=number("p50_ms"),
        p90_ms=number("p90_ms"),
        p99_ms=number("p99_ms"),
        p999_ms=number("p999_ms"),
        max_ms=number("max_ms"),
        service_p50_ms=number("service_p50_ms"),
        service_p99_ms=number("service_p99_ms"),
        lag_p50_ms=number("lag_p50_ms"),
        lag_p99_ms=number("lag_p99_ms"),
        client_cpu_us=number("client_cpu_us"),
        proxy_cpu_us=cpu[0],
        sim_cpu_us=cpu[1],
        helper_cpu_us=cpu[2],
    )


def _cpu(proc: Proc | None) -> float:
    return proc.cpu_seconds() if proc is not None else math.nan


async def run_open_loop(
    targets: Sequence[Target],
    simulator: Proc,
    settings: OpenLoopSettings,
    workdir: Path,
    labels: dict[str, str],
    say: Callable[[str], None],
) -> OpenLoopResults:
    """Every path in turn, `rounds` times, each round starting with a different path."""
    clock = time.monotonic()
    results = OpenLoopResults(settings, [t.name for t in targets], labels)
    files = {t.name: _write_call(t.call, workdir / f"openloop-{t.name}.json") for t in targets}
    for round_no in range(settings.rounds):
        for target in rotated(list(targets), round_no):
            before = _cpu(target.proxy), simulator.cpu_seconds(), _cpu(target.helper)
            # Each run has its own warm-up: a fresh client process opens its connections.
            raw = await _run_generator(files[target.name], settings, settings.warmup_seconds)
            after = _cpu(target.proxy), simulator.cpu_seconds(), _cpu(target.helper)
            # CPU over warm-up and measurement together, per request sent in both.
            total = (settings.seconds + settings.warmup_seconds) * settings.rate
            cpu = [(b - a) / total * 1e6 for a, b in zip(before, after, strict=True)]
            measured = _round(raw, cpu)
            results.rounds.setdefault(target.name, []).append(measured)
            say(
                f"open loop round {round_no + 1}/{settings.rounds} {target.name:14}: "
                f"p50 {measured.p50_ms:6.2f} ms  p99 {measured.p99_ms:6.2f} ms  "
                f"max {measured.max_ms:6.1f} ms  client lag p99 {measured.lag_p99_ms:5.2f} ms  "
                f"errors {measured.errors}"
            )
    results.seconds = time.monotonic() - clock
    return results


# --- figures and report ---------------------------------------------------------------------------


def spread(results: OpenLoopResults, name: str, pick: Callable[[OpenLoopRound], float]) -> Spread:
    return Spread.of([pick(r) for r in results.rounds.get(name, [])])


def added(
    results: OpenLoopResults, name: str, base: str, pick: Callable[[OpenLoopRound], float]
) -> Spread:
    """`name` minus `base`, round by round (they ran back to back), then over rounds."""
    return Spread.of(
        [
            pick(a) - pick(b)
            for a, b in zip(
                results.rounds.get(name, []), results.rounds.get(base, []), strict=False
            )
        ]
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _ms(s: Spread, sign: bool = False) -> str:
    return s.fmt(2, sign=sign, suffix=" ms")


def section(results: OpenLoopResults, base: str) -> list[str]:
    s = results.settings
    rows = []
    for name in results.paths:
        label = results.labels.get(name, name)
        rounds = results.rounds.get(name, [])
        rows.append(
            [
                label,
                _ms(spread(results, name, lambda r: r.p50_ms)),
                _ms(spread(results, name, lambda r: r.p90_ms)),
                _ms(spread(results, name, lambda r: r.p99_ms)),
                _ms(spread(results, name, lambda r: r.p999_ms)),
                _ms(spread(results, name, lambda r: r.max_ms)),
                _ms(spread(results, name, lambda r: r.lag_p99_ms)),
                spread(results, name, lambda r: r.proxy_cpu_us).fmt(0),
                spread(results, name, lambda r: r.client_cpu_us).fmt(0),
                f"{sum(r.errors for r in rounds)} / {sum(r.sent for r in rounds)}",
            ]
        )
    diffs = []
    for name in results.paths:
        if name == base:
            continue
        diffs.append(
            [
                f"{results.labels.get(name, name)} minus {results.labels.get(base, base)}",
                _ms(added(results, name, base, lambda r: r.p50_ms), True),
                _ms(added(results, name, base, lambda r: r.p99_ms), True),
                _ms(added(results, name, base, lambda r: r.service_p50_ms), True),
                _ms(added(results, name, base, lambda r: r.service_p99_ms), True),
            ]
        )
    return [
        f"### Open-loop latency at a fixed {s.rate:g} requests/s",
        "",
        f"Measured in {results.seconds:.0f} s: {s.rounds} rounds, each path in turn for "
        f"{s.seconds:g} s at {s.rate:g} req/s (one request due every "
        f"{1e3 / s.rate:g} ms, sent whether or not earlier ones answered) after "
        f"{s.warmup_seconds:g} s of unmeasured warm-up at the same rate. Latency is counted "
        "from each request's *due* time, so a stall or a client running late shows in it "
        "(no coordinated omission). *Client lag*: how late the generator actually started a "
        "request (its event loop wakes on a timer with millisecond resolution); it is in every "
        "path's figures alike. *Proxy CPU*: the proxy process's CPU per request at this rate, "
        "warm-up included.",
        "",
        *_table(
            [
                "path",
                "p50",
                "p90",
                "p99",
                "p99.9",
                "max",
                "client lag p99",
                "proxy CPU µs/req",
                "client CPU µs/req",
                "errors",
            ],
            rows,
        ),
        "",
        "Added latency, taken within each round (the paths ran back to back), then "
        f"median (min{EN_DASH}max) over rounds; *service time* is from the request's actual "
        "start instead of its due time:",
        "",
        *_table(["compared", "p50", "p99", "service time p50", "service time p99"], diffs),
    ]


def method_bullet(s: OpenLoopSettings) -> str:
    return (
        "- **Open-loop latency** (`--only openloop` runs it alone): `python -m bench.openloop`, "
        "a minimal HTTP/1.1 client on asyncio's protocols and timer callbacks, in a process of "
        "its own (its CPU per request is in the table: less than half of aiohttp's client's), "
        f"fires each request from its own timer on a fixed schedule ({s.rate:g}/s) whether or "
        "not earlier ones have answered, on an idle keep-alive connection or on a new one when "
        "none is idle (so nothing queues in the client), and counts each latency from the "
        f"request's due time. {s.rounds} rounds of {s.seconds:g} s per path, alternating. wrk2 "
        "(the open-loop wrk) is not packaged by Debian, hence Python. On two cores the "
        "generator, the simulator, the proxy and Redis share the CPUs: at this rate they are "
        "far from busy, but a request may wait for a core another process holds; that cost is "
        "in every path's figures, direct's included."
    )


if __name__ == "__main__":
    main()
