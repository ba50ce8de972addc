"""The processes a phase measures: their configurations, and starting them on free ports.

Every gateway here runs with all its features on: access logs at level info (one JSON line per
request, to its log file: the process's stderr is redirected there), metrics on its admin port,
session isolation (the default), and upstream rate limits unset. Only the tenant's quotas differ
between the gateways of a run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trustme
import yaml

from bench.load import Call
from bench.phases import Target
from bench.procs import Proc, ProcessFailed, ProcessSet, free_ports, wait_ready, wait_redis

ROOT = Path(__file__).resolve().parent.parent
AGENT = "ag_bench"
TENANT = "bench"
AGENT_KEY = "ak_bench_0001"
PLATFORM_KEY = "thns_sk_bench_0001"
# Not a secret: a key that only this benchmark's throwaway gateway accepts.
CALLER_KEY = "gw_bench_key"
# Long enough for the simulator to cut its reply into the most pieces it sends.
MESSAGE = "How long does a benchmark of the thinnest gateway take on two shared cores? " * 2
GATEWAY_LOG_LEVEL = "info"

# Far out of reach: every request reserves and settles, and none is refused.
QUOTA_LIMITS: Mapping[str, object] = {
    "requests": {"per_minute": 100_000_000, "per_day": 1_000_000_000},
    "tokens": {"per_minute": 1_000_000_000, "per_day": 10_000_000_000},
    "max_concurrent_streams": 1_000_000,
}
# A service (the caller's key) with limits of its own, and calendar budgets at both levels: every
# level a request can belong to but the end user's, all far out of reach as above.
KEY_LIMITS: Mapping[str, object] = {
    "requests": {"per_minute": 100_000_000},
    "tokens": {"per_minute": 1_000_000_000},
    "max_concurrent_streams": 1_000_000,
}
TENANT_BUDGET: Mapping[str, object] = {
    "tokens": {"per_day": 10_000_000_000, "per_month": 100_000_000_000},
    "requests": {"per_month": 10_000_000_000},
    "warn_at": [0.8, 0.95],
}
KEY_BUDGET: Mapping[str, object] = {"tokens": {"per_month": 100_000_000_000}}
QuotaSpec = Mapping[str, str] | None
"""A gateway's `quota` section; None is quotas off (the tenant has no `limits`)."""


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ProcessFailed(f"{name} is not installed: run `make venv` first")
    return found


def gateway_config(
    sim_port: int,
    gw_port: int,
    admin_port: int,
    quota: QuotaSpec,
    *,
    agent: str = AGENT,
    caller_key: str = CALLER_KEY,
    levels: bool = False,
    tls: TLSUpstream | None = None,
) -> dict[str, object]:
    """One gateway's YAML; `quota` None is quotas off (the tenant has no `limits`); `levels`
    adds the key's own limits and budgets at the tenant and key levels; `tls` points it at
    the HTTPS simulator instead, trusting its CA through `upstream.ca_file`."""
    key: dict[str, object] = {
        "name": "loadgen",
        "sha256": hashlib.sha256(caller_key.encode()).hexdigest(),
    }
    tenant: dict[str, object] = {"keys": [key], "agents": [agent]}
    if quota is not None:
        tenant["limits"] = dict(QUOTA_LIMITS)
    if levels:
        key.update(limits=dict(KEY_LIMITS), budget=dict(KEY_BUDGET))
        tenant["budget"] = dict(TENANT_BUDGET)
    return {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {
            "base_url": f"http://127.0.0.1:{sim_port}" if tls is None else tls.url,
            "api_key": "${BENCH_UPSTREAM_KEY}",
            **({} if tls is None else {"ca_file": str(tls.ca_file)}),
        },
        "agents": {agent: {}},
        "quota": dict(quota) if quota else {"backend": "memory"},
        "tenants": {TENANT: tenant},
        "logging": {"level": GATEWAY_LOG_LEVEL, "format": "json"},
    }


def simulator_config(chunk_interval: float) -> dict[str, object]:
    return {
        "agents": {AGENT: {"name": "Bench", "keys": [AGENT_KEY]}},
        "platform_keys": [PLATFORM_KEY],
        "rate_limit": {"per_minute": 100_000_000, "per_day": 1_000_000_000},
        "chunk_interval": chunk_interval,
    }


def target(
    name: str,
    port: int,
    key: str,
    proxy: Proc | None,
    *,
    streams: bool = True,
    helper: Proc | None = None,
    redis_port: int | None = None,
    upstream: Proc | None = None,
) -> Target:
    url = f"http://127.0.0.1:{port}/v1/agents/{AGENT}/chat"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return Target(
        name=name,
        call=Call(url, headers, json.dumps({"message": MESSAGE}).encode()),
        stream_call=Call(url, headers, json.dumps({"message": MESSAGE, "stream": True}).encode()),
        proxy=proxy,
        streams=streams,
        helper=helper,
        redis_port=redis_port,
        upstream=upstream,
    )


@dataclass(frozen=True, slots=True)
class Gateway:
    proc: Proc
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass(frozen=True, slots=True)
class TLSUpstream:
    """The simulator served over HTTPS, and the CA (made for the run) its certificate chains
    to."""

    proc: Proc
    port: int
    ca_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


