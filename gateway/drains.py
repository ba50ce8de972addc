"""Exchanges whose caller left, finished in the background so they are still charged exactly.

Once a request's body has gone upstream, upstream does the work whether or not the caller
waits for it. So an admission whose caller leaves is handed here (`take`): a drain reads
upstream's answer on, JSON or stream, to its end or its `done` event, and settles it by the
admission's rule table. Drains are bounded in time (`quota.drain_timeout`), in bytes read
(`quota.drain_max_bytes`; a JSON answer by `limits.max_answer_bytes`, one event by
`limits.max_event_bytes`), in number (`quota.max_drains`) and per tenant (an eighth of them),
so one tenant abandoning streams by the thousand cannot crowd out another's; an exchange that
finds no drain, or that a drain gives up on, is charged at least its reservation (admission.py).
Drains are background work: together they frame for at most a few ms of each turn of the
event loop (a `Pacer` of their own, gateway/pacing.py), so the callers' requests, /healthz
included, are answered promptly however many drains read fast endless streams.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import structlog

from gateway.errors import GatewayError
from gateway.pacing import Pacer

if TYPE_CHECKING:
    from gateway.admission import Admission

log = structlog.get_logger("gateway.drains")

TENANT_SHARE = 8  # a tenant may hold at most 1/TENANT_SHARE of the drains
UPSTREAM_BROKE = (aiohttp.ClientError, GatewayError)
"""How reading on can fail on upstream's side: the answer broke off, or the call itself failed
(one that never reached upstream is a GatewayError that says so)."""


class Drains:
    def __init__(self, timeout: float, limit: int, max_bytes: int) -> None:
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._pacer = Pacer()
        self._limit = limit
        self.per_tenant = max(1, limit // TENANT_SHARE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading: dict[str, int] = {}  # tenant -> drains reading for it
        self._readers = 0
        self.started = 0
        self._finished = 0
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        """Drains reading an answer or settling it now (`gateway_stream_drains`)."""
        return self._readers

    def take(self, admission: Admission, error: BaseException | None) -> None:
        """Finish `admission`, whose caller is gone, in the background. Never awaits: the
        handler calling this may be in the middle of being cancelled."""
        tenant = admission.reservation.tenant
        read = (
            admission.sent
            and not admission.complete
            and self._readers < self._limit
            and self._reading.get(tenant, 0) < self.per_tenant
        )
        if read:
            self._readers += 1
            self._reading[tenant] = self._reading.get(tenant, 0) + 1
        task = asyncio.create_task(self._finish(admission, error if not read else None, read))
        self.started += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, admission: Admission, error: BaseException | None, read: bool) -> None:
        cancelled = False
        if read:
            tenant = admission.reservation.tenant
            try:
                async with asyncio.timeout(self._timeout):
                    if not await admission.read_on(self._max_bytes, self._pacer.turn):
                        admission.abandoned = True  # the drain's bound in bytes
            except TimeoutError:  # the drain's bound in time
                admission.abandoned = True
            except UPSTREAM_BROKE as exc:
                error = exc
            except asyncio.CancelledError:  # shutdown: settle what was seen
                admission.abandoned = cancelled = True
        elif admission.sent and not admission.complete:
            admission.abandoned = True  # no drain free: not read at all
        try:
            tokens = await asyncio.shield(admission.settle(error))
        finally:
            if read:
                # Counted until settled, not only while reading: a drain at 0 on /metrics
                # means its charge is in the buckets and the ledger.
                self._readers -= 1
                self._reading[tenant] -= 1
                if not self._reading[tenant]:
                    del self._reading[tenant]
            async with self._changed:
                self._finished += 1
                self._changed.notify_all()
        record = admission.record
        log.info(
            "drain finished",
            request_id=record.request_id,
            tenant=admission.reservation.tenant,
            key_name=record.key_name,
            agent=record.agent,
            complete=admission.complete,
            tokens_charged=tokens,
            tokens_estimated=record.tokens_estimated,
        )
        if cancelled:
            raise asyncio.CancelledError

    async def wait_finished(self, count: int) -> None:
        """Until `count` abandoned exchanges have settled since start-up."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._finished >= count)

    async def close(self) -> None:
        """At shutdown: stop reading and settle what each drain has seen."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
