"""The soak: thousands of mixed requests through one gateway, its RSS and open fds after each round.

A leak per request (a task, a buffer, a socket, a quota lease that is never freed) is too small
to see in one request's cost, but adds up: after N thousand requests it shows as memory or file
descriptors that keep growing once the gateway is idle again. Each sample is taken once the
gateway has settled (no request, stream or background drain left, per its own /metrics), so
what is counted is what stays behind, not work still under way.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp

from bench.load import Call
from bench.procs import Proc, ProcessFailed

Kind = Literal["json", "stream", "aborted"]
KINDS: tuple[Kind, ...] = ("json", "stream", "aborted")
SETTLE_GAUGES = ("gateway_active_streams", "gateway_stream_drains", "gateway_inflight_requests")
REQUEST_TIMEOUT = 30.0
MIB = 1024 * 1024
SETTLE_MARKER_TTL = 60.0
"""How long the memory quota backend keeps a request's settle marker (`settled_ttl` in
gateway/app.py; gateway/quota/memory.py caps their number): RSS may grow for this long."""


@dataclass(frozen=True, slots=True)
class SoakSettings:
    rounds: int = 10
    requests_per_round: int = 20_000
    warmup_requests: int = 2_000
    """One unmeasured round first: pools, caches and allocator arenas reach their size."""
    concurrency: int = 50
    seed: int = 20261124
    json_share: float = 0.4
    stream_share: float = 0.3
    """The rest (0.3) are streams the client abandons after a random number of events."""
    chunk_interval: float = 0.005
    """The soak simulator's pause between stream events."""
    settle_within: float = 60.0
    """Longest wait for the gateway to settle before a sample (its drain_timeout is 30 s)."""
    growth_limit: float = 0.05
    """Flat: RSS grew by less than this share of its starting value over the soak."""

    @property
    def total_requests(self) -> int:
        return self.rounds * self.requests_per_round

    @classmethod
    def sized(cls, total: int, rounds: int) -> SoakSettings:
        """`total` measured requests in `rounds` rounds (rounded up to whole rounds)."""
        per_round = -(-total // rounds)
        return cls(
            rounds=rounds, requests_per_round=per_round, warmup_requests=min(per_round, 2_000)
        )


@dataclass(frozen=True, slots=True)
class Planned:
    kind: Kind
    abort_after: int = -1
    """Aborted streams: events read before the client closes the connection (0: none)."""


@dataclass(frozen=True, slots=True)
class Sample:
    requests: int
    """Measured requests sent so far (the warm-up round not counted)."""
    rss_kib: int
    fds: int
    settle_seconds: float
    settled: bool
    round_seconds: float
    """Wall time of the round before this sample (the warm-up round's for the first)."""
    elapsed: float = 0.0
    """Seconds from the start of the measured rounds to this sample (0 for the warm-up's)."""

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


@dataclass(slots=True)
class Tally:
    """What the client saw, per kind of request."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    """By kind of error ("stream: HTTP 502", "aborted: ServerDisconnectedError", ...)."""
    examples: dict[str, str] = field(default_factory=dict)
    """The first message of each kind of error."""

    def status(self, kind: Kind, code: int) -> None:
        self.statuses.setdefault(kind, Counter())[code] += 1

    def error(self, kind: Kind, what: str, detail: str) -> None:
        key = f"{kind}: {what}"
        self.errors[key] += 1
        self.examples.setdefault(key, detail[:300])


@dataclass(frozen=True, slots=True)
class SoakResult:
    settings: SoakSettings
    samples: list[Sample]
    tally: Tally
    gateway_codes: dict[str, int]
    """The gateway's own gateway_requests_total by code, over the measured rounds."""
    gateway_disconnects: int
    """Its gateway_client_disconnects_total over the measured rounds."""
    events_per_stream: int
    started: str
    """UTC date and time."""
    seconds: float
    log_lines: list[str]
    """The soak gateway's warning and error lines (its access lines at info left out)."""
    stopped_early: bool = False
    """The run's time budget ran out before every planned round was sent."""
    log_total: int = 0
    """Every line the soak gateway logged, access lines included."""

    @property
    def requests(self) -> int:
        """Measured requests sent."""
        return self.samples[-1].requests

    @property
    def rate(self) -> float:
        """Measured requests per second of round time (settling between rounds left out)."""
        busy = sum(sample.round_seconds for sample in self.samples[1:])
        return self.requests / busy if busy else 0.0

    @property
    def steady(self) -> list[Sample]:
        """The samples taken once the settle markers stopped accumulating (after their TTL).

        Every sample if fewer than three were taken that late: then the soak was too short.
        """
        late = [s for s in self.samples[1:] if s.elapsed >= SETTLE_MARKER_TTL]
        return late if len(late) >= 3 else self.samples

    @property
    def errors(self) -> int:
        return sum(self.tally.errors.values())

    @property
    def slope_mib_per_1k(self) -> float:
        """Least-squares RSS growth, MiB per 1,000 requests, over the steady samples."""
        xs = [s.requests / 1000 for s in self.steady]
        ys = [s.rss_mib for s in self.steady]
        return least_squares_slope(xs, ys)

    @property
    def slope_all_mib_per_1k(self) -> float:
        """The same over every sample, the first minute's included."""
        xs = [s.requests / 1000 for s in self.samples]
        ys = [s.rss_mib for s in self.samples]
        return least_squares_slope(xs, ys)

    @property
    def growth_mib(self) -> float:
        """RSS growth over the steady samples."""
        return self.steady[-1].rss_mib - self.steady[0].rss_mib

    @property
    def flat(self) -> bool:
        first, last = self.steady[0], self.steady[-1]
        return (
            self.growth_mib < self.settings.growth_limit * first.rss_mib
            and last.fds <= self.samples[0].fds + self.settings.concurrency
        )

    @property
    def verdict(self) -> str:
        first, last = self.steady[0], self.steady[-1]
        since = (
            f"from {first.requests:,} requests ({first.elapsed:.0f} s in) to {last.requests:,}"
            if first is not self.samples[0]
            else f"over {last.requests:,} requests"
        )
        figures = (
            f"RSS {first.rss_mib:.1f} → {last.rss_mib:.1f} MiB "
            f"({self.growth_mib:+.2f} MiB, {self.growth_mib / first.rss_mib:+.1%}; "
            f"fitted {self.slope_mib_per_1k:+.3f} MiB per 1,000 requests) {since}, "
            f"fds {self.samples[0].fds} → {self.samples[-1].fds}"
        )
        unsettled = sum(not s.settled for s in self.samples)
        note = f"; {unsettled} sample(s) taken before the gateway settled" if unsettled else ""
        return ("flat: " if self.flat else "GROWING: ") + figures + note


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def plan(settings: SoakSettings, count: int, events: int, rng: random.Random) -> list[Planned]:
    """`count` requests in a seeded random mix; aborted streams stop before the done event."""
    planned = []
    for _ in range(count):
        draw = rng.random()
        if draw < settings.json_share:
            planned.append(Planned("json"))
        elif draw < settings.json_share + settings.stream_share:
            planned.append(Planned("stream"))
        else:
            planned.append(Planned("aborted", rng.randint(0, max(events - 1, 0))))
    return planned


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessFailed(f"pid {pid}: no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric_sums(text: str, names: Sequence[str]) -> dict[str, float]:
    """Each named metric's samples summed over their labels, from Prometheus text format."""
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


async def settle_gauges(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """SETTLE_GAUGES from a gateway's /metrics, each summed over its labels."""
    async with session.get(metrics_url) as response:
        response.raise_for_status()
        return metric_sums(await response.text(), SETTLE_GAUGES)


def codes_by_label(text: str, metric: str) -> Counter[str]:
    """`metric`'s samples summed by their `code` label."""
    codes: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, _, value = line[len(metric) + 1 :].rpartition("} ")
            for pair in labels.split(","):
                key, _, quoted = pair.partition("=")
                if key == "code":
                    codes[quoted.strip('"')] += int(float(value))
    return codes


async def _one(
    session: aiohttp.ClientSession, calls: Mapping[Kind, Call], job: Planned, tally: Tally
) -> None:
    call = calls[job.kind]
    tally.sent[job.kind] += 1
    try:
        async with session.post(call.url, data=call.body, headers=call.headers) as response:
            tally.status(job.kind, response.status)
            if response.status != 200:
                body = (await response.read())[:200].decode(errors="replace")
                tally.error(job.kind, f"HTTP {response.status}", body)
                return
            if job.kind == "json":
                body = (await response.read()).decode(errors="replace")
                if '"response"' not in body:
                    tally.error(job.kind, "no response field", body)
                return
            if job.kind == "aborted" and job.abort_after == 0:
                response.close()
                return
            seen, pending, last = 0, b"", b""
            async for chunk in response.content.iter_any():
                *complete, pending = (pending + chunk).split(b"\n\n")
                if complete:
                    seen += len(complete)
                    last = complete[-1]
                if job.kind == "aborted" and seen >= job.abort_after:
                    # Leave mid-stream: the connection is closed, not returned to the pool.
                    response.close()
                    return
            if b'"type": "done"' not in last and job.kind == "stream":
                tally.error(job.kind, "stream ended without done", repr(last[:200]))
            elif job.kind == "aborted":
                tally.error(job.kind, "stream ended before the abort point", repr(last[:200]))
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(job.kind, type(exc).__name__, f"{type(exc).__name__}: {exc}")


async def probe_events(session: aiohttp.ClientSession, call: Call) -> int:
    """Events in one complete stream (the done event included); fails if the stream does."""
    async with session.post(call.url, data=call.body, headers=call.headers) as response:
        body = await response.read()
        if response.status != 200 or b'"type": "done"' not in body:
            text = body[:300].decode(errors="replace")
            raise RuntimeError(f"soak: probe stream answered {response.status}: {text}")
        return body.count(b"\n\n")


class Soak:
    def __init__(
        self,
        gateway: Proc,
        others: Sequence[Proc],
        calls: Mapping[Kind, Call],
        admin_url: str,
        settings: SoakSettings,
        say: Callable[[str], None],
    ) -> None:
        self.gateway = gateway
        self.others = list(others)
        self.calls = calls
        self.metrics_url = f"{admin_url}/metrics"
        self.settings = settings
        self.say = say
        self._measured_from = 0.0

    def _check_alive(self) -> None:
        for proc in (self.gateway, *self.others):
            proc.check_alive()

    async def _scrape(self, admin: aiohttp.ClientSession) -> str:
        async with admin.get(self.metrics_url) as response:
            response.raise_for_status()
            return await response.text()

    async def _sample(
        self, admin: aiohttp.ClientSession, requests: int, round_seconds: float
    ) -> Sample:
        """Once the gateway has settled (two readings of 0 in a row): its RSS and open fds."""
        started = time.monotonic()
        settled = False
        zeros = 0
        while time.monotonic() - started < self.settings.settle_within:
            self._check_alive()
            busy = sum(metric_sums(await self._scrape(admin), SETTLE_GAUGES).values())
            zeros = zeros + 1 if busy == 0 else 0
            if zeros >= 2:
                settled = True
                break
            await asyncio.sleep(0.1)
        pid = self.gateway.pid
        return Sample(
            requests,
            rss_kib(pid),
            open_fds(pid),
            time.monotonic() - started,
            settled,
            round_seconds,
            elapsed=time.monotonic() - self._measured_from if self._measured_from else 0.0,
        )

    async def _round(
        self, session: aiohttp.ClientSession, jobs: Sequence[Planned], tally: Tally
    ) -> float:
        gate = asyncio.Semaphore(self.settings.concurrency)

        async def bounded(job: Planned) -> None:
            async with gate:
                await _one(session, self.calls, job, tally)

        started = time.monotonic()
        await asyncio.gather(*(bounded(job) for job in jobs))
        return time.monotonic() - started

    async def run(self, started: str, deadline: float | None = None) -> SoakResult:
        """The warm-up, then the rounds; no new round starts after `deadline` (monotonic)."""
        s = self.settings
        clock = time.monotonic()
        rng = random.Random(s.seed)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=s.concurrency)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as admin,
        ):
            events = await probe_events(session, self.calls["stream"])
            warmup = Tally()
            seconds = await self._round(session, plan(s, s.warmup_requests, events, rng), warmup)
            if warmup.errors:
                first = next(iter(warmup.examples.items()))
                self.say(f"soak warm-up: {sum(warmup.errors.values())} errors (first: {first})")
            samples = [await self._sample(admin, 0, seconds)]
            before = await self._scrape(admin)
            self._say_sample("warm-up", samples[-1])
            tally = Tally()
            self._measured_from = time.monotonic()
            stopped_early = False
            for round_no in range(s.rounds):
                # The first round always runs; each later one takes about as long as the last.
                expected = samples[-1].round_seconds + samples[-1].settle_seconds
                if deadline is not None and round_no and time.monotonic() + expected > deadline:
                    stopped_early = True
                    self.say(f"soak: out of time after {round_no} of {s.rounds} rounds")
                    break
                jobs = plan(s, s.requests_per_round, events, rng)
                seconds = await self._round(session, jobs, tally)
                done = (round_no + 1) * s.requests_per_round
                samples.append(await self._sample(admin, done, seconds))
                self._say_sample(f"round {round_no + 1}/{s.rounds}", samples[-1], tally)
            after = await self._scrape(admin)
        codes = codes_by_label(after, "gateway_requests_total")
        codes.subtract(codes_by_label(before, "gateway_requests_total"))
        disconnects = metric_sums(after, ["gateway_client_disconnects_total"])
        disconnects_before = metric_sums(before, ["gateway_client_disconnects_total"])
        return SoakResult(
            settings=s,
            samples=samples,
            tally=tally,
            gateway_codes={code: n for code, n in sorted(codes.items()) if n},
            gateway_disconnects=int(
                disconnects["gateway_client_disconnects_total"]
                - disconnects_before["gateway_client_disconnects_total"]
            ),
            events_per_stream=events,
            started=started,
            seconds=time.monotonic() - clock,
            log_lines=[],
            stopped_early=stopped_early,
        )

    def _say_sample(self, label: str, sample: Sample, tally: Tally | None = None) -> None:
        errors = f"  errors so far {sum(tally.errors.values())}" if tally is not None else ""
        self.say(
            f"soak {label:11}: {sample.requests:7,} req {sample.elapsed:5.0f} s in  "
            f"round {sample.round_seconds:5.1f} s  RSS {sample.rss_mib:6.1f} MiB  "
            f"fds {sample.fds:4}  settled in {sample.settle_seconds:.1f} s"
            + ("" if sample.settled else " (NOT settled)")
            + errors
        )
