"""The chat handler: authenticate → validate → reserve quota (the tenant's, then upstream's
per-key slot) → forward → stream → settle.

JSON answers pass back with upstream's status and body unchanged. Event streams pass back
event by event, each as soon as it is complete and unchanged; the relay (gateway/relay.py)
frames them once to learn the `done` event's usage, and a stream that breaks off ends with one
SSE error event. With session isolation (gateway/sessions.py) the session id is namespaced on
the way up and translated back on the way down: in the body, and in the stream's `done` event.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import ClientResponse, hdrs, web

from gateway.accounting import (
    Account,
    current_limits,
    estimate_tokens,
    rate_limit_headers,
    refusal,
    settle_stream,
)
from gateway.auth import Caller
from gateway.config import AGENT_ID_PATTERN
from gateway.errors import AgentNotFound, GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.logs import AccessRecord
from gateway.metrics import STREAM_BROKEN, STREAM_INCOMPLETE, STREAM_TIMEOUT
from gateway.relay import EventRelay
from gateway.sessions import SessionScope, parse_answer
from gateway.state import ACCESS, CONFIG, DRAINS, KEYRING, LIMITER, METRICS, QUOTA, UPSTREAM
from gateway.upstream import Deadline, UpstreamClient
from gateway.usage import usage_from
from gateway.validation import ChatRequest, read_chat_request

# Response headers of upstream's that mean something to the caller; the rest (its own
# X-RateLimit-* for our shared upstream key, cookies, hop-by-hop) stay here.
_PASSED_BACK = (hdrs.CONTENT_TYPE, hdrs.RETRY_AFTER)
STREAM_HEADERS = {
    hdrs.CACHE_CONTROL: "no-cache",
    # nginx and most ingresses buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


async def chat(request: web.Request) -> web.StreamResponse:
    app, record = request.app, request[ACCESS]
    caller = app[KEYRING].authenticate(request.headers.get(hdrs.AUTHORIZATION))
    record.tenant, record.key_name = caller.tenant.name, caller.key_name
    upstream, sessions = app[UPSTREAM], SessionScope.of(caller.tenant)
    try:
        agent_id = _agent_for(request.match_info["agent_id"], caller, upstream)
        record.agent = agent_id
        chat_request = await read_chat_request(request, app[CONFIG].limits.max_body_bytes)
        body = sessions.upstream_body(chat_request)
    except GatewayError:
        # Refused before admission: costs nothing, but still tells the caller where it stands.
        record.extra_headers.update(await current_limits(app[QUOTA], caller.tenant.name))
        raise

    account = await _reserve(request, caller, chat_request)
    try:
        deadline = Deadline(upstream.timeouts)
        # Upstream's own per-key limit, after the tenant's: a refused tenant costs it nothing.
        await app[LIMITER].admit(app[QUOTA], agent_id, record, deadline)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        headers = upstream.headers_for(agent_id, request.headers, record.request_id)
        response = await upstream.send(agent_id, body, headers, deadline)
        record.upstream_ttfb = record.upstream_wait = loop.time() - sent
        record.upstream_status = response.status
        try:
            if response.content_type == "text/event-stream":
                return await _relay_stream(request, response, upstream, deadline, account, sessions)
            return await _relay_body(response, upstream, deadline, account, record, sessions)
        finally:
            if not account.detached:
                # Back to the pool when the body was read to its end, else closed.
                response.release()
    finally:
        if not account.detached:
            # Whatever upstream did not report as used consumed nothing upstream.
            await account.settle(0)


async def _reserve(request: web.Request, caller: Caller, chat: ChatRequest) -> Account:
    record = request[ACCESS]
    wants_stream = chat.stream or "text/event-stream" in request.headers.get(hdrs.ACCEPT, "")
    estimate = estimate_tokens(len(chat.message)) + caller.tenant.limits.tokens.reserve
    quota = request.app[QUOTA]
    reservation = await quota.reserve(
        caller.tenant.name, record.request_id, tokens=estimate, stream=wants_stream
    )
    record.quota_backend = reservation.backend
    record.extra_headers.update(rate_limit_headers(reservation.buckets))
    if not reservation.allowed:
        record.quota, record.quota_limit = "rejected", reservation.rejected_by
        raise refusal(reservation)
    record.quota = "allowed"
    return Account(quota, reservation, record, request.app[METRICS])


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


def _headers_from(response: ClientResponse, record: AccessRecord) -> dict[str, str]:
    """For a stream, prepared here: the edge can no longer add the record's headers to it."""
    headers = _passed_back(response)
    headers.update(record.extra_headers)
    headers["X-Request-ID"] = record.request_id
    return headers


