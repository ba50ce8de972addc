"""One admitted request's quota, from its reservation to its one settlement.

Token cost is known only afterwards, so a request first reserves (one request and an estimate of
its tokens from every bucket, and a stream lease when it asks for a stream) and settles when it
is over. `Admission` owns that, and nothing else in the gateway settles, refunds or releases:
the handler only tells it what happened (the body went upstream, upstream answered, what the
answer said it cost, what text went by, the caller left), and on leaving its `async with` block
it applies the rule table, once, whatever the exit:

    how the request ended                             tokens charged
    ────────────────────────────────────────────────  ──────────────────────────────────────────
    never reached upstream (breaker open, no          none, and the request itself is refunded
      connection, upstream key's own limit)
    upstream reported its usage                       what upstream reported
    upstream answered an error status                 0 (the request still counts)
    answered without usage, or broke off / timed out  input estimate + text seen / 4
      (an answer or event over limits.max_*_bytes
      counts as broken off)
    caller gone and the drain could not finish        max(reservation, input estimate + seen / 4)
      (quota.drain_timeout or drain_max_bytes hit)

A caller that leaves once the body has gone upstream does not end the exchange: the admission
is handed to a drain (drains.py) that reads the answer on, JSON or stream, and settles by the
same table; its log line is then the one that carries the tokens charged.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from types import TracebackType

import structlog
from aiohttp import ClientResponse, web

from gateway.config import Limits
from gateway.errors import GatewayError, RateLimited
from gateway.logs import AccessRecord
from gateway.metrics import Metrics
from gateway.pacing import SLICE
from gateway.quota import (
    CONCURRENT_STREAMS,
    BucketState,
    Charge,
    QuotaService,
    Reservation,
    is_token_bucket,
)
from gateway.relay import EventRelay
from gateway.sessions import SessionScope, parse_answer
from gateway.state import DRAINS, LIMITS
from gateway.tracing import NO_TRACE, RequestTrace
from gateway.upstream import next_chunk, read_whole
from gateway.usage import StreamTally, Usage, usage_from

log = structlog.get_logger("gateway.admission")

CHARS_PER_TOKEN = 4
EVENT_STREAM = "text/event-stream"


def estimate_tokens(text_chars: int) -> int:
    return math.ceil(text_chars / CHARS_PER_TOKEN)


class Admission:
    """Entered once the tenant's buckets allowed the request; settles exactly once."""

    __slots__ = (
        "_body_chars",
        "_body_read",
        "_body_usage",
        "_done",
        "_metrics",
        "_quota",
        "_request",
        "abandoned",
        "gone",
        "input_tokens",
        "limits",
        "pending",
        "record",
        "relay",
        "reservation",
        "response",
        "sent",
        "sessions",
        "status",
        "trace",
        "upstream_slot",
    )

    def __init__(
        self,
        request: web.Request,
        quota: QuotaService,
        reservation: Reservation,
        record: AccessRecord,
        metrics: Metrics,
        *,
        input_tokens: int,
        sessions: SessionScope,
        trace: RequestTrace = NO_TRACE,
        limits: Limits,
    ) -> None:
        self._request = request
        self._quota = quota
        self._metrics = metrics
        self.reservation = reservation
        self.record = record
        self.input_tokens = input_tokens
        self.sessions = sessions
        self.trace = trace  # told of the settlement (gateway/tracing.py)
        self.limits = limits  # how much of upstream's answer may be held (limits.max_*_bytes)
        self.upstream_slot: Reservation | None = None  # from the upstream key's own limit
        self.sent = False  # the body was handed to upstream
        self.pending: asyncio.Future[ClientResponse] | None = None  # upstream's answer to come
        self.response: ClientResponse | None = None
        self.status: int | None = None
        self.relay: EventRelay | None = None  # once upstream answers with a stream
        # A JSON answer, once read whole (a stream's figures are its relay's tally).
        self._body_usage: Usage | None = None
        self._body_chars = 0
        self._body_read = False
        self.gone = False  # the caller left (or stopped reading) before the end
        self.abandoned = False  # ...and the answer could not be read to its end
        self._done = False  # settled, or handed to a drain

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if isinstance(error, asyncio.CancelledError):
            # aiohttp cancels the handler when its caller disconnects.
            self.gone = True
        if self.gone:
            # Nothing may be awaited under a cancellation: a drain task finishes the rest.
            self._done = True
            self._request.app[DRAINS].take(self, error)
            return
        await self.settle(error)

    # --- what the handler reports -------------------------------------------------------

    async def send(self, sending: Awaitable[ClientResponse]) -> ClientResponse:
        """Hand the body to upstream. The call goes on if the caller leaves meanwhile: upstream
        is already working, and the drain that takes over reads its answer."""
        self.sent = True
        pending = self.pending = asyncio.ensure_future(sending)
        response = await asyncio.shield(pending)
        self.pending = None
        self.answered(response)
        return response

    def answered(self, response: ClientResponse) -> None:
        self.response, self.status = response, response.status
        if response.content_type == EVENT_STREAM and self.relay is None:
            self.relay = EventRelay(self.sessions, self.limits.max_event_bytes)

    @property
    def tally(self) -> StreamTally | None:
        return None if self.relay is None else self.relay.tally

    def observe_body(self, body: bytes, parsed: object) -> None:
        """A JSON answer read whole."""
        self._body_chars, self._body_read = len(body), True
        if self.status == 200 and isinstance(parsed, dict):
            self._body_usage = usage_from(parsed)

    @property
    def usage(self) -> Usage | None:
        """What upstream reported it cost, if it did."""
        return self._body_usage if self.relay is None else self.relay.tally.usage

    @property
    def seen_chars(self) -> int:
        """Answer text seen, for an estimate."""
        return self._body_chars if self.relay is None else self.relay.tally.content_chars

    @property
    def complete(self) -> bool:
        """The answer was read to its end (a stream: its done event)."""
        return self._body_read if self.relay is None else self.relay.tally.done

    async def fit_stream_slot(self) -> None:
        """What upstream answered decides whether the request holds a stream slot. A JSON
        answer gives back one taken for it at once. A stream holds one, even if the request
        never asked for it; with none free the caller gets 429, and the exchange, which
        upstream is already running, goes to a drain that charges what it reports."""
        reservation = self.reservation
        if self.relay is None:
            if reservation.stream_lease is not None:
                await self._quota.release_stream(reservation)
            return
        if reservation.stream_lease is not None:
            return
        leased = await self._quota.take_stream(reservation)
        if leased is None:
            self.caller_left()  # nobody will read this answer but a drain
            self.record.quota, self.record.quota_limit = "rejected", CONCURRENT_STREAMS
            raise RateLimited(
                f"rate limit exceeded: {CONCURRENT_STREAMS}; upstream answered with a stream "
                "and every stream slot is taken",
                headers={"Retry-After": "1"},
            )
        self.reservation = leased

    def caller_left(self) -> None:
        """The caller will read nothing more: what remains is a drain's."""
        self.gone = True

    # --- reading on after the caller left (a drain's work) -------------------------------

    async def read_on(self, max_bytes: int, turn: Callable[[], Awaitable[None]]) -> bool:
        """Read upstream's answer to its end without a caller: await it if it has not come
        yet, then the whole body (at most limits.max_answer_bytes), or the stream up to its
        `done` event. False when the stream ran past `max_bytes` (quota.drain_max_bytes) first.

        A drain is background work beside the callers' requests: it frames slices of
        pacing.SLICE bytes, each after `await turn()` (drains take turns, a few ms of a turn
        of the event loop each, see pacing.py), so fast endless upstreams cannot hold the loop
        however many drains read them. It starts with what the relay left unread when the
        caller left in the middle of a chunk."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.answered(await pending)
        response = self.response
        assert response is not None
        relay = self.relay
        if relay is None:
            body = await read_whole(response, self.limits.max_answer_bytes)
            self.observe_body(body, parse_answer(body))
            return True
        read = 0
        unread, relay.unread = relay.unread, b""
        while not relay.tally.done and read < max_bytes:
            want = min(SLICE, max_bytes - read)
            if unread:
                piece, unread = unread[:want], unread[want:]
            else:
                # A slice at a time straight from aiohttp's buffer, which its flow control
                # bounds: joining all that is buffered (readany) held twice that per drain.
                piece = await next_chunk(response.content, want)
                if not piece:
                    return True
            await turn()
            relay.drain(piece)
            read += len(piece)
            if relay.overflow is not None:
                raise relay.overflow
        return relay.tally.done

    # --- settlement ------------------------------------------------------------------------

    def charge(self, error: BaseException | None) -> int | None:
        """The rule table (module docstring): tokens to charge, or None for a full refund."""
        if not self.sent or (isinstance(error, GatewayError) and error.unsent):
            return None
        if self.usage is not None:
            return self.usage.total
        if self.status is not None and self.status != 200:
            return 0
        seen = self.input_tokens + estimate_tokens(self.seen_chars)
        if self.abandoned:
            return max(self.reservation.reserved_tokens, seen)
        return seen

    async def settle(self, error: BaseException | None) -> int | None:
        """Once: charge by the table, release the lease, let go of upstream's answer."""
        self._done = True
        if self.pending is not None:
            self.pending.cancel()  # a drain gave up waiting for it
        if self.response is not None:
            # Back to the pool when the body was read to its end, else closed.
            self.response.release()
        tokens = self.charge(error)
        with self.trace.settling(usage=self.usage, tokens=tokens, status=self.status, error=error):
            await self._account(tokens)
        return tokens

    async def _account(self, tokens: int | None) -> None:
        """Charge `tokens` (None: refund everything) and let go of the stream lease."""
        record, reservation = self.record, self.reservation
        if tokens is None:
            self._request[LIMITS] = _refunded(reservation.buckets, reservation.reserved_tokens)
            await self._quota.refund(reservation)
            if self.upstream_slot is not None:
                await self._quota.refund(self.upstream_slot)  # upstream never saw it either
            return
        estimated = self.usage is None and tokens > 0
        record.usage, record.usage_complete = self.usage, self.complete or self.tally is None
        record.tokens_charged, record.tokens_estimated = tokens, estimated
        self._metrics.settled(
            reservation.tenant, record.agent, self.usage, estimated=tokens if estimated else None
        )
        usage = self.usage
        charge = Charge(
            key=record.key_name or "",
            agent=record.agent or "",
            tokens_input=(usage.input or 0) if usage is not None else 0,
            tokens_output=(usage.output or 0) if usage is not None else 0,
            tokens_estimated=tokens if estimated else 0,
        )
        try:
            await self._quota.settle(reservation, tokens, charge)
        finally:
            await self._quota.release_stream(reservation)


def _refunded(buckets: tuple[BucketState, ...], tokens: int) -> tuple[BucketState, ...]:
    """Bucket states as the caller's headers show them once a reservation is given back."""
    return tuple(
        BucketState(
            b.name,
            b.limit,
            min(b.limit, b.remaining + (tokens if is_token_bucket(b.name) else 1)),
            b.reset,
        )
        for b in buckets
    )
