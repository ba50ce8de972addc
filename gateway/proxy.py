"""The chat handler: authenticate → validate → reserve quota (the tenant's, then upstream's
per-key slot) → forward → stream → settle.

Its quota belongs to one `Admission` (admission.py) from reservation to settlement: the handler
only reports what happens, and leaving the `async with` block settles by the admission's rule
table, or hands the exchange to a drain when the caller has gone.

JSON answers pass back with upstream's status and body unchanged. Event streams pass back
event by event as they arrive, as upstream sent them (a one-line-per-event stream, as
upstream's guide prints it, given the blank lines SSE needs: gateway/sse.py); the SSE framer
reads the same bytes alongside to learn the `done` event's usage, and a stream that breaks off
ends with one SSE error event. With session
isolation (gateway/sessions.py) the session id is namespaced on the way up and translated back
on the way down: in the body, and in the stream's `done` event (each event is passed on as soon
as it is complete). While a stream's upstream is silent, a keep-alive comment goes to the
caller every `streams.heartbeat` seconds, between events (the relay says when it may), so load
balancers on the way do not cut it; upstream silent for `upstream.timeouts.idle` still ends
it. Response headers are not this module's business: gateway/headers.py adds the request id
and rate-limit headers to every response, streams included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
from aiohttp import ClientResponse, hdrs, web

from gateway.admission import Admission, estimate_tokens
from gateway.auth import Caller, end_user_of
from gateway.config import AGENT_ID_PATTERN
from gateway.errors import (
    AgentNotFound,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.headers import buckets_of
from gateway.metrics import STREAM_BROKEN, STREAM_INCOMPLETE, STREAM_TIMEOUT, STREAM_TOO_LARGE
from gateway.pacing import SLICE
from gateway.quota import QuotaUnavailable, Reservation
from gateway.relay import EventRelay
from gateway.sessions import SessionScope, parse_answer
from gateway.state import (
    ACCESS,
    CONFIG,
    LIMITER,
    LIMITS,
    METRICS,
    QUOTA,
    STREAM_PACER,
    TENANCY,
    TRACE,
    UPSTREAM,
    WALL_CLOCK,
)
from gateway.upstream import Deadline, UpstreamClient, next_chunk
from gateway.validation import ChatRequest, read_chat_request

# Response headers of upstream's that mean something to the caller; the rest (its own
# X-RateLimit-* for our shared upstream key, cookies, hop-by-hop) stay here.
_PASSED_BACK = (hdrs.CONTENT_TYPE, hdrs.RETRY_AFTER)
STREAM_HEADERS = {
    hdrs.CACHE_CONTROL: "no-cache",
    # nginx and most ingresses buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


def authenticate(request: web.Request) -> Caller:
    """The caller of a request on the caller port, by the key ring in force, now; recorded on
    its access line."""
    app, record = request.app, request[ACCESS]
    keyring = app[TENANCY].current.keyring
    caller = keyring.authenticate(request.headers.get(hdrs.AUTHORIZATION), app[WALL_CLOCK]())
    record.tenant, record.key_name = caller.tenant.name, caller.key_name
    return caller


async def chat(request: web.Request) -> web.StreamResponse:
    app, record = request.app, request[ACCESS]
    caller = authenticate(request)
    upstream, sessions = app[UPSTREAM], SessionScope.of(caller.tenant, caller.key_name)
    try:
        agent_id = _agent_for(request.match_info["agent_id"], caller, upstream)
        record.agent = agent_id
        chat_request = await read_chat_request(request, app[CONFIG].limits.max_body_bytes)
        body = sessions.upstream_body(chat_request)
    except GatewayError:
        # Refused before admission: costs nothing, but still tells the caller where it stands.
        await _current_limits(request, caller)
        raise

    async with await _admit(request, caller, chat_request, sessions) as admission:
        deadline = Deadline(upstream.timeouts)
        # Upstream's own per-key limit, after the tenant's: a refused tenant costs it nothing.
        admission.upstream_slot = await app[LIMITER].admit(app[QUOTA], agent_id, record, deadline)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        headers = upstream.headers_for(
            agent_id,
            request.headers,
            record.request_id,
            stream=chat_request.stream,
            trace=request[TRACE].upstream(agent_id),
        )
        response = await admission.send(
            upstream.send(agent_id, body, headers, deadline, tenant=caller.tenant.name)
        )
        record.upstream_ttfb = record.upstream_wait = loop.time() - sent
        record.upstream_status = response.status
        await admission.fit_stream_slot()
        if admission.relay is not None:
            return await _relay_stream(request, response, upstream, deadline, admission)
        return await _relay_body(response, upstream, deadline, admission, sessions)


async def _admit(
    request: web.Request, caller: Caller, chat: ChatRequest, sessions: SessionScope
) -> Admission:
    record, trace = request[ACCESS], request[TRACE]
    input_tokens = estimate_tokens(len(chat.message))
    quota = request.app[QUOTA]
    with trace.reserving() as span:
        reservation = await quota.reserve(
            caller.tenant.name,
            record.request_id,
            tokens=input_tokens + caller.tenant.limits.tokens.reserve,
            stream=chat.stream,
            key=caller.key_name,
            end_user=end_user_of(request.headers, caller),
        )
        span.outcome(reservation)
    record.quota_backend = reservation.backend
    request[LIMITS] = reservation.buckets
    if not reservation.allowed:
        record.quota, record.quota_limit = "rejected", reservation.rejected_by
        raise _refusal(reservation)
    record.quota = "allowed"
    return Admission(
        request,
        quota,
        reservation,
        record,
        request.app[METRICS],
        input_tokens=input_tokens,
        sessions=sessions,
        trace=trace,
        limits=request.app[CONFIG].limits,
    )


def _refusal(reservation: Reservation) -> RateLimited:
    return RateLimited(
        f"rate limit exceeded: {reservation.rejected_by}; retry in {reservation.retry_after} s",
        headers={hdrs.RETRY_AFTER: str(reservation.retry_after)},
    )


async def _current_limits(request: web.Request, caller: Caller) -> None:
    """The caller's bucket states for a response that took nothing from them (one read)."""
    with contextlib.suppress(QuotaUnavailable, InvalidRequest):
        usage = await request.app[QUOTA].usage(
            caller.tenant.name, caller.key_name, end_user_of(request.headers, caller)
        )
        request[LIMITS] = buckets_of(usage)


