"""`POST /v1/agents/{agent_id}/chat`, as api.thinnest.ai answers it (plus injected faults).

Checks run in this order: key (401), rate limit (429), agent (404), body (400). The upstream
documents give no order (nor the error body's shape, the session id limit or what counts as
an empty message): these are the simulator's choices. Faults apply only to requests that pass
them all, so an injected fault never hides a caller error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .auth import bearer_token
from .config import AgentConfig
from .faults import Fault
from .replies import Reply, compose_reply, done_event, json_body, split_reply
from .responses import error_response, json_response, sse_event
from .sessions import SessionStore
from .state import CONFIG, FAULTS, HELD_STREAMS, KEYS, RATE_LIMITER, REQUESTS, SESSIONS

MAX_SESSION_ID_LENGTH = 256


@dataclass(frozen=True, slots=True)
class ChatRequest:
    message: str
    session_id: str | None
    stream: bool


def parse_chat_body(raw: bytes) -> ChatRequest:
    """The documented fields (`message`, `session_id`) and the undocumented `stream`, strictly
    typed. The documents do not say what upstream does with unknown fields or nulls: here the
    former are ignored and a null means absent."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("Request body must be valid JSON.") from None
    if not isinstance(body, dict):
        raise ValueError("Request body must be a JSON object.")
    message = body.get("message")
    if message is None:
        raise ValueError("'message' is required.")
    if not isinstance(message, str):
        raise ValueError("'message' must be a string.")
    if not message.strip():
        raise ValueError("'message' must not be empty.")
    session_id = body.get("session_id")
    if session_id is not None:
        if not isinstance(session_id, str):
            raise ValueError("'session_id' must be a string.")
        if not session_id:
            raise ValueError("'session_id' must not be empty; omit it to start a new session.")
        if len(session_id) > MAX_SESSION_ID_LENGTH:
            raise ValueError(f"'session_id' must be at most {MAX_SESSION_ID_LENGTH} characters.")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ValueError("'stream' must be a boolean.")
    return ChatRequest(message=message, session_id=session_id, stream=bool(stream))


async def chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    raw = await request.read()
    recorded = app[REQUESTS].record(
        request.method, request.path, request.query_string, request.headers, raw
    )
    agent_id = request.match_info["agent_id"]
    authorization = request.headers.get("Authorization")
    key, reason = app[KEYS].check(authorization, agent_id)
    if key is None:
        # "Rate limit headers are included in every response": a 401 counts against no key,
        # so it reports the presented key's windows as they stand (fresh for an unknown key).
        headers = app[RATE_LIMITER].peek(bearer_token(authorization)).headers()
        return error_response(401, reason, headers={**headers, "WWW-Authenticate": "Bearer"})
    decision = app[RATE_LIMITER].hit(key)
    headers = decision.headers()
    if not decision.allowed:
        message = f"Rate limit exceeded. Retry after {decision.retry_after} seconds."
        return error_response(429, message, headers=headers)
    agent = app[CONFIG].agents.get(agent_id)
    if agent is None:
        return error_response(404, f"Agent {agent_id!r} not found.", headers=headers)
    try:
        body = parse_chat_body(raw)
    except ValueError as exc:
        return error_response(400, str(exc), headers=headers)
    streaming = body.stream or "text/event-stream" in request.headers.get("Accept", "").lower()

    fault = app[FAULTS].take(agent_id, streaming)
    if fault is not None and fault.kind == "stream_unasked":
        streaming = True
    if fault is not None:
        refusal = await _before_reply(request, fault, headers)
        if refusal is not None:
            return refusal

    session_id = body.session_id or SessionStore.new_id()
    reply = compose_reply(agent_id, body.message, app[SESSIONS].advance(session_id, body.message))
    recorded.usage = reply.usage()
    # The turn has run (the session remembers it) whether or not anyone reads the answer.
    if (
        fault is not None
        and fault.kind == "hold_answer"
        and not await app[HELD_STREAMS].hold(_gone(request))
    ):
        return web.Response(status=499)  # nobody is there to read it
    if not streaming:
        return json_response(json_body(reply, agent.usage_format), headers=headers)
    return await _stream(request, reply, agent, headers, fault)


async def _before_reply(
    request: web.Request, fault: Fault, headers: Mapping[str, str]
) -> web.StreamResponse | None:
    """Apply a fault that acts before any reply exists; a response here replaces the reply."""
    if fault.kind == "slow_first_byte":
        await asyncio.sleep(fault.delay)
        return None
    if fault.kind == "hang":
        await request.app[HELD_STREAMS].park(_gone(request))
        # Reached only at shutdown, or when the client is gone and nobody will read this.
        return error_response(503, "The simulator is shutting down.", headers=headers)
    if fault.kind == "rate_limited":
        refused = {
            **headers,
            "X-RateLimit-Remaining": "0",
            "Retry-After": str(fault.retry_after),
        }
        message = f"Rate limit exceeded. Retry after {fault.retry_after} seconds."
        return error_response(429, message, headers=refused)
    if fault.kind == "error":
        return error_response(
            fault.status, fault.message or None, code=fault.code or None, headers=headers
        )
    return None


async def _stream(
    request: web.Request,
    reply: Reply,
    agent: AgentConfig,
    headers: Mapping[str, str],
    fault: Fault | None,
) -> web.StreamResponse:
    framing = agent.stream_framing
    events = [
        sse_event({"type": "content", "content": piece}, framing)
        for piece in split_reply(reply.text)
    ]
    content_events = len(events)
    events.append(sse_event(done_event(reply, agent.usage_format), framing))

    interval = request.app[CONFIG].chunk_interval
    drop_at = hold_at = pause_at = -1
    pause = 0.0
    if fault is not None:
        if fault.kind == "slow_drip":
            interval = fault.interval
        elif fault.kind == "drop_mid_stream":
            drop_at = min(fault.after_events, content_events)
        elif fault.kind == "hold_stream":
            hold_at = min(fault.after_events, content_events)
        elif fault.kind == "pause_stream":
            pause_at, pause = min(fault.after_events, content_events), fault.delay

    response = web.StreamResponse(
        headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    is_gone = _gone(request)
    try:
        await response.prepare(request)
        if fault is not None and fault.kind == "endless_stream":
            await _endless(response, events[0] * fault.burst)
            return response
        for index, event in enumerate(events):
            if index == drop_at:
                _drop_connection(request)
                return response
            if index == hold_at and not await request.app[HELD_STREAMS].hold(is_gone):
                return response
            if index == pause_at:
                await asyncio.sleep(pause)
            if index and interval:
                await asyncio.sleep(interval)
            # One write per event: each reaches the socket on its own, as upstream's do.
            await response.write(event)
    except ConnectionError:
        # The client left mid-stream; aiohttp notices on its own, nothing more to send.
        pass
    return response


async def _endless(response: web.StreamResponse, burst: bytes) -> None:
    """`burst` again and again until the client leaves (a failed write, or the handler
    cancelled); each write waits while the client's socket is full, as upstream's do."""
    while True:
        await response.write(burst)
        await asyncio.sleep(0)  # a reader that keeps up never makes write() wait: take turns


def _drop_connection(request: web.Request) -> None:
    """End the TCP connection without the chunked terminator, so the client sees a broken body."""
    transport = request.transport
    if transport is None:
        return
    if transport.get_write_buffer_size():
        # abort() would discard events already written; close() still sends them first.
        transport.close()
    else:
        transport.abort()


def _gone(request: web.Request) -> Callable[[], bool]:
    def is_gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return is_gone