class Stack:
    """Starts the simulator, the floor, Redis and gateways in one ProcessSet, on free ports."""

    def __init__(self, procs: ProcessSet, workdir: Path, prefix: str = "") -> None:
        self.procs = procs
        self.workdir = workdir
        self.prefix = prefix
        self.cli = executable("thinnest-gateway")
        self.simulator: Proc | None = None
        self.sim_port = 0
        self.tls: TLSUpstream | None = None

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def _name(self, name: str) -> str:
        return f"{self.prefix}{name}"

    async def start_simulator(self, chunk_interval: float = 0.0) -> Proc:
        (self.sim_port,) = free_ports(1)
        name = self._name("simulator")
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(simulator_config(chunk_interval), sort_keys=False))
        argv = [self.cli, "simulate", "--host", "127.0.0.1", "--port", str(self.sim_port)]
        self.simulator = await self.procs.start(name, [*argv, "--config", str(config)])
        await wait_ready(self.simulator, f"{self.sim_url}/healthz")
        return self.simulator

    async def start_tls_simulator(self) -> TLSUpstream:
        """A second simulator, like the first but over HTTPS (the real API is HTTPS), with a
        certificate from a CA made here (trustme's default: ECDSA P-256)."""
        (port,) = free_ports(1)
        name = self._name("simulator-tls")
        ca = trustme.CA(organization_name="thinnest-gateway benchmark CA")
        ca_file, cert, key = (self.workdir / f"{name}-{part}.pem" for part in ("ca", "cert", "key"))
        ca.cert_pem.write_to_path(str(ca_file))
        leaf = ca.issue_cert("127.0.0.1")
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        config = self.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(simulator_config(0.0), sort_keys=False))
        argv = [self.cli, "simulate", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--config", str(config), "--cert-file", str(cert), "--key-file", str(key)]
        proc = await self.procs.start(name, argv)
        trust = ssl.create_default_context(cafile=str(ca_file))
        await wait_ready(proc, f"https://127.0.0.1:{port}/healthz", trust=trust)
        self.tls = TLSUpstream(proc, port, ca_file)
        return self.tls

    async def start_redis(self, redis_server: str) -> tuple[Proc, int]:
        (port,) = free_ports(1)
        argv = [redis_server, "--port", str(port), "--save", "", "--appendonly", "no"]
        redis = await self.procs.start(self._name("redis"), [*argv, "--bind", "127.0.0.1"])
        await wait_redis(redis, port)
        return redis, port

    async def start_floor(self) -> tuple[Proc, int]:
        (port,) = free_ports(1)
        argv = [sys.executable, "-m", "bench.floor", "--port", str(port)]
        argv += ["--upstream", self.sim_url, "--key", PLATFORM_KEY]
        floor = await self.procs.start(self._name("floor"), argv, cwd=ROOT)
        # The floor has no health route by design: any HTTP answer means it is serving.
        await wait_ready(floor, f"http://127.0.0.1:{port}/", any_status=True)
        return floor, port

    async def start_gateways(
        self,
        quotas: Mapping[str, QuotaSpec],
        levels: frozenset[str] = frozenset(),
        over_tls: frozenset[str] = frozenset(),
        sections: Mapping[str, Mapping[str, object]] | None = None,
    ) -> dict[str, Gateway]:
        """Started together, then waited for: each imports its modules in parallel. Those
        named in `levels` get key limits and budgets too, those in `over_tls` the HTTPS
        simulator as upstream (`gateway_config`), those in `sections` the top-level YAML
        sections given there (e.g. `tracing`)."""
        started: dict[str, tuple[Proc, int, int]] = {}
        for name, quota in quotas.items():
            port, admin_port = free_ports(2)
            full = self._name(name)
            config = self.workdir / f"{full}.yaml"
            settings = gateway_config(
                self.sim_port,
                port,
                admin_port,
                quota,
                levels=name in levels,
                tls=self.tls if name in over_tls else None,
            )
            settings.update((sections or {}).get(name, {}))
            text = yaml.safe_dump(settings, sort_keys=False)
            config.write_text(text)
            proc = await self.procs.start(
                full,
                [self.cli, "serve", "--config", str(config)],
                env={"BENCH_UPSTREAM_KEY": PLATFORM_KEY},
            )
            started[name] = (proc, port, admin_port)
        gateways = {}
        for name, (proc, port, admin_port) in started.items():
            await wait_ready(proc, f"http://127.0.0.1:{port}/healthz")
            gateways[name] = Gateway(proc, port, admin_port)
        return gateways


def event_loop_of(log: Path) -> str:
    """The event loop a gateway said it runs on, from its `started` log line."""
    try:
        with log.open(errors="replace") as lines:
            for line in lines:
                if '"started"' in line and "event_loop" in line:
                    try:
                        return str(json.loads(line).get("event_loop", "unknown"))
                    except ValueError:
                        return "unknown"
    except OSError:
        pass
    return "unknown"


QUIET_LEVELS = frozenset({"debug", "info"})


def loud_lines(log: Path, limit: int | None = None) -> list[str]:
    """The warning and error lines of a log (JSON lines with another level, and non-JSON ones).

    Gateways log at info, one access line per request: those are not what a reader looks for.
    """
    found = []
    try:
        with log.open(errors="replace") as lines:
            for line in lines:
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if '"level": "info"' in line or '"level": "debug"' in line:
                    continue
                if line.startswith("{") and '"level"' in line:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        entry = None
                    if isinstance(entry, dict) and entry.get("level") in QUIET_LEVELS:
                        continue
                found.append(line)
                if limit is not None and len(found) >= limit:
                    break
    except OSError:
        pass
    return found


def count_lines(log: Path) -> int:
    try:
        with log.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
