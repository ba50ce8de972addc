"""Token buckets in Redis, shared by every replica: one Lua call per decision.

Every key of a tenant carries the hash tag `{tenant}`, so one script touches one slot and runs
unchanged on Redis Cluster. The scripts are package files, registered once and called by
EVALSHA; a call the server answers NOSCRIPT (a restart, SCRIPT FLUSH) is sent again with the
script's source, which loads it again.
Each call is bounded by the budget (`quota.timeout_ms`) of what Redis takes, not of what the
event loop takes: see `redis_time`. Retries and the circuit breaker are the service's business.

On a single server (or Sentinel's master) script calls go out in batches over a connection of
their own (`_Pipelined`): under load most admissions and settlements share a round trip and a
socket write, and none pays for redis-py's pool checkout, Pipeline object or argument packing in
Python, which were most of its cost per call. Each caller still awaits its own reply, so nothing
is deferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.quota.calendar import Moment
from gateway.quota.connect import MAX_CONNECTIONS
from gateway.quota.model import (
    Backend,
    Charge,
    Crossing,
    Decision,
    Settled,
    Snapshot,
    UsageRow,
)
from gateway.quota.plan import BucketSpec, Plan, worst_wait

RedisClient = Redis | RedisCluster


def _script(name: str) -> str:
    package = resources.files("gateway.quota")
    return package.joinpath("buckets.lua").read_text() + package.joinpath(name).read_text()


LOOP_LAG = 0.2
"""A deadline check this late (as a fraction of the budget) means the event loop was too busy to
read a reply in time, which is no sign of Redis being slow: the call gets another budget."""
BUSY_LOOP_CAP = 2.0
"""Seconds after which a call fails however busy the event loop has been."""


def bucket_key(tenant: str, key: str) -> str:
    return f"tg:{{{tenant}}}:{key}"


LEDGER = "u:"
"""A ledger day's key after the tenant's tag: `tg:{acme}:u:2026-11-28`."""
LONGEST_MS = {"day": 25 * 3_600_000, "month": 31 * 86_400_000}
"""A period's longest length (a DST day, a 31-day month): a budget in debt for more than one
period is kept that much longer per period, never less (an expired budget is a full one)."""


def _group(spec: BucketSpec, at: Moment, amount: int) -> tuple[int | str, ...]:
    """One bucket's arguments, as buckets.lua reads them: whole numbers (a float costs a
    hiredis pack several times an int's, and a request packs dozens)."""
    period = spec.period
    if period is None:
        return (spec.capacity, spec.refill, spec.window, -1, amount)
    return (
        spec.capacity,
        spec.refill,
        spec.window,
        at.index(period),
        amount,
        math.ceil(at.until(period) * 1000),
        LONGEST_MS[period],
        spec.warns,
    )


def _crossings(plan_buckets: Sequence[BucketSpec], raw: Sequence[Any]) -> tuple[Crossing, ...]:
    """'i:j' (bucket i's j-th warn_at fraction, from 1) as the scripts report them."""
    crossed = []
    for item in raw:
        i, _, j = (item.decode() if isinstance(item, bytes) else str(item)).partition(":")
        spec = plan_buckets[int(i) - 1]
        crossed.append(Crossing(spec, spec.warn_at[int(j) - 1]))
    return tuple(crossed)


