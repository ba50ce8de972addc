"""Every error the gateway itself answers with, and the one place they are rendered.

    GatewayError                    status  code
     ├── InvalidRequest               400   invalid_request
     ├── Unauthorized                 401   unauthorized
     ├── AgentNotFound                404   agent_not_found
     ├── RouteNotFound                404   not_found
     ├── MethodNotAllowed             405   method_not_allowed
     ├── RequestTooLarge              413   request_too_large
     ├── RateLimited                  429   rate_limited
     ├── UpstreamUnavailable          502   upstream_unavailable
     │    └── UpstreamUnreached       502   upstream_unavailable  (nothing was sent)
     ├── Unavailable                  503   unavailable
     └── UpstreamTimeout              504   upstream_timeout
          └── UpstreamConnectTimeout  504   upstream_timeout      (nothing was sent)

    ConfigError                     (start-up only; never reaches a caller)

Upstream errors are not in this tree: they pass through with upstream's own status and body.
Messages are written for the caller and must never contain a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


class GatewayError(Exception):
    """An error the gateway answers itself, with a stable status and code."""

    status: int = 500
    code: str = "internal_error"
    # True when the request never reached upstream, so upstream did no work for it.
    unsent: bool = False

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: Mapping[str, str] = headers or {}


class InvalidRequest(GatewayError):
    """The body or a parameter is not what the API accepts."""

    status = 400
    code = "invalid_request"


class Unauthorized(GatewayError):
    """No gateway key, or one the configuration does not know."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class AgentNotFound(GatewayError):
    """The agent does not exist or the caller's tenant may not use it (deliberately the same)."""

    status = 404
    code = "agent_not_found"


class RouteNotFound(GatewayError):
    """No route at this path."""

    status = 404
    code = "not_found"


class MethodNotAllowed(GatewayError):
    """The path exists but not for this method."""

    status = 405
    code = "method_not_allowed"


class RequestTooLarge(GatewayError):
    """The body is over `limits.max_body_bytes`."""

    status = 413
    code = "request_too_large"


class RateLimited(GatewayError):
    """A quota refused the request; `Retry-After` says when it would pass."""

    status = 429
    code = "rate_limited"


class UpstreamUnavailable(GatewayError):
    """api.thinnest.ai could not be reached or broke the connection."""

    status = 502
    code = "upstream_unavailable"


class UpstreamUnreached(UpstreamUnavailable):
    """Upstream never received the request (no connection, or the breaker held it back), so
    it did no work for it: the admission refunds the request in full."""

    unsent = True


class Unavailable(GatewayError):
    """The gateway is not serving (shutting down, or a required backend is down)."""

    status = 503
    code = "unavailable"


class UpstreamTimeout(GatewayError):
    """api.thinnest.ai did not answer within `upstream.timeouts`."""

    status = 504
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """No connection to upstream within `timeouts.connect`: the request never left."""

    unsent = True


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the YAML path."""


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def render(error: GatewayError, request_id: str) -> web.Response:
    """The only place a gateway error becomes an HTTP response."""
    response = web.Response(
        status=error.status,
        body=error_body(error.code, error.message),
        content_type="application/json",
    )
    response.headers.update(error.headers)
    response.headers["X-Request-ID"] = request_id
    return response
