"""The caller API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Built from the same constants validation and configuration use, so the document cannot drift
from what the gateway accepts; tests/test_fuzz.py runs schemathesis against it. It describes
the caller port only: the admin port (`/metrics`) and the simulator's `/_sim/` are not part of
the contract. Built per call from a pure function (cheap), so no state is kept anywhere.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.config import AGENT_ID_PATTERN
from gateway.validation import MAX_DEPTH, MAX_SESSION_ID

JSON = "application/json"
SSE = "text/event-stream"

# Statuses the gateway answers itself, and those upstream documents (passed through as they are).
_GATEWAY_ERRORS = {
    400: "invalid_request: the body or Content-Type is not what the API accepts (the message "
    "says what to fix), or the request head is not valid HTTP (answered on any path, never "
    "echoing the request's bytes); also upstream's own 400",
    401: "unauthorized: gateway key missing, malformed or unknown (upstream's 401 passes through)",
    402: "insufficient_balance: passed through from upstream",
    404: "agent_not_found: no such agent, or the tenant may not use it (the same answer); "
    "not_found: no such path",
    413: "request_too_large: body over limits.max_body_bytes",
    429: "rate_limited: a tenant quota refused the request (or upstream's 429, passed through); "
    "Retry-After says when to come back",
    500: "internal_error: a bug in the gateway, logged with the request id; or upstream's 500, "
    "passed through",
    502: "upstream_unavailable: upstream could not be reached (or upstream's 502)",
    503: "unavailable: shutting down, or the quota backend is down with on_backend_error: closed",
    504: "upstream_timeout: upstream did not answer within upstream.timeouts (or upstream's 504)",
}


def openapi_document() -> dict[str, Any]:
    """The whole document; a fresh dict on every call."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "thinnest-gateway caller API",
            "version": __version__,
            "description": (
                "The thinnestAI agent chat API, behind a gateway that holds the upstream keys. "
                "Same paths and bodies as upstream; callers authenticate with a gateway key."
            ),
        },
        "paths": {
            "/v1/agents/{agent_id}/chat": {"post": _chat()},
            "/v1/usage": {"get": _usage()},
            "/healthz": {"get": _healthz()},
            "/readyz": {"get": _readyz()},
            "/openapi.json": {"get": _self()},
        },
        "components": {
            "securitySchemes": {
                "gatewayKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A gateway key (gw_...) issued by `thinnest-gateway keys new`.",
                }
            },
            "schemas": _schemas(),
            "headers": _headers(),
        },
    }


async def openapi(request: web.Request) -> web.Response:
    """`GET /openapi.json`."""
    body = json.dumps(openapi_document(), indent=1).encode()
    return web.Response(body=body, content_type=JSON)


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _error(description: str, *, extra_headers: tuple[str, ...] = ()) -> dict[str, Any]:
    headers = {"X-Request-ID": _ref("headers", "X-Request-ID")}
    headers.update({name: _ref("headers", name) for name in extra_headers})
    return {
        "description": description,
        "headers": headers,
        "content": {JSON: {"schema": _ref("schemas", "Error")}},
    }


_RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-RateLimit-Remaining-Tokens",
    "RateLimit-Policy",
    "RateLimit",
)


def _chat() -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for status, description in _GATEWAY_ERRORS.items():
        extra: tuple[str, ...] = () if status in (401, 500, 502, 503, 504) else _RATE_LIMIT_HEADERS
        if status == 401:
            extra = ("WWW-Authenticate",)
        if status in (429, 503):
            extra = (*extra, "Retry-After")
        errors[str(status)] = _error(description, extra_headers=extra)
    return {
        "operationId": "chat",
        "summary": "Send a message to an agent; JSON answer or Server-Sent Events",
        "security": [{"gatewayKey": []}],
        "parameters": [
            {
                "name": "agent_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": f"^{AGENT_ID_PATTERN.pattern}$"},
                "example": "ag_support",
            },
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": (
                    "Kept and echoed when sane (letters, digits and ._:- , at most 128, not "
                    "looking like a key); otherwise replaced by the gateway's own."
                ),
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _ref("schemas", "ChatRequest")}},
        },
        "responses": {
            "200": {
                "description": (
                    "Upstream's answer: JSON, unchanged but for the session id, or (with "
                    "stream: true or Accept: text/event-stream) its events, each passed on "
                    "as soon as it is complete, as upstream sent it, with the blank line SSE "
                    "needs after it (upstream's guide prints one data line per event without "
                    "one); while "
                    "upstream is silent, a comment line `: keep-alive` between events every "
                    "streams.heartbeat seconds (SSE clients skip comments)."
                ),
                "headers": {
                    "X-Request-ID": _ref("headers", "X-Request-ID"),
                    **{name: _ref("headers", name) for name in _RATE_LIMIT_HEADERS},
                },
                "content": {
                    JSON: {"schema": _ref("schemas", "ChatResponse")},
                    # One event per item (as OpenAPI 3.2's itemSchema, and as schemathesis
                    # reads `schema` for text/event-stream), its data a JSON object.
                    SSE: {"schema": _ref("schemas", "ServerSentEvent")},
                },
            },
            **errors,
        },
    }