class RedisStore:
    def __init__(
        self,
        client: RedisClient,
        *,
        budget: float,
        lease_ttl: float,
        settled_ttl: float,
        max_in_flight: int | None = None,
        retention_days: int = 400,
    ) -> None:
        self._client = client
        self._budget = budget
        self._ledger_ttl_ms = retention_days * 86_400_000
        self._lease_ttl_ms = math.ceil(lease_ttl * 1000)
        self._settled_ttl_ms = math.ceil(settled_ttl * 1000)
        # The cluster client fails at once when a node's connections run out; waiting for a
        # free one (within the caller's budget) is what the single-node BlockingConnectionPool
        # does, so the cluster gets the same behaviour here.
        self._limit = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._scripts = {
            name: client.register_script(_script(f"{name}.lua"))
            for name in ("reserve", "settle", "refund", "release", "renew", "usage")
        }
        self._pipelined = _Pipelined(client, budget) if isinstance(client, Redis) else None

    @property
    def name(self) -> Backend:
        return "redis"

    @property
    def client(self) -> RedisClient:
        return self._client

    async def prepare(self) -> None:
        """Load the scripts (on every primary of a cluster) before the first request needs them."""
        for script in self._scripts.values():
            await self._client.script_load(script.script)
        # Open the whole pool now: connecting inside the 50 ms admission budget, as a cold
        # burst of requests otherwise must, blows the budget and opens the breaker (measured:
        # 134 of 200 admitted against a 50-request bucket on two replicas). One connection at
        # a time: a burst of connects would itself overrun the socket timeouts.
        if self._pipelined is not None:
            await self._pipelined.connect()
        if isinstance(self._client, Redis):
            pool = self._client.connection_pool
            opened = [
                await pool.get_connection()  # type: ignore[no-untyped-call]  # redis-py stubs
                for _ in range(MAX_CONNECTIONS)
            ]
            for connection in opened:
                await pool.release(connection)
        else:
            for node in self._client.get_primaries():
                warm = [node.acquire_connection() for _ in range(MAX_CONNECTIONS)]
                for connection in warm:
                    await connection.connect()  # type: ignore[no-untyped-call]  # redis-py stubs
                for connection in warm:
                    node.release(connection)

    async def reserve(
        self, tenant: str, plan: Plan, tokens: int, lease: str | None, at: Moment
    ) -> Decision:
        n = len(plan.buckets)
        keys = [bucket_key(tenant, b.key) for b in plan.buckets]
        keys += [bucket_key(tenant, cap.key) for cap in plan.streams]
        args: list[int | str] = [n, lease or "", len(plan.streams), self._lease_ttl_ms]
        for b in plan.buckets:
            args += _group(b, at, b.cost(tokens))
        args += [cap.limit for cap in plan.streams]
        reply = await self._run("reserve", keys, args)
        allowed, refused_by = int(reply[0]), int(reply[1])
        levels = tuple(float(x) for x in reply[2 : 2 + n])
        if allowed:
            return Decision(True, None, 0.0, levels, _crossings(plan.buckets, reply[2 + n :]))
        if refused_by < 0:
            return Decision(False, plan.streams[-refused_by - 1].name, 0.0, levels)
        name, wait = worst_wait(plan, levels, tokens, at)
        return Decision(False, name, wait, levels)

    async def settle(
        self,
        tenant: str,
        plan: Plan,
        settle_key: str,
        delta: int,
        actual: int,
        at: Moment,
        charge: Charge | None,
    ) -> Settled | None:
        buckets = plan.token_buckets
        keys = [bucket_key(tenant, b.key) for b in buckets]
        keys += [bucket_key(tenant, f"settled:{settle_key}"), bucket_key(tenant, LEDGER + at.date)]
        charge = charge or Charge("", "")
        args: list[int | str] = [len(buckets), delta, actual, self._settled_ttl_ms]
        args += [charge.field(), charge.tokens_input, charge.tokens_output]
        args += [charge.tokens_estimated, self._ledger_ttl_ms]
        for b in buckets:
            args += _group(b, at, 0)
        reply = await self._run("settle", keys, args)
        if not int(reply[0]):
            return None
        moved = int(reply[1])
        levels = tuple(float(x) for x in reply[2 : 2 + moved])
        return Settled(levels, _crossings(buckets, reply[2 + moved :]))

    async def refund(
        self,
        tenant: str,
        plan: Plan,
        settle_key: str,
        tokens: int,
        lease: str | None,
        at: Moment,
    ) -> bool:
        keys = [bucket_key(tenant, b.key) for b in plan.buckets]
        keys.append(bucket_key(tenant, f"settled:{settle_key}"))
        keys += [bucket_key(tenant, cap.key) for cap in plan.streams]
        args: list[int | str] = [len(plan.buckets), lease or "", self._settled_ttl_ms]
        for b in plan.buckets:
            args += _group(b, at, b.cost(tokens))
        return bool(int(await self._run("refund", keys, args)))

    async def release(self, tenant: str, lease: str, sets: Sequence[str]) -> None:
        # A script like every other call, so it takes the same connection (and the same
        # recovery after a Redis restart) as the reserve that took the lease.
        await self._run("release", [bucket_key(tenant, s) for s in sets], [lease])

    async def renew(self, tenant: str, sets: Sequence[str], leases: Sequence[str]) -> None:
        keys = [bucket_key(tenant, s) for s in sets]
        await self._run("renew", keys, [self._lease_ttl_ms, *leases])

    async def usage(self, tenant: str, plan: Plan, at: Moment) -> Snapshot:
        n = len(plan.buckets)
        keys = [bucket_key(tenant, b.key) for b in plan.buckets]
        keys.append(bucket_key(tenant, LEDGER + at.date))
        keys += [bucket_key(tenant, cap.key) for cap in plan.streams]
        args: list[int | str] = [n]
        for b in plan.buckets:
            args += _group(b, at, 0)
        reply = await self._run("usage", keys, args)
        return Snapshot(
            tuple(float(x) for x in reply[1 : 1 + n]),
            tuple(int(x) for x in reply[1 + n :]),
            int(reply[0]),
        )

    async def ledger(self, first: str, last: str) -> list[UsageRow]:
        """Found by SCAN (on every primary of a cluster): a ledger day of a tenant since
        removed from the configuration is still charged for. A report, not the request path:
        not bounded by the admission budget, each command by the client's own timeout."""
        try:
            return await self._ledger(first, last)
        except RedisConnectionError:
            # A pooled connection a Redis restart closed: the client does not retry (the
            # request path must not), a report may, once, over a fresh connection.
            return await self._ledger(first, last)

    async def _ledger(self, first: str, last: str) -> list[UsageRow]:
        rows: list[UsageRow] = []
        async for raw in self._client.scan_iter(match=f"tg:{{*}}:{LEDGER}*", count=1000):
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            tenant = name[name.index("{") + 1 : name.index("}")]
            day = name.rpartition(":")[2]
            if first <= day <= last:
                fields = await self._client.hgetall(name)
                rows += _rows(day, tenant, fields)
        return rows

    async def aclose(self) -> None:
        if self._pipelined is not None:
            await self._pipelined.aclose()
        # redis-py closes each pooled socket within the connect timeout (the budget, 50 ms)
        # and raises when one overruns, as many at once can on a busy machine: at exit a
        # socket that closes late is no failure of ours.
        with contextlib.suppress(RedisTimeoutError):
            await self._client.aclose()

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        if self._pipelined is not None:
            return await self._pipelined.call(self._scripts[script], keys, args)
        async with redis_time(self._budget):
            if self._limit is None:
                return await self._scripts[script](keys=keys, args=args)
            async with self._limit:
                return await self._scripts[script](keys=keys, args=args)