async def _relay_body(
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    account: Account,
    record: AccessRecord,
    sessions: SessionScope,
) -> web.Response:
    loop = asyncio.get_running_loop()
    reading = loop.time()
    body = await upstream.read_body(response, deadline)
    record.upstream_wait += loop.time() - reading
    parsed = parse_answer(body)
    if response.status == 200:
        record.usage = usage_from(parsed) if isinstance(parsed, dict) else None
        # Upstream answered; when it did not say what it cost, the answer's size is charged.
        await account.settle(estimate_tokens(len(body)), usage=record.usage)
    body = sessions.caller_body(body, parsed)
    # The edge adds the caller's rate-limit headers and request id to an unprepared response.
    return web.Response(status=response.status, body=body, headers=_passed_back(response))


async def _relay_stream(
    request: web.Request,
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    account: Account,
    sessions: SessionScope,
) -> web.StreamResponse:
    record, metrics = request[ACCESS], request.app[METRICS]
    record.stream = True
    active = metrics.streams_of(record.tenant)
    active.inc()
    try:
        return await _pass_stream(
            request, response, upstream, deadline, account, EventRelay(sessions)
        )
    finally:
        active.dec()


async def _pass_stream(
    request: web.Request,
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    account: Account,
    relay: EventRelay,
) -> web.StreamResponse:
    record, chunk_gap = request[ACCESS], request.app[METRICS].chunk_gap
    out = web.StreamResponse(
        status=response.status, headers={**_headers_from(response, record), **STREAM_HEADERS}
    )
    tally = relay.tally
    failure: GatewayError | None = None
    loop = asyncio.get_running_loop()
    try:
        await out.prepare(request)
        while True:
            waiting = loop.time()
            try:
                async with asyncio.timeout_at(deadline.within(upstream.timeouts.idle)):
                    chunk = await response.content.readany()
            except TimeoutError:
                failure = UpstreamTimeout("the upstream API stopped sending this stream")
                record.upstream_error = STREAM_TIMEOUT
                break
            except aiohttp.ClientError as exc:
                failure = UpstreamUnavailable(
                    f"the upstream stream broke off ({type(exc).__name__})"
                )
                record.upstream_error = STREAM_BROKEN
                break
            finally:
                received = loop.time()
                record.upstream_wait += received - waiting
            if not chunk:
                break
            # Whole events only: the done event's session id is translated back.
            if passed := relay.feed(chunk):
                await out.write(passed)
            chunk_gap.observe(loop.time() - received)
    except (ConnectionError, asyncio.CancelledError) as gone:
        # The caller left: a failed write, or aiohttp cancelling the handler on disconnect.
        record.client_closed = True
        record.usage, record.usage_complete = tally.usage, tally.done
        await _abandon(request, response, relay, account)
        if isinstance(gone, asyncio.CancelledError):
            raise
        return out  # a failed write is not the gateway's error: nothing more to send
    record.usage, record.usage_complete = tally.usage, tally.done
    await settle_stream(account, tally)

    if failure is None and not tally.done and not tally.errored:
        failure = UpstreamUnavailable("the upstream stream ended before its done event")
        record.upstream_error = STREAM_INCOMPLETE
    # Close a half-sent event first, so an error event of ours is read as an event of its own.
    tail = relay.finish(close=failure is not None)
    if failure is not None:
        tail += sse_error_event(failure)
    try:
        if tail:
            await out.write(tail)
        await out.write_eof()
    except ConnectionError:
        record.client_closed = True
    return out


async def _abandon(
    request: web.Request,
    response: ClientResponse,
    relay: EventRelay,
    account: Account,
) -> None:
    """Charge a stream whose caller left: read on to its done event, or settle what was seen."""
    if not relay.tally.done:
        fields = _drain_fields(request[ACCESS])
        if request.app[DRAINS].start(response, relay, account, fields):
            account.detached = True
            return
    await settle_stream(account, relay.tally)


def _drain_fields(record: AccessRecord) -> dict[str, object]:
    return {"request_id": record.request_id, "tenant": record.tenant, "agent": record.agent}


def sse_error_event(error: GatewayError) -> bytes:
    payload = {"type": "error", "code": error.code, "message": error.message}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
