"""Callers that hang up mid-stream: nothing is left behind once the drains have settled."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import EventLoop, parse_config
from gateway.simulator.app import create_simulator_app
from gateway.simulator.config import RateLimitConfig, SimulatorConfig
from gateway.state import DRAINS
from tests.conftest import ACME, AiohttpClient, gateway_yaml
from tests.processes import Running, both_loops, gateway_and_simulator
from tests.secret_watch import SecretWatch

CHAT = "/v1/agents/ag_support/chat"
STORY = {"message": "Tell me the long story of your products, all of it", "stream": True}


async def hang_up_somewhere(
    session: aiohttp.ClientSession, url: str, rng: random.Random, limit: asyncio.Semaphore
) -> int:
    """One stream, left after a random number of events (0: before the first)."""
    async with limit:
        response = await session.post(url, json=STORY, headers=ACME)
        for _ in range(rng.randint(0, 8)):
            if await response.content.readuntil(b"\n\n") == b"":
                break
        response.close()
        return response.status


@pytest.fixture
async def served(tmp_path: Path, serve_loop: EventLoop | None) -> AsyncIterator[Running]:
    """Real processes; the simulator paces events 5 ms apart. Logging at info (500 access
    lines), for the `started` line that names the event loop."""
    async with gateway_and_simulator(
        tmp_path,
        event_loop=serve_loop,
        simulator_yaml=(
            "rate_limit: {per_minute: 100000, per_day: 1000000}\nchunk_interval: 0.005\n"
        ),
    ) as running:
        yield running


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def settled(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    """Waits until no stream, drain or request is in flight; returns the scrape's counters."""
    wanted = ("gateway_active_streams", "gateway_stream_drains", "gateway_inflight_requests")
    values: dict[str, float] = {}
    for _ in range(300):
        async with session.get(f"{admin}/metrics") as response:
            text = await response.text()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = line.split("{")[0].split(" ")[0]
                values[name] = values.get(name, 0.0) + float(line.split()[-1])
        if all(values.get(name, 0.0) == 0 for name in wanted):
            return values
        await asyncio.sleep(0.05)  # drains finish on upstream's pace: the scrape is the event
    pytest.fail(f"never settled: { {name: values.get(name) for name in wanted} }")


def ours() -> list[asyncio.Task[Any]]:
    """Tasks but the servers' per-connection loops (kept-alive connections are not leaks)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") != "RequestHandler.start"
    ]


@pytest.mark.timeout(120)
@both_loops
async def test_500_streams_aborted_at_random_points_leave_no_connections_or_memory_behind(
    served: Running, secret_watch: SecretWatch
) -> None:
    rng, limit = random.Random(500), asyncio.Semaphore(50)
    pid = served.gateway.pid
    url = served.url + CHAT
    async with aiohttp.ClientSession(response_class=secret_watch.response_class()) as session:
        # Warm-up: pools, caches and the allocator reach their working size first.
        await asyncio.gather(*(hang_up_somewhere(session, url, rng, limit) for _ in range(200)))
        await settled(session, served.admin)
        fds, rss = open_fds(pid), rss_bytes(pid)

        statuses = await asyncio.gather(
            *(hang_up_somewhere(session, url, rng, limit) for _ in range(500))
        )
        after = await settled(session, served.admin)

        async with session.get(f"{served.admin}/metrics") as response:
            exposition = await response.text()

    assert set(statuses) == {200}
    assert after["gateway_requests_total"] == 700
    # A caller gone mid-write is a 499 (or a 200 that finished first), never the gateway's 500.
    codes = {
        line.split('code="')[1].split('"')[0]
        for line in exposition.splitlines()
        if line.startswith("gateway_requests_total{")
    }
    assert codes <= {"200", "499"}, codes
    # Proof that the exercise met the gateway mid-stream. How many of 700 it catches depends
    # on load (a stream written whole into the socket before its caller hangs up is no
    # disconnect): 280-570 seen on a 2-core machine, so the floor is well below that.
    assert after["gateway_client_disconnects_total"] > 150
    # Kept-alive upstream connections come and go with the load (at most one per concurrent
    # stream); a leak of one per aborted stream would show as hundreds.
    assert open_fds(pid) <= fds + 50, f"descriptors {fds} → {open_fds(pid)}"
    growth = rss_bytes(pid) - rss
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 500 aborted streams"


async def test_aborted_streams_leave_no_tasks_in_the_process(
    aiohttp_client: AiohttpClient, make_gateway: Any
) -> None:
    simulator = await aiohttp_client(
        create_simulator_app(
            SimulatorConfig(
                rate_limit=RateLimitConfig(per_minute=100_000, per_day=1_000_000),
                chunk_interval=0.005,
            )
        )
    )
    url = str(simulator.make_url("")).rstrip("/")
    gateway: TestClient[web.Request, web.Application] = await make_gateway(
        config=parse_config(gateway_yaml(url))
    )
    baseline = set(ours())
    rng, limit = random.Random(100), asyncio.Semaphore(20)
    session = gateway.session
    target = str(gateway.make_url(CHAT))
    await asyncio.gather(*(hang_up_somewhere(session, target, rng, limit) for _ in range(100)))

    drains = gateway.app[DRAINS]
    async with asyncio.timeout(10):
        await drains.wait_finished(drains.started)
    # A handler or drain task may still be on its last steps (writing its log line, closing
    # its connection): wait for exactly those to end. A task that never ends is the leak.
    left = set(ours()) - baseline - {asyncio.current_task()}
    if left:
        _, pending = await asyncio.wait(left, timeout=10)
        assert not pending, pending
