"""Real `redis-server` processes for the tests: never the machine's own Redis.

Each server runs without persistence in its own temporary directory on a free loopback port,
and can be killed (-9), frozen (SIGSTOP) and restarted on the same port. `RedisClusterServers`
starts three masters and joins them with `redis-cli --cluster create`. Every process is tied to
the test process (it dies with it on Linux) and stopped by the context managers even on failure.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If pytest itself is killed, no redis-server is left behind holding a port.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, bus: bool = False) -> int:
    """A free loopback port; with `bus`, port + 10000 (the cluster bus) is free as well."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not bus or (port + 10_000 <= 65_535 and _port_free(port + 10_000)):
            return port


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """One command over RESP, read until the reply looks complete; for set-up and checks."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n") or _incomplete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _incomplete(reply: bytes) -> bool:
    if reply.startswith(b"$"):
        size = int(reply[1 : reply.index(b"\r\n")])
        return size >= 0 and len(reply) < reply.index(b"\r\n") + 2 + size + 2
    return False


class RedisServer:
    def __init__(self, workdir: Path, *, cluster: bool = False) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.port = free_port(bus=cluster)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--protected-mode", "no", "--logfile", str(self.workdir / "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000"]
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # only prctl: safe between fork and exec
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{log}")
            try:
                if command(self.port, "PING", timeout=0.2) == b"+PONG\r\n":
                    return
            except OSError:
                pass
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, state gone (no persistence)."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGCONT)
                self._process.kill()
            self._process.wait()
            self._process = None

    stop = kill

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisClusterServers:
    """Three masters, no replicas, every slot covered."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            options = ["--cluster-replicas", "0", "--cluster-yes"]
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, *options],
                capture_output=True,
                timeout=30,
                # These servers have no password; a password meant for another Redis stays out.
                env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"},
                check=False,
            )
            if created.returncode != 0:
                output = (created.stdout + created.stderr).decode(errors="replace")[-2000:]
                raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")
            deadline = time.monotonic() + START_TIMEOUT
            while not all(b"cluster_state:ok" in self.info(node) for node in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def info(node: RedisServer) -> bytes:
        return command(node.port, "CLUSTER", "INFO")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
