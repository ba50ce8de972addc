"""The chat handler: authenticate → validate → (reserve quota) → forward → stream → settle.

JSON answers pass back with upstream's status and body unchanged. Event streams pass back
chunk by chunk as they arrive, unchanged; an SSE scanner reads the same bytes alongside to
learn the `done` event's usage, and a stream that breaks off ends with one SSE error event.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import ClientResponse, hdrs, web

from gateway.auth import Caller
from gateway.config import AGENT_ID_PATTERN
from gateway.errors import AgentNotFound, GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.logs import AccessRecord
from gateway.sse import SSEScanner
from gateway.state import ACCESS, CONFIG, KEYRING, UPSTREAM
from gateway.upstream import Deadline, UpstreamClient
from gateway.usage import StreamTally, usage_from_json
from gateway.validation import read_chat_request

# Response headers of upstream's that mean something to the caller; the rest (its own
# X-RateLimit-* for our shared upstream key, cookies, hop-by-hop) stay here.
_PASSED_BACK = (hdrs.CONTENT_TYPE, hdrs.RETRY_AFTER)
STREAM_HEADERS = {
    hdrs.CACHE_CONTROL: "no-cache",
    # nginx and most ingresses buffer proxied responses unless told not to.
    "X-Accel-Buffering": "no",
}


async def chat(request: web.Request) -> web.StreamResponse:
    record = request[ACCESS]
    caller = request.app[KEYRING].authenticate(request.headers.get(hdrs.AUTHORIZATION))
    record.tenant, record.key_name = caller.tenant.name, caller.key_name
    upstream = request.app[UPSTREAM]
    agent_id = _agent_for(request.match_info["agent_id"], caller, upstream)
    record.agent = agent_id

    chat_request = await read_chat_request(request, request.app[CONFIG].limits.max_body_bytes)

    deadline = Deadline(upstream.timeouts)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    headers = upstream.headers_for(agent_id, request.headers, record.request_id)
    response = await upstream.send(agent_id, chat_request.body, headers, deadline)
    record.upstream_ttfb = loop.time() - sent
    record.upstream_status = response.status
    try:
        if response.content_type == "text/event-stream":
            return await _relay_stream(request, response, upstream, deadline, record)
        return await _relay_body(response, upstream, deadline, record)
    finally:
        # Returns the connection to the pool when the body was read to its end, else closes it.
        response.release()


def _agent_for(agent_id: str, caller: Caller, upstream: UpstreamClient) -> str:
    # One answer for "no such agent" and "not yours", so ids cannot be probed.
    if (
        not AGENT_ID_PATTERN.fullmatch(agent_id)
        or not caller.tenant.may_use(agent_id)
        or not upstream.can_reach(agent_id)
    ):
        raise AgentNotFound("no agent with this id is available to your gateway key")
    return agent_id


def _headers_from(response: ClientResponse, request_id: str) -> dict[str, str]:
    headers: dict[str, str] = {
        name: response.headers[name] for name in _PASSED_BACK if name in response.headers
    }
    headers["X-Request-ID"] = request_id
    return headers


async def _relay_body(
    response: ClientResponse, upstream: UpstreamClient, deadline: Deadline, record: AccessRecord
) -> web.Response:
    body = await upstream.read_body(response, deadline)
    if response.status == 200 and response.content_type == "application/json":
        record.usage = usage_from_json(body)
    return web.Response(
        status=response.status, body=body, headers=_headers_from(response, record.request_id)
    )


async def _relay_stream(
    request: web.Request,
    response: ClientResponse,
    upstream: UpstreamClient,
    deadline: Deadline,
    record: AccessRecord,
) -> web.StreamResponse:
    record.stream = True
    out = web.StreamResponse(
        status=response.status,
        headers={**_headers_from(response, record.request_id), **STREAM_HEADERS},
    )
    await out.prepare(request)
    scanner, tally = SSEScanner(), StreamTally()
    failure: GatewayError | None = None
    while True:
        try:
            async with asyncio.timeout_at(deadline.within(upstream.timeouts.idle)):
                chunk = await response.content.readany()
        except TimeoutError:
            failure = UpstreamTimeout("the upstream API stopped sending this stream")
            break
        except aiohttp.ClientError as exc:
            failure = UpstreamUnavailable(f"the upstream stream broke off ({type(exc).__name__})")
            break
        if not chunk:
            break
        for event in scanner.feed(chunk):
            tally.observe(event)
        try:
            await out.write(chunk)
        except ConnectionError:
            record.client_closed = True
            break
    record.usage = tally.usage
    record.usage_complete = tally.done
    if record.client_closed:
        return out

    if failure is None and not tally.done and not tally.errored:
        failure = UpstreamUnavailable("the upstream stream ended before its done event")
    try:
        if failure is not None:
            record.upstream_error = failure.code
            # Close a half-sent event first, so ours is read as an event of its own.
            tail = b"" if scanner.at_boundary else b"\n\n"
            await out.write(tail + sse_error_event(failure))
        await out.write_eof()
    except ConnectionError:
        record.client_closed = True
    return out


def sse_error_event(error: GatewayError) -> bytes:
    payload = {"type": "error", "code": error.code, "message": error.message}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