def _agent_for(agent_id: str, caller: Caller, upstream: UpstreamClient) -> str:
    # One answer for "no such agent" and "not yours", so ids cannot be probed.
    if (
        not AGENT_ID_PATTERN.fullmatch(agent_id)
        or not caller.tenant.may_use(agent_id)
        or not upstream.can_reach(agent_id)
    ):
        raise AgentNotFound("no agent with this id is available to your gateway key")
    return agent_id


def _passed_back(response: ClientResponse) -> dict[str, str]:
    return {name: response.headers[name] for name in _PASSED_BACK if name in response.headers}


async def _relay_body(
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    admission: Admission,
    sessions: SessionScope,
) -> web.Response:
    record = admission.record
    loop = asyncio.get_running_loop()
    reading = loop.time()
    limit = admission.limits.max_answer_bytes
    try:
        body = await upstream.read_body(response, deadline, limit)
    finally:
        record.upstream_wait += loop.time() - reading
    parsed = parse_answer(body)
    admission.observe_body(body, parsed)
    body = sessions.caller_body(body, parsed)
    return web.Response(status=response.status, body=body, headers=_passed_back(response))


async def _relay_stream(
    request: web.Request,
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    admission: Admission,
) -> web.StreamResponse:
    record, metrics = request[ACCESS], request.app[METRICS]
    record.stream = True
    active = metrics.streams_of(record.tenant)
    active.inc()
    try:
        return await _pass_stream(request, response, upstream, deadline, admission)
    finally:
        active.dec()


