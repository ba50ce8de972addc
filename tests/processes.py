"""Real gateway and simulator processes, started as operators start them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import PLATFORM_KEY, SUPPORT_KEY, gateway_yaml
from tests.redis_servers import free_port


async def start(
    *args: str, env: dict[str, str], log: Path, descriptors: int | None = None
) -> asyncio.subprocess.Process:
    """`descriptors`: the child's RLIMIT_NOFILE (soft and hard), as `ulimit -n` would set it."""

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


async def wait_healthy(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            if process.returncode is not None:
                pytest.fail(f"process exited early:\n{log.read_text()}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # polling a process that announces readiness nowhere else
    pytest.fail(f"{url} never became healthy:\n{log.read_text()}")


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), timeout=15)


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
) -> AsyncIterator[Running]:
    """`simulate` and `serve` started as operators start them; the gateway must exit 0 on
    SIGTERM at the end (unless the test already stopped it, with 0). With `tls` (certificate
    chain and key files) the caller port serves HTTPS; `descriptors` lowers the gateway's
    descriptor limit."""
    sim_port, gw_port, admin_port = free_port(), free_port(), free_port()
    env = {**os.environ, "TEST_PLATFORM_KEY": PLATFORM_KEY, "TEST_SUPPORT_KEY": SUPPORT_KEY}
    sim_log, gw_log = tmp_path / "simulator.log", tmp_path / "gateway.log"
    sim_args = ["simulate", "--port", str(sim_port)]
    if simulator_yaml is not None:
        (tmp_path / "simulator.yaml").write_text(simulator_yaml)
        sim_args += ["--config", str(tmp_path / "simulator.yaml")]
    simulator = await start(*sim_args, env=env, log=sim_log)
    config = tmp_path / "gw.yaml"
    listen_tls = "" if tls is None else f", tls: {{cert_file: {tls[0]}, key_file: {tls[1]}}}"
    config.write_text(
        gateway_yaml(f"http://127.0.0.1:{sim_port}")
        + f"listen: {{host: 127.0.0.1, port: {gw_port}{listen_tls}}}\n"
        + f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n"
        + f"shutdown_grace: {grace}\n"
        + extra
    )
    gateway = await start(
        "serve", "--config", str(config), env=env, log=gw_log, descriptors=descriptors
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{sim_port}/healthz", simulator, sim_log)
        await wait_healthy(f"http://127.0.0.1:{admin_port}/readyz", gateway, gw_log)
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
        for process in (gateway, simulator):
            if process.returncode is None:
                process.kill()
                await process.wait()