def _usage() -> dict[str, Any]:
    return {
        "operationId": "usage",
        "summary": "The calling tenant's buckets, tokens used today and concurrent streams",
        "security": [{"gatewayKey": []}],
        "responses": {
            "200": {
                "description": "The tenant's quota state",
                "headers": {
                    "X-Request-ID": _ref("headers", "X-Request-ID"),
                    **{name: _ref("headers", name) for name in _RATE_LIMIT_HEADERS},
                },
                "content": {JSON: {"schema": _ref("schemas", "Usage")}},
            },
            "401": _error("unauthorized", extra_headers=("WWW-Authenticate",)),
            "503": _error("unavailable: the quota backend is down with on_backend_error: closed"),
        },
    }


def _healthz() -> dict[str, Any]:
    return {
        "operationId": "healthz",
        "summary": "The process is alive",
        "security": [],
        "responses": {
            "200": {
                "description": "Alive",
                "headers": {"X-Request-ID": _ref("headers", "X-Request-ID")},
                "content": {
                    JSON: {"schema": _object({"status": {"const": "ok"}}, required=("status",))}
                },
            }
        },
    }


def _readyz() -> dict[str, Any]:
    # Ready or not, nothing more: the quota backend's state is the admin port's /readyz.
    ready = _object({"status": {"const": "ready"}}, required=("status",), extra=False)
    return {
        "operationId": "readyz",
        "summary": "Ready to take traffic; 503 once shutdown has begun, or while the quota "
        "backend is down and quota.on_backend_error is closed",
        "security": [],
        "responses": {
            "200": {
                "description": "Ready",
                "headers": {"X-Request-ID": _ref("headers", "X-Request-ID")},
                "content": {JSON: {"schema": ready}},
            },
            "503": _error("unavailable: not ready"),
        },
    }


def _self() -> dict[str, Any]:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "security": [],
        "responses": {
            "200": {
                "description": "OpenAPI 3.1",
                "headers": {"X-Request-ID": _ref("headers", "X-Request-ID")},
                "content": {JSON: {"schema": {"type": "object"}}},
            }
        },
    }