@contextlib.asynccontextmanager
async def redis_time(budget: float) -> AsyncIterator[None]:
    """Cancel the body (TimeoutError) once Redis has had `budget` seconds to answer.

    A plain timeout also counts the event loop's own delays: in a burst of requests one turn
    of the loop can outlast the budget while Redis answered in a millisecond, its reply
    waiting unread in the socket, and the breaker opened on a healthy Redis. So the deadline
    is a check, and its verdict waits one more turn of the loop (a reply already here is read
    first); a check that runs late by more than LOOP_LAG of the budget shows the loop was
    busy (and an event loop that runs timers before reading sockets, as libuv's does, has not
    read the reply yet): the call gets another budget. An idle loop runs the check on time, so
    a hung or dead Redis still fails after one budget; only while the loop stays busy can a
    call wait longer, up to BUSY_LOOP_CAP.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as timeout:
        deadline = _Deadline(loop, timeout, budget)
        try:
            yield
        finally:
            deadline.cancel()


class _Deadline:
    """One call's deadline check (see `redis_time`), armed again while the loop runs it late."""

    __slots__ = ("_budget", "_give_up", "_handle", "_loop", "_timeout")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: asyncio.Timeout, budget: float
    ) -> None:
        self._loop, self._timeout, self._budget = loop, timeout, budget
        now = loop.time()
        self._give_up = now + max(budget, BUSY_LOOP_CAP)
        self._handle = loop.call_at(now + budget, self._check, now + budget)

    def _check(self, due: float) -> None:
        now = self._loop.time()
        if now - due > self._budget * LOOP_LAG and now < self._give_up:
            self._handle = self._loop.call_at(now + self._budget, self._check, now + self._budget)
        else:
            # Through the loop (call_soon), so a reply that has arrived is read first.
            self._timeout.reschedule(now)

    def cancel(self) -> None:
        self._handle.cancel()


