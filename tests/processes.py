"""Real gateway and simulator processes, started as operators start them.

Their ports come from `free_port`, which is only free when it looks: another process (a
concurrent test session) may bind one before ours does. `serving` starts a process again on
other free ports when its log says a port was taken."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.config import EVENT_LOOP, EventLoop
from tests.conftest import PLATFORM_KEY, SUPPORT_KEY, gateway_yaml
from tests.redis_servers import PORT_ATTEMPTS, PortTaken, free_port, port_taken


async def start(
    *args: str,
    env: dict[str, str],
    log: Path,
    descriptors: int | None = None,
    event_loop: EventLoop | None = None,
) -> asyncio.subprocess.Process:
    """`descriptors`: the child's RLIMIT_NOFILE (soft and hard), as `ulimit -n` would set it.
    A `serve` runs on `event_loop`, else on the one `env` names, else on asyncio's own: the
    production image's, whether or not the test extras installed uvloop."""
    env = {EVENT_LOOP: "asyncio", **env, **({EVENT_LOOP: event_loop} if event_loop else {})}

    def limit() -> None:
        if descriptors is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    with log.open("wb") as out:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *args,
            env=env,
            stdout=out,
            stderr=out,
            preexec_fn=limit if descriptors is not None else None,
        )


def assert_runs_on(event_loop: EventLoop, log: Path) -> None:
    """The `serve` process writing `log` says, in its `started` line, that it runs on
    `event_loop` (`auto`: on either)."""
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    started = [line["event_loop"] for line in lines if line.get("event") == "started"]
    assert started, f"no started line (logging below info?):\n{text}"
    assert event_loop in ("auto", started[-1]), f"{event_loop} asked for:\n{text}"


async def wait_healthy(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    # Each poll bounded: a process that took the port first may accept and never answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        for _ in range(200):
            if process.returncode is not None:
                text = log.read_text()
                if port_taken(text):
                    raise PortTaken(f"{url}: a port was taken:\n{text}")
                pytest.fail(f"process exited early:\n{text}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientConnectionError, TimeoutError):
                pass
            await asyncio.sleep(0.05)  # polling a process that announces readiness nowhere else
    pytest.fail(f"{url} never became healthy:\n{log.read_text()}")


Process = asyncio.subprocess.Process


async def serving(
    launch: Callable[[list[int]], Awaitable[Process]],
    *,
    ports: int,
    ready: Callable[[list[int]], str],
    log: Path,
) -> tuple[Process, list[int]]:
    """The process `launch` starts on `ports` free ports, once healthy at the URL `ready`
    names for them; started again on other free ports while one turns out taken."""
    for _ in range(PORT_ATTEMPTS):
        chosen = [free_port() for _ in range(ports)]
        process = await launch(chosen)
        try:
            await wait_healthy(ready(chosen), process, log)
        except PortTaken:
            continue
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        return process, chosen
    pytest.fail(f"no free ports in {PORT_ATTEMPTS} attempts:\n{log.read_text()}")


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), timeout=15)


# A test that takes `serve_loop` (itself or through a fixture) runs its `serve` processes on
# asyncio's loop, then on uvloop (the `speed` extra), for what the loop decides: signals, timers
# and the clock pacing reads, transports' flow control, accepting connections.
both_loops = pytest.mark.parametrize("serve_loop", ["asyncio", "uvloop"])


@dataclass(frozen=True)
class Running:
    """A `serve` process in front of a `simulate` process, on free loopback ports."""

    gateway: asyncio.subprocess.Process
    url: str  # the caller port
    admin: str  # the admin port
    simulator: str
    config: Path
    log: Path


@contextlib.asynccontextmanager
async def gateway_and_simulator(
    tmp_path: Path,
    *,
    grace: float = 5,
    extra: str = "",
    simulator_yaml: str | None = None,
    tls: tuple[Path, Path] | None = None,
    descriptors: int | None = None,
    event_loop: EventLoop | None = None,
) -> AsyncIterator[Running]:
    """`simulate` and `serve` started as operators start them; the gateway must exit 0 on
    SIGTERM at the end (unless the test already stopped it, with 0). With `tls` (certificate
    chain and key files) the caller port serves HTTPS; `descriptors` lowers the gateway's
    descriptor limit; an `event_loop` (see `start`) is checked against the `started` line."""
    env = {**os.environ, "TEST_PLATFORM_KEY": PLATFORM_KEY, "TEST_SUPPORT_KEY": SUPPORT_KEY}
    sim_log, gw_log = tmp_path / "simulator.log", tmp_path / "gateway.log"
    sim_args = ["--port"]
    if simulator_yaml is not None:
        (tmp_path / "simulator.yaml").write_text(simulator_yaml)
        sim_args = ["--config", str(tmp_path / "simulator.yaml"), *sim_args]

    async def simulate(ports: list[int]) -> Process:
        return await start("simulate", *sim_args, str(ports[0]), env=env, log=sim_log)

    simulator, (sim_port,) = await serving(
        simulate, ports=1, ready=lambda ports: f"http://127.0.0.1:{ports[0]}/healthz", log=sim_log
    )
    config = tmp_path / "gw.yaml"
    listen_tls = "" if tls is None else f", tls: {{cert_file: {tls[0]}, key_file: {tls[1]}}}"

    async def serve(ports: list[int]) -> Process:
        config.write_text(
            gateway_yaml(f"http://127.0.0.1:{sim_port}")
            + f"listen: {{host: 127.0.0.1, port: {ports[0]}{listen_tls}}}\n"
            + f"admin: {{host: 127.0.0.1, port: {ports[1]}}}\n"
            + f"shutdown_grace: {grace}\n"
            + extra
        )
        return await start(
            "serve",
            "--config",
            str(config),
            env=env,
            log=gw_log,
            descriptors=descriptors,
            event_loop=event_loop,
        )

    processes = [simulator]
    try:
        gateway, (gw_port, admin_port) = await serving(
            serve, ports=2, ready=lambda ports: f"http://127.0.0.1:{ports[1]}/readyz", log=gw_log
        )
        processes.append(gateway)
        if event_loop is not None:
            assert_runs_on(event_loop, gw_log)
        yield Running(
            gateway,
            f"{'http' if tls is None else 'https'}://127.0.0.1:{gw_port}",
            f"http://127.0.0.1:{admin_port}",
            f"http://127.0.0.1:{sim_port}",
            config,
            gw_log,
        )
        assert await stop(gateway) == 0, gw_log.read_text()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