def _object(
    properties: dict[str, Any], *, required: tuple[str, ...] = (), extra: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    usage = _object(
        {"input_tokens": count, "output_tokens": count, "total_tokens": count},
        required=("input_tokens", "output_tokens", "total_tokens"),
    )
    bucket = _object(
        {
            "name": {
                "type": "string",
                "description": "the limit, after its level: the tenant's own, 'key <name>: ' "
                "or 'end user: '",
                "examples": [
                    "requests per minute",
                    "tokens per day",
                    "tokens per month",
                    "key billing-service: requests per calendar day",
                ],
            },
            "limit": count,
            "remaining": {"type": "integer", "description": "negative while in token debt"},
            "reset": {"type": "number", "minimum": 0, "description": "seconds until full"},
        },
        required=("name", "limit", "remaining", "reset"),
    )
    budget = _object(
        {
            "name": {"type": "string", "examples": ["tokens per month"]},
            "limit": count,
            "used": {"type": "integer", "description": "over the limit while in debt"},
            "resets_at": {
                "type": "string",
                "format": "date-time",
                "description": "the start of the next period (midnight or the 1st in the "
                "gateway's quota.timezone), in UTC",
            },
        },
        required=("name", "limit", "used", "resets_at"),
    )
    stream_cap = _object(
        {"name": {"type": "string"}, "limit": count, "active": count},
        required=("name", "limit", "active"),
    )
    return {
        "ChatRequest": {
            **_object(
                {
                    "message": {"type": "string", "minLength": 1, "pattern": r"\S"},
                    "session_id": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_SESSION_ID,
                        # Printable: no control characters (nor line or paragraph separators).
                        "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$",
                        "description": (
                            "continues a conversation; with session_isolation (the default) "
                            "at most 252 minus the length of the tenant's name (per key: "
                            "minus the key's name and one more)"
                        ),
                    },
                    "stream": {"type": "boolean", "description": "true asks for events"},
                },
                required=("message",),
            ),
            "description": (
                "Other fields are passed upstream untouched; the body is forwarded byte for "
                "byte. It must be UTF-8, with no key twice, no NaN/Infinity, and at most "
                f"{MAX_DEPTH} levels of nesting."
            ),
            "example": {"message": "What are your business hours?", "session_id": "sess_001"},
        },
        "ChatResponse": _object(
            {
                "response": {"type": "string"},
                "session_id": {"type": "string"},
                "usage": usage,
                "tokens_used": {**count, "description": "the deployment guide's shape"},
            },
            required=("response",),
        ),
        "ServerSentEvent": _object(
            {
                "event": {"type": "string"},
                "id": {"type": "string"},
                "data": {
                    "type": "string",
                    "contentMediaType": JSON,
                    "contentSchema": _ref("schemas", "StreamEvent"),
                },
            },
            required=("data",),
        ),
        "StreamEvent": {
            **_object(
                {
                    "type": {"enum": ["content", "done", "error"]},
                    "content": {"type": "string"},
                    "session_id": {"type": "string"},
                    "usage": usage,
                    "tokens_used": count,
                    "code": {"enum": ["upstream_unavailable", "upstream_timeout"]},
                    "message": {"type": "string"},
                },
                required=("type",),
            ),
            "description": (
                "content events carry text; the last is done (session_id and usage or "
                "tokens_used); a stream the gateway had to end early ends with one error event"
            ),
        },
        "Usage": _object(
            {
                "tenant": {"type": "string"},
                "buckets": {"type": "array", "items": bucket},
                "budgets": {"type": "array", "items": budget},
                "timezone": {"type": "string", "examples": ["Europe/Berlin"]},
                "streams": {"type": "array", "items": stream_cap},
                "tokens_today": {
                    **count,
                    "description": "tokens charged to the tenant today, every key and agent: "
                    "the usage ledger's day in `timezone`, which is when daily budgets reset",
                },
                "concurrent_streams": _object(
                    {
                        "limit": {"type": ["integer", "null"], "minimum": 0},
                        "active": count,
                    },
                    required=("limit", "active"),
                ),
            },
            required=(
                "tenant",
                "buckets",
                "budgets",
                "timezone",
                "streams",
                "tokens_today",
                "concurrent_streams",
            ),
        ),
        "Error": _object(
            {
                "error": _object(
                    {
                        "code": {
                            "type": "string",
                            "examples": ["invalid_request", "agent_not_found"],
                        },
                        "message": {"type": "string"},
                    },
                    required=("code", "message"),
                )
            },
            required=("error",),
        ),
    }


def _headers() -> dict[str, Any]:
    def integer(description: str, minimum: int | None = 0) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "integer"}
        if minimum is not None:
            schema["minimum"] = minimum
        return {"description": description, "schema": schema}

    return {
        "X-Request-ID": {
            "description": "The caller's own id when sane, else the gateway's; in every log line",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        },
        "X-RateLimit-Limit": integer("the tenant's requests per minute"),
        "X-RateLimit-Remaining": integer("requests left in the per-minute bucket"),
        "X-RateLimit-Reset": integer("epoch seconds when the per-minute bucket is full again"),
        "X-RateLimit-Remaining-Tokens": integer("tokens left in the tightest token bucket"),
        "RateLimit-Policy": {"schema": {"type": "string"}, "description": "IETF draft field"},
        "RateLimit": {"schema": {"type": "string"}, "description": "IETF draft field"},
        "Retry-After": integer("whole seconds until the request would pass"),
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"},
    }
