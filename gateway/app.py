"""create_app(config): everything the gateway is, wired in one place."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from gateway import errors
from gateway.accounting import Drains, usage_headers
from gateway.auth import KeyRing
from gateway.config import Config
from gateway.logs import AccessRecord, access_logger
from gateway.proxy import chat
from gateway.quota import open_quota
from gateway.state import (
    ACCESS,
    CLOCK,
    CONFIG,
    DRAINS,
    KEYRING,
    LIFECYCLE,
    QUOTA,
    UPSTREAM,
    Lifecycle,
)
from gateway.upstream import UpstreamClient

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A caller's own request id is kept when it is this sane; anything else is replaced, so a
# hostile id never reaches logs or upstream headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Abandoned streams read on at once to charge their tokens; past this, the charge is estimated.
MAX_CONCURRENT_DRAINS = 1024
_QUIET_PATHS = frozenset({"/healthz", "/readyz"})


def create_app(config: Config, *, clock: Clock = time.monotonic) -> web.Application:
    app = web.Application(
        middlewares=[edge_middleware],
        # aiohttp refuses larger bodies itself; validation turns that into our 413.
        client_max_size=config.limits.max_body_bytes,
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[KEYRING] = KeyRing(config.tenants)
    app[LIFECYCLE] = Lifecycle()
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_quota)
    app.router.add_post("/v1/agents/{agent_id}/chat", chat)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.on_shutdown.append(_start_draining)
    return app


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = UpstreamClient.open_session(config.upstream)
    app[UPSTREAM] = UpstreamClient(config.upstream, config.agents, session)
    yield
    await session.close()


async def _quota(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # A stream cannot outlive upstream's total timeout plus its drain; past that (plus slack)
    # a lease can only belong to a replica that crashed.
    lease_ttl = config.upstream.timeouts.total + config.quota.drain_timeout + 30
    # Settle markers only guard against a settle sent twice in quick succession; a short
    # life keeps one key per request from piling up in Redis.
    async with open_quota(
        config.quota, config.tenants, clock=app[CLOCK], lease_ttl=lease_ttl, settled_ttl=60
    ) as quota:
        app[QUOTA] = quota
        app[DRAINS] = Drains(config.quota.drain_timeout, MAX_CONCURRENT_DRAINS)
        yield
        await app[DRAINS].close()


async def _start_draining(app: web.Application) -> None:
    app[LIFECYCLE].draining = True


def _request_id(request: web.Request) -> str:
    offered = request.headers.get("X-Request-ID")
    if offered is not None and _REQUEST_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, error rendering and the one access line: the edge of every request."""
    clock = request.app[CLOCK]
    record = AccessRecord(_request_id(request), request.method, request.path, clock())
    request[ACCESS] = record
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the caller disconnects: still one access line.
        record.client_closed = True
        record.status = 499  # nginx's "client closed request": nothing was sent in full
        access_logger.info("request", **record.fields(clock()))
        raise
    except errors.GatewayError as exc:
        record.error = exc.code
        response = errors.render(exc, record.request_id)
    except web.HTTPException as exc:
        error = _from_http(exc)
        record.error = error.code
        response = errors.render(error, record.request_id)
    except Exception:
        access_logger.exception("unhandled error", request_id=record.request_id)
        error = errors.GatewayError("the gateway failed on this request; it has been logged")
        record.error = error.code
        response = errors.render(error, record.request_id)
    if not response.prepared:
        for name, value in record.extra_headers.items():
            response.headers.setdefault(name, value)
        response.headers["X-Request-ID"] = record.request_id
    record.status = response.status
    log = access_logger.debug if request.path in _QUIET_PATHS else access_logger.info
    log("request", **record.fields(clock()))
    return response


def _from_http(exc: web.HTTPException) -> errors.GatewayError:
    if exc.status == 404:
        return errors.RouteNotFound("no such path; the chat API is POST /v1/agents/{id}/chat")
    if exc.status == 405:
        return errors.MethodNotAllowed("this path does not accept this method")
    if exc.status == 413:
        return errors.RequestTooLarge("request body is too large")
    if exc.status < 500:
        return errors.InvalidRequest(exc.reason)
    return errors.GatewayError(exc.reason)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[LIFECYCLE].draining:
        raise errors.Unavailable("the gateway is shutting down")
    return web.json_response(
        {
            "status": "ready",
            "quota_backend": request.app[CONFIG].quota.backend,
            "quota_state": request.app[QUOTA].state,
        }
    )


async def usage(request: web.Request) -> web.Response:
    """The calling tenant's own buckets and tokens used today."""
    caller = request.app[KEYRING].authenticate(request.headers.get(hdrs.AUTHORIZATION))
    request[ACCESS].tenant, request[ACCESS].key_name = caller.tenant.name, caller.key_name
    body = await request.app[QUOTA].usage(caller.tenant.name)
    return web.json_response(body, headers=usage_headers(body))


def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM; in-flight requests get `shutdown_grace` seconds to finish."""
    structlog.get_logger("gateway").info(
        "starting", listen=f"{config.listen.host}:{config.listen.port}", config=config.source
    )
    web.run_app(
        create_app(config),
        host=config.listen.host,
        port=config.listen.port,
        access_log=None,
        shutdown_timeout=config.shutdown_grace,
        # A caller gone before upstream answered cancels the upstream request; a stream's
        # caller gone mid-way hands the upstream response to a drain (see accounting.py).
        handler_cancellation=True,
        print=None,
    )
