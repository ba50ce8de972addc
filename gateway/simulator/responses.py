"""Upstream's wire formats: the error body and Server-Sent Events framing."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from .config import StreamFraming

# The documented table, plus names for statuses upstream may plausibly answer with but
# does not document, so an injected error always carries a code.
ERROR_CODES: Mapping[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    402: "insufficient_balance",
    404: "agent_not_found",
    429: "rate_limited",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}

DEFAULT_MESSAGES: Mapping[int, str] = {
    400: "Missing or invalid parameters.",
    401: "Invalid or missing API key.",
    402: "Insufficient balance. Top up your account to continue.",
    404: "Agent not found.",
    429: "Too many requests. Retry after the time given in Retry-After.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service temporarily unavailable.",
    504: "Gateway timeout.",
}


def error_code_for(status: int) -> str:
    return ERROR_CODES.get(status) or ("internal_error" if status >= 500 else "invalid_request")


def error_response(
    status: int,
    message: str | None = None,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {
        "error": {
            "code": code or error_code_for(status),
            "message": message or DEFAULT_MESSAGES.get(status, "Request failed."),
        }
    }
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def json_response(
    payload: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


def sse_event(payload: Mapping[str, object], framing: StreamFraming = "blank_lines") -> bytes:
    """One event: a `data:` line, then a blank line (`blank_lines`) or nothing (`lines`, the
    deployment guide's stream, one line per event)."""
    # json.dumps' default separators match the documented `{"type": "content", ...}` lines.
    end = b"\n\n" if framing == "blank_lines" else b"\n"
    return b"data: " + json.dumps(payload).encode() + end
