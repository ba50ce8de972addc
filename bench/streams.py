"""Streaming latency with an aiohttp client: time to first event, and each event's arrival.

Python is fine here: these are latencies at moderate concurrency, not throughput, and the
client's own overhead is the same for every target in a run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from bench.load import Call

STREAM_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class StreamTiming:
    ttfe: float
    """Seconds from sending the request to the first bytes of a `data:` event."""
    events: tuple[float, ...]
    """Seconds from sending the request to each complete event (its blank line)."""
    problem: str
    """Empty for a 200 event stream that ended with a done event; else what went wrong."""


async def stream_once(session: aiohttp.ClientSession, call: Call) -> StreamTiming:
    start = time.perf_counter()
    ttfe = -1.0
    arrivals: list[float] = []
    pending = seen = b""
    try:
        async with session.post(call.url, data=call.body, headers=call.headers) as response:
            if response.status != 200 or response.content_type != "text/event-stream":
                body = (await response.read())[:200].decode(errors="replace")
                return StreamTiming(-1.0, (), f"HTTP {response.status}: {body}")
            async for chunk in response.content.iter_any():
                now = time.perf_counter() - start
                pending += chunk
                if ttfe < 0 and b"data:" in pending:
                    ttfe = now
                *complete, pending = pending.split(b"\n\n")
                arrivals.extend(now for _ in complete)
                if complete:
                    seen = complete[-1]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return StreamTiming(ttfe, tuple(arrivals), f"{type(exc).__name__}: {exc}")
    problem = "" if b'"type": "done"' in seen else f"stream ended without done: {seen[:200]!r}"
    return StreamTiming(ttfe, tuple(arrivals), problem)


async def run_streams(
    call: Call, total: int, concurrency: int, *, spread_over: float = 0.0
) -> list[StreamTiming]:
    """`total` streams, at most `concurrency` at once, after one untimed batch to warm the pool.

    With `spread_over`, the first streams start evenly spread over that many seconds. Streams of
    equal length started together stay in step, so every paced event of every stream would
    leave the server in one burst and each stream's timing would depend on its place in it.
    """
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(stream_once(session, call) for _ in range(concurrency)))
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int) -> StreamTiming:
            # Inside the gate: the first holders (the semaphore is first come, first served)
            # are the ones spread out, and each later stream takes the place of one that ended,
            # so starts stay spread. Spread outside it, the unspread later streams took the
            # free places first and started all at once.
            async with gate:
                if index < concurrency:
                    await asyncio.sleep(spread_over * index / concurrency)
                return await stream_once(session, call)

        return list(await asyncio.gather(*(one(index) for index in range(total))))


def problems(timings: Sequence[StreamTiming]) -> list[str]:
    return [t.problem for t in timings if t.problem]


def ttfes(timings: Sequence[StreamTiming]) -> list[float]:
    return [t.ttfe for t in timings if not t.problem]


def _offsets(timing: StreamTiming) -> list[float]:
    first = timing.events[0]
    return [at - first for at in timing.events]


def reference_offsets(direct: Sequence[StreamTiming]) -> list[float]:
    """For each event index, the median time since the stream's first event, going direct."""
    by_index: list[list[float]] = []
    for timing in direct:
        if timing.problem or not timing.events:
            continue
        for index, offset in enumerate(_offsets(timing)):
            if index == len(by_index):
                by_index.append([])
            by_index[index].append(offset)
    return [statistics.median(offsets) for offsets in by_index]


def added_delays(timings: Sequence[StreamTiming], reference: Sequence[float]) -> list[float]:
    """Each event's (arrival - first event's arrival) minus direct's median for its index.

    The first event is left out: its delay is the time to first event, measured on its own.
    """
    delays = []
    for timing in timings:
        if timing.problem or not timing.events:
            continue
        for index, offset in enumerate(_offsets(timing)[1:], start=1):
            if index < len(reference):
                delays.append(offset - reference[index])
    return delays


def gap_changes(timings: Sequence[StreamTiming], reference: Sequence[float]) -> list[float]:
    """Each inter-event gap minus direct's for the same index (from the median offsets)."""
    changes = []
    for timing in timings:
        if timing.problem or not timing.events:
            continue
        for index in range(1, min(len(timing.events), len(reference))):
            gap = timing.events[index] - timing.events[index - 1]
            changes.append(gap - (reference[index] - reference[index - 1]))
    return changes


def gaps(timings: Sequence[StreamTiming]) -> list[float]:
    """Every inter-event gap of the good streams."""
    return [
        later - earlier
        for timing in timings
        if not timing.problem
        for earlier, later in zip(timing.events, timing.events[1:], strict=False)
    ]