_Call = tuple[AsyncScript, Sequence[str], Sequence[int | str], "asyncio.Future[Any]", bool]
"""A script, its keys and arguments, its caller's reply, and whether to send the source (EVAL:
the server lost its script cache) rather than the hash (EVALSHA)."""


class _Pipelined:
    """Script calls over one connection of their own, sent in batches.

    The calls made in one turn of the event loop leave together, and so do all the calls made
    while a batch is on the wire: under load most admissions and settlements share a round
    trip and a socket write. Per batch this costs a hiredis pack (C) and the reads of the
    replies, nothing else: no pool checkout, no Pipeline object, no per-call timers (one
    timer bounds the batch, from its write to its last reply: `redis_time`). A connection that
    fails or overruns is dropped and the next batch opens a new one; a caller's wait in the
    queue behind a batch on the wire is not Redis's time, and does not count.
    """

    def __init__(self, client: Redis, budget: float) -> None:
        pool = client.connection_pool
        # The pool's settings (address, password, TLS, Sentinel's master lookup) for our own
        # connection, without its socket timeouts: they would arm timers on every read.
        self._connection = pool.make_connection()  # type: ignore[no-untyped-call]
        self._budget = budget
        self._connection.socket_timeout = None
        self._pending: list[_Call] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def call(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[int | str]
    ) -> asyncio.Future[Any]:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys, args, reply, False))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        self._wake.set()
        return reply

    async def connect(self) -> None:
        """At start-up, so the first request does not pay for connecting within its budget."""
        await self._connection.connect()

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            await self._send(batch)

    async def _send(self, batch: list[_Call]) -> None:
        connection = self._connection
        replies: list[Any] = []
        try:
            async with redis_time(self._budget):
                if not connection.is_connected:
                    # connect(), not send's own reconnect: under Sentinel, connect() is what
                    # asks the sentinels where the master is now.
                    await connection.connect()
                await connection.send_packed_command(
                    b"".join(
                        _packed(script, keys, args, source)
                        for script, keys, args, _, source in batch
                    ),
                    check_health=False,
                )
                for _ in batch:
                    try:
                        replies.append(await connection.read_response())
                    except ResponseError as error:  # this call's own answer (NOSCRIPT, ...)
                        replies.append(error)
        except BaseException as exc:
            # Part of a reply may still be on the wire: this connection cannot be reused.
            await connection.disconnect(nowait=True)
            if not isinstance(exc, Exception):  # cancelled: the store is closing
                _fail(batch, ConnectionError("the quota store is closing"))
                raise
            _fail(batch, exc)
            return
        for (script, keys, args, reply, source), result in zip(batch, replies, strict=True):
            if reply.done():
                continue  # its caller gave up (budget): nobody is waiting
            if isinstance(result, NoScriptError) and not source:
                # A restarted or flushed server: sent again with the script's source, which
                # loads it for everyone after.
                self._pending.append((script, keys, args, reply, True))
                self._wake.set()
            elif isinstance(result, Exception):
                reply.set_exception(result)
            else:
                reply.set_result(result)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        _fail(self._pending, ConnectionError("the quota store is closing"))
        await self._connection.disconnect()


_LEDGER_FIELDS = {
    "r": "requests",
    "i": "tokens_input",
    "o": "tokens_output",
    "t": "tokens_total",
    "e": "tokens_estimated",
}


def _rows(day: str, tenant: str, fields: dict[Any, Any]) -> list[UsageRow]:
    """One ledger hash ('<key>|<agent>|<r i o t e>' → count) as rows, one per key and agent."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for raw_field, value in fields.items():
        field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        key, agent, what = field.split("|")
        counts.setdefault((key, agent), {})[_LEDGER_FIELDS[what]] = int(value)
    return [
        UsageRow(day, tenant, key, agent, **numbers) for (key, agent), numbers in counts.items()
    ]


def _packed(
    script: AsyncScript, keys: Sequence[str], args: Sequence[int | str], source: bool
) -> bytes:
    command = ("EVAL", script.script) if source else ("EVALSHA", script.sha)
    # hiredis's stub says a 1-tuple; it takes a command of any length.
    return hiredis.pack_command((*command, len(keys), *keys, *args))  # type: ignore[arg-type,no-any-return]


def _fail(batch: list[_Call], exc: Exception) -> None:
    """The connection failed: every caller of the batch learns it."""
    for _, _, _, reply, _ in batch:
        if not reply.done():
            reply.set_exception(exc)
