"""Child processes of a benchmark run: free ports, readiness, CPU time, guaranteed cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import aiohttp

from gateway.config import EVENT_LOOP

_PR_SET_PDEATHSIG = 1
STOP_GRACE = 5.0


class ProcessFailed(RuntimeError):
    """A child did not start, or died mid-run; the message carries its log's tail."""


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: every socket stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
    return ports


def die_with_parent() -> None:
    # Runs in the child between fork and exec: if the harness is SIGKILLed, its children get
    # SIGTERM from the kernel instead of living on as orphans.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class Proc:
    """One started child, its log file and its CPU accounting."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self._ticks = os.sysconf("SC_CLK_TCK")

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """utime + stime so far, from /proc; a comparable cost on a machine shared with others."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # The command name may hold spaces or parentheses, so fields are counted after its ")".
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks

    def check_alive(self) -> None:
        code = self.process.returncode
        if code is not None:
            raise ProcessFailed(
                f"{self.name} (pid {self.pid}) exited with {code}; its log {self.log} ends:\n"
                + tail(self.log)
            )

    async def stop(self) -> str:
        """SIGTERM, then SIGKILL after STOP_GRACE; says how it went, for the report."""
        if self.process.returncode is not None:
            return f"had already exited with {self.process.returncode}"
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            code = await asyncio.wait_for(self.process.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
            return f"ignored SIGTERM for {STOP_GRACE:g} s and was killed"
        return f"exited with {code} {time.monotonic() - started:.1f} s after SIGTERM"


class ProcessSet:
    """Starts children with logs under one directory; leaving it stops every one, in reverse."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.stopped: dict[str, str] = {}
        """How each child ended, by name."""

    async def __aenter__(self) -> ProcessSet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop_all()

    async def stop_all(self) -> None:
        while self.procs:
            # Shielded so a second Ctrl-C during cleanup cannot leave a child behind.
            proc = self.procs.pop()
            self.stopped[proc.name] = await asyncio.shield(proc.stop())

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                # asyncio's own loop, as the production image runs (`make venv` installs
                # uvloop, for the tests), unless THINNEST_GATEWAY_EVENT_LOOP says otherwise.
                env={EVENT_LOOP: "asyncio", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=cwd,
                # Own session: a terminal Ctrl-C reaches only the harness, which then stops
                # the children in order rather than all of them dying at once mid-request.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc


async def wait_ready(
    proc: Proc,
    url: str,
    *,
    within: float = 30.0,
    any_status: bool = False,
    trust: ssl.SSLContext | None = None,
) -> float:
    """Poll `url` until it answers 200 (any HTTP answer with `any_status`); seconds it took.
    `trust` verifies an https URL's certificate (a CA of the run's own).

    Fails fast, with the log's tail, if the process exits meanwhile.
    """
    started = time.monotonic()
    deadline = started + within
    last_error = "no answer yet"
    probe_timeout = aiohttp.ClientTimeout(total=1.0)
    connector = aiohttp.TCPConnector(ssl=trust if trust is not None else True)
    async with aiohttp.ClientSession(timeout=probe_timeout, connector=connector) as session:
        while time.monotonic() < deadline:
            proc.check_alive()
            try:
                async with session.get(url) as response:
                    if response.status == 200 or any_status:
                        return time.monotonic() - started
                    last_error = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = type(exc).__name__
            await asyncio.sleep(0.05)
    raise ProcessFailed(
        f"{proc.name} (pid {proc.pid}) not ready at {url} after {within:.0f} s "
        f"({last_error}); its log {proc.log} ends:\n{tail(proc.log)}"
    )


async def redis_call(port: int, *args: str, limit: float = 2.0) -> str:
    """One Redis command over a fresh connection; its simple or bulk string reply."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
    try:
        writer.write(request.encode())
        await writer.drain()
        head = (await asyncio.wait_for(reader.readline(), limit)).decode().rstrip("\r\n")
        if head.startswith("$"):
            size = int(head[1:])
            body = await asyncio.wait_for(reader.readexactly(size + 2), limit)
            return body[:-2].decode(errors="replace")
        if head.startswith(("+", ":")):
            return head[1:]
        raise ProcessFailed(f"redis on port {port} answered {' '.join(args)} with {head!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def redis_commands(port: int) -> tuple[int, int]:
    """Commands the Redis server has processed since it started, and how many were scripts.

    The first counts the commands Lua scripts run too; the second is EVAL/EVALSHA calls, the
    round trips a client made to run a script.
    """
    stats, commands = (
        await redis_call(port, "INFO", "stats"),
        await redis_call(port, "INFO", "commandstats"),
    )
    total = scripts = -1
    for line in stats.splitlines():
        name, _, value = line.partition(":")
        if name == "total_commands_processed":
            total = int(value)
    scripts = 0
    for line in commands.splitlines():
        name, _, value = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro"):
            scripts += int(value.split(",")[0].removeprefix("calls="))
    if total < 0:
        raise ProcessFailed(f"redis on port {port}: no total_commands_processed in INFO stats")
    return total, scripts


async def wait_redis(proc: Proc, port: int, *, within: float = 30.0) -> float:
    """PING until PONG; seconds it took. Fails fast, with the log's tail, if Redis exits."""
    started = time.monotonic()
    last_error = "no answer yet"
    while time.monotonic() < started + within:
        proc.check_alive()
        try:
            if await redis_call(port, "PING", limit=1.0) == "PONG":
                return time.monotonic() - started
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ProcessFailed) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.05)
    raise ProcessFailed(
        f"{proc.name} (pid {proc.pid}) did not answer PING on port {port} after {within:.0f} s "
        f"({last_error}); its log {proc.log} ends:\n{tail(proc.log)}"
    )


async def run_capped(*argv: str, limit: float) -> tuple[int, str]:
    """Run a command to its end within `limit` seconds: (exit code, output); -1 on timeout."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        preexec_fn=die_with_parent,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        return -1, f"{argv[0]} timed out after {limit:.0f} s"
    finally:
        # Also on cancellation (Ctrl-C, SIGTERM): the command must not outlive the run.
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
    return process.returncode or 0, out.decode(errors="replace")
