"""Real `redis-server` processes for the tests: never the machine's own Redis.

Each server runs without persistence in its own temporary directory on a free loopback port,
and can be killed (-9), frozen (SIGSTOP) and restarted on the same port. `RedisClusterServers`
starts three masters and joins them with `redis-cli --cluster create`; `RedisSentinelServers` a
master, a replica and Sentinels watching them. Every process is tied to
the test process (it dies with it on Linux) and stopped by the context managers even on failure.

A free port is only free when `free_port` looks: another process (a concurrent test session)
may bind it before the server does, so a first start that fails with "Address already in use"
starts again on another one (`RedisServer.start`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

START_TIMEOUT = 10.0
PORT_ATTEMPTS = 5
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


def port_taken(log: str) -> bool:
    """Whether a process's log says it could not bind its port (redis-server and Python say
    it in different cases)."""
    return "address already in use" in log.lower()


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


class _Started:
    """`with` starts it and stops it, whatever happens in between."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class PortTaken(RuntimeError):
    """Another process bound the chosen port between `free_port` and the server's bind."""


class RedisServer(_Started):
    """`password`: requirepass and masterauth (a replica that may be promoted needs both);
    `replica_of`: the master it replicates; `options`: more `--name value`s."""

    log_name = "redis.log"

    def __init__(
        self,
        workdir: Path,
        *,
        cluster: bool = False,
        password: str | None = None,
        replica_of: RedisServer | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.password = password
        self.replica_of = replica_of
        self.options = tuple(options)
        self.port = free_port(bus=cluster)
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._started = False  # once started, the port is the server's: clients know it

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Started, not killed and not frozen."""
        return self._process is not None and self._process.poll() is None and not self._frozen

    def arguments(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--protected-mode", "no", "--logfile", str(self.workdir / self.log_name)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000"]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        return args + list(self.options)

    def start(self) -> None:
        """A first start moves to another free port while the chosen one turns out taken; a
        restart keeps its port."""
        for _ in range(PORT_ATTEMPTS):
            try:
                self._launch()
            except PortTaken:
                if self._started:
                    raise
                self.port = free_port(bus=self.cluster)
                continue
            self._started = True
            return
        raise RuntimeError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts")

    def _launch(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.workdir / self.log_name
        logged = log_file.stat().st_size if log_file.exists() else 0  # a restart appends
        self._process = subprocess.Popen(
            self.arguments(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,  # only prctl: safe between fork and exec
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                with log_file.open("rb") as log:
                    log.seek(logged)
                    text = log.read().decode(errors="replace")
                if port_taken(text):
                    raise PortTaken(f"port {self.port} was taken")
                raise RuntimeError(f"redis-server on port {self.port} exited:\n{text[-2000:]}")
            if self._answers():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def _answers(self) -> bool:
        """Whether this process answers on the port: not another that took the port first (a
        server of a concurrent session answers PING just as well)."""
        assert self._process is not None
        client = redis.Redis(
            port=self.port, password=self.password, socket_timeout=0.2, socket_connect_timeout=0.2
        )
        try:
            with client:
                return client.info("server").get("process_id") == self._process.pid
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, state gone (no persistence)."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGCONT)
                self._process.kill()
            self._process.wait()
            self._process = None
            self._frozen = False

    stop = kill

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._frozen = False


class RedisClusterServers(_Started):
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
            _until(
                lambda: all(b"cluster_state:ok" in self.info(node) for node in self.nodes),
                "the test cluster to reach cluster_state:ok",
            )
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def info(node: RedisServer) -> bytes:
        return command(node.port, "CLUSTER", "INFO")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


SENTINEL_MASTER = "mymaster"
# A dead master is "subjectively down" after this, and failed over a few seconds later.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer(RedisServer):
    """`redis-server sentinel.conf --sentinel`, watching `master`. The
    config file is Sentinel's own (it rewrites it); it holds the master's password, so it is
    named *.conf, not *.log."""

    log_name = "sentinel.log"

    def __init__(
        self, workdir: Path, *, master: RedisServer, quorum: int, password: str | None = None
    ) -> None:
        super().__init__(workdir)
        self.master = master
        self.quorum = quorum
        self.master_password = password

    def arguments(self) -> list[str]:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f"dir {self.workdir}",
            f"logfile {self.workdir / self.log_name}",
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SENTINEL_MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
        ]
        if self.master_password is not None:
            lines.append(f"sentinel auth-pass {SENTINEL_MASTER} {self.master_password}")
        config = self.workdir / "sentinel.conf"
        if not self._started:  # a restart keeps what Sentinel wrote there (a failover)
            config.write_text("\n".join(lines) + "\n")
        return ["redis-server", str(config), "--sentinel"]

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)

    def master_port_now(self) -> int | None:
        """The port this Sentinel names for the master now (None: it does not answer)."""
        try:
            with self.client() as client:
                address = client.sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None


class RedisSentinelServers(_Started):
    """A master, one replica (`--replicaof`) and 1 or 3 Sentinels (quorum: a majority), all on
    free loopback ports, each in its own directory of `workdir` with its own *.log.

    `start` returns once the replica is in sync and every Sentinel knows the master, the
    replica and all the other Sentinels: what a failover needs. `kill_master` and
    `wait_for_failover` act one out."""

    def __init__(self, workdir: Path, *, sentinels: int = 3, password: str | None = None) -> None:
        if sentinels not in (1, 3):
            raise ValueError("1 or 3 sentinels")
        self.password = password
        # Either node may be master (after a failover): neither waits 5 s before a full sync.
        options = ("--repl-diskless-sync-delay", "0")
        self.master = RedisServer(workdir / "master", password=password, options=options)
        self.replica = RedisServer(
            workdir / "replica", password=password, replica_of=self.master, options=options
        )
        self.sentinels = [
            SentinelServer(
                workdir / f"sentinel{i}",
                master=self.master,
                quorum=sentinels // 2 + 1,
                password=password,
            )
            for i in range(sentinels)
        ]

    def url(self, *, password: str | None = None, db: int = 0) -> str:
        """The gateway's `quota.redis_url`; the password (default: the master's) goes in."""
        secret = self.password if password is None else password
        auth = f":{secret}@" if secret else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SENTINEL_MASTER}/{db}"

    def client(self, server: RedisServer) -> redis.Redis:
        """A plain client of one data node, for set-up and checks."""
        return redis.Redis(
            port=server.port, password=self.password, socket_timeout=1.0, socket_connect_timeout=1.0
        )

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.start()
            _until(self._replica_in_sync, "the replica to sync")
            for sentinel in self.sentinels:
                sentinel.start()
            for sentinel in self.sentinels:
                _until(partial(self._knows_all, sentinel), "the sentinels to know each other")
        except BaseException:
            self.stop()
            raise

    def replication(self, server: RedisServer) -> dict[str, Any]:
        """`INFO replication` of one data node ({} when it does not answer)."""
        try:
            with self.client(server) as client:
                return client.info("replication")  # type: ignore[no-any-return]
        except redis.RedisError:
            return {}

    def _replica_in_sync(self) -> bool:
        return self.replication(self.replica).get("master_link_status") == "up"

    def _knows_all(self, sentinel: SentinelServer) -> bool:
        try:
            with sentinel.client() as client:
                state = client.sentinel_master(SENTINEL_MASTER)
        except redis.RedisError:
            return False
        return (
            int(state["port"]) == self.master.port
            and int(state["num-slaves"]) >= 1
            and int(state["num-other-sentinels"]) == len(self.sentinels) - 1
        )

    def current_master(self) -> RedisServer:
        """The data node the Sentinels name as master now."""
        ports = {s.master_port_now() for s in self.sentinels if s.running}
        for server in (self.master, self.replica):
            if server.port in ports:
                return server
        raise RuntimeError("no sentinel names a known master")

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (no persistence: its state is gone); returns it."""
        master = self.current_master()
        master.kill()
        return master

    def wait_for_failover(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Until every running (not frozen) Sentinel names the other node, and that node says
        it is master."""
        new = self.replica if old is self.master else self.master

        def promoted() -> bool:
            ports = {s.master_port_now() for s in self.sentinels if s.running}
            return ports == {new.port} and self.replication(new).get("role") == "master"

        _until(promoted, "the sentinels to promote the replica", timeout)
        return new

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.stop()


def _until(condition: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll `condition` every 50 ms for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