async def _pass_stream(
    request: web.Request,
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    admission: Admission,
) -> web.StreamResponse:
    record, chunk_gap = request[ACCESS], request.app[METRICS].chunk_gap
    pacer = request.app[STREAM_PACER]
    relay = admission.relay
    assert relay is not None
    out = web.StreamResponse(status=response.status, headers=_passed_back(response))
    out.headers.update(STREAM_HEADERS)
    idle, beat = upstream.timeouts.idle, request.app[CONFIG].streams.heartbeat
    failure: GatewayError | None = None
    chunk: bytes | None
    loop = asyncio.get_running_loop()
    await out.prepare(request)
    # Upstream silent until then ends the stream; a heartbeat of ours does not move it.
    silent_until = deadline.within(idle)
    while True:
        waiting = loop.time()
        # With heartbeats on, the wait also ends `beat` seconds into a silence.
        wake = min(silent_until, waiting + beat) if beat else silent_until
        try:
            async with asyncio.timeout_at(wake):
                chunk = await next_chunk(response.content)
        except TimeoutError:
            if wake == silent_until:
                failure = UpstreamTimeout("the upstream API stopped sending this stream")
                record.upstream_error = STREAM_TIMEOUT
                break
            chunk = None  # only a heartbeat is due
        except aiohttp.ClientError as exc:
            failure = UpstreamUnavailable(f"the upstream stream broke off ({type(exc).__name__})")
            record.upstream_error = STREAM_BROKEN
            break
        finally:
            received = loop.time()
            record.upstream_wait += received - waiting
        if chunk is None:
            if not await _keep_alive(request, out, relay, idle, admission):
                return out
            continue
        if not chunk:
            break
        if len(chunk) <= SLICE:
            passed = relay.feed(chunk)
        else:  # upstream's bytes piled up: framed in slices, taking turns with the loop
            passed = await relay.feed_paced(chunk, pacer.turn)
        if passed and not await _write(request, out, passed, idle, admission):
            return out
        failure = relay.overflow
        if failure is not None:
            record.upstream_error = STREAM_TOO_LARGE
            break
        chunk_gap.observe(loop.time() - received)
        silent_until = deadline.within(idle)

    tally = relay.tally
    if failure is None and not tally.done and not tally.errored:
        failure = UpstreamUnavailable("the upstream stream ended before its done event")
        record.upstream_error = STREAM_INCOMPLETE
    # A half-sent event is closed first, so an error event of ours is read as its own.
    tail = relay.finish(close=failure is not None)
    if failure is not None:
        tail += sse_error_event(failure)
    if (not tail or await _write(request, out, tail, idle, admission)) and not admission.gone:
        try:
            await out.write_eof()
        except ConnectionError:
            admission.caller_left()
    return out


async def _keep_alive(
    request: web.Request,
    out: web.StreamResponse,
    relay: EventRelay,
    idle: float,
    admission: Admission,
) -> bool:
    """A heartbeat, for upstream has been silent: load balancers on the way cut a stream idle
    for their own timeout (60 s for ALB and nginx). It goes between events only (the relay
    knows where the caller is) and is never tallied. False when the caller has gone."""
    comment = relay.keep_alive()
    if not comment:  # the caller is inside an event: the next beat will tell
        return True
    if not await _write(request, out, comment, idle, admission):
        return False
    request[ACCESS].heartbeats += 1
    return True


async def _write(
    request: web.Request, out: web.StreamResponse, data: bytes, idle: float, admission: Admission
) -> bool:
    """Write to the caller; False when it has gone, or accepted nothing for `idle` seconds
    (a caller that never reads would otherwise hold the stream, and its lease, for ever)."""
    try:
        async with asyncio.timeout(idle):
            await out.write(data)
    except ConnectionError:
        pass
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
    else:
        return True
    admission.caller_left()
    request[ACCESS].client_closed = True
    return False


def sse_error_event(error: GatewayError) -> bytes:
    payload = {"type": "error", "code": error.code, "message": error.message}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
