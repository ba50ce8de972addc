"""create_app(config): everything the gateway is, wired in one place."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType

import structlog
from aiohttp import hdrs, web
from prometheus_client.registry import Collector

from gateway import errors, report
from gateway.auth import end_user_of
from gateway.config import EVENT_LOOP, Config, EventLoop, event_loop
from gateway.drains import Drains
from gateway.edge import EdgeRunner, default_max_connections, log_accept_errors
from gateway.headers import add_caller_headers, buckets_of, name_server
from gateway.logs import AccessRecord, access_logger
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import (
    KeyExpiry,
    Metrics,
    UpstreamCircuits,
    connections_refused,
    quota_backend_errors,
    stream_drains,
)
from gateway.openapi import openapi
from gateway.pacing import Pacer
from gateway.proxy import authenticate, chat
from gateway.quota import open_quota
from gateway.quota.service import BACKEND_ERRORS
from gateway.reload import reload_config
from gateway.state import (
    ACCESS,
    CERTIFICATE,
    CLOCK,
    CONFIG,
    DRAINS,
    GATEWAY,
    LIFECYCLE,
    LIMITER,
    LIMITS,
    METRICS,
    QUOTA,
    STREAM_PACER,
    TENANCY,
    TRACE,
    TRACING,
    UPSTREAM,
    WALL_CLOCK,
    Lifecycle,
)
from gateway.tenancy import Tenancy, TenancyHolder
from gateway.tls import ServerCertificate
from gateway.tracing import CHAT_ROUTE, open_tracing
from gateway.upstream import UpstreamClient
from gateway.upstream_limits import UpstreamLimiter

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A caller's own request id is kept when it is this sane; anything else is replaced, so a
# hostile id never reaches logs or upstream headers.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# ...and one that looks like a key (ours, an agent's, a platform key) is replaced too: it would
# be logged and sent upstream, and a caller pasting its key there must not leak it.
_KEY_PREFIXES = ("gw_", "ak_", "thns_")
KEEPALIVE_TIMEOUT = 75.0
LEASE_TTL = 30.0
"""Seconds a stream lease lives unless renewed. The quota service renews the leases of every
stream open here every 10 s, however long the stream; only a crashed replica's lapse, within
this."""
_QUIET_PATHS = frozenset({"/healthz", "/readyz"})


def create_app(
    config: Config, *, clock: Clock = time.monotonic, wall_clock: Clock = time.time
) -> web.Application:
    """`clock` times everything the gateway waits for and refills; `wall_clock` is the
    calendar's (key expiry)."""
    app = web.Application(
        middlewares=[edge_middleware],
        # aiohttp refuses larger bodies itself; validation turns that into our 413.
        client_max_size=config.limits.max_body_bytes,
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[WALL_CLOCK] = wall_clock
    # Everything a reload changes, in one value; the parts below read theirs through it.
    tenancy = app[TENANCY] = TenancyHolder(Tenancy.of(config))
    app[LIFECYCLE] = Lifecycle()
    app[METRICS] = Metrics(lambda: tenancy.current.labels)
    app[METRICS].registry.register(KeyExpiry(lambda: tenancy.current.expiries))
    app[LIMITER] = UpstreamLimiter(lambda: tenancy.current.upstream_limits)
    app[STREAM_PACER] = Pacer()
    if config.listen.tls is not None:
        app[CERTIFICATE] = ServerCertificate(config.listen.tls)
    # First in, last out: spans of requests drained at shutdown are still exported.
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_quota)
    app.router.add_post("/v1/agents/{agent_id}/chat", chat, name=CHAT_ROUTE)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.on_response_prepare.append(add_caller_headers)
    app.on_shutdown.append(_start_draining)
    return app


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    tracing = app[TRACING] = open_tracing(config)
    if config.tracing.otlp_endpoint is not None:
        structlog.get_logger("gateway.tracing").info(
            "tracing on",
            otlp_endpoint=str(config.tracing.otlp_endpoint),
            sample_ratio=config.tracing.sample_ratio,
        )
    yield
    await tracing.close()


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    config, tenancy = app[CONFIG], app[TENANCY]
    session = UpstreamClient.open_session(config.upstream)
    upstream = app[UPSTREAM] = UpstreamClient(
        config.upstream,
        lambda: tenancy.current.upstream_keys,
        session,
        clock=app[CLOCK],
        agents=lambda: tenancy.current.labels.agents,
    )
    with _sampled(app, UpstreamCircuits(upstream.circuits.states)):
        yield
    await session.close()


async def _quota(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # Settle markers only guard against a settle sent twice in quick succession; a short
    # life keeps one key per request from piling up in Redis.
    # Upstream keys' own limits are buckets in the same store, beside the tenants': the
    # tenancy in force has both.
    async with open_quota(
        config.quota,
        app[TENANCY],
        clock=app[CLOCK],
        wall_clock=app[WALL_CLOCK],
        lease_ttl=LEASE_TTL,
        settled_ttl=60,
    ) as quota:
        app[METRICS].budget_source = quota.budget_ratios
        app[QUOTA] = quota
        quota_config = config.quota
        drains = app[DRAINS] = Drains(
            quota_config.drain_timeout, quota_config.max_drains, quota_config.drain_max_bytes
        )
        with _sampled(
            app,
            quota_backend_errors(lambda: quota.backend_errors),
            stream_drains(drains.__len__),
        ):
            yield
            await drains.close()


@contextlib.contextmanager
def _sampled(app: web.Application, *collectors: Collector) -> Iterator[None]:
    """Registered on the app's registry for as long as what they read exists."""
    registry = app[METRICS].registry
    for collector in collectors:
        registry.register(collector)
    try:
        yield
    finally:
        for collector in collectors:
            registry.unregister(collector)


async def _start_draining(app: web.Application) -> None:
    app[LIFECYCLE].draining = True


def _new_request_id() -> str:
    # uuid4's randomness (os.urandom) without building a UUID object: it is only ever hex.
    return os.urandom(16).hex()


def _request_id(request: web.Request) -> str:
    offered = request.headers.get("X-Request-ID")
    if (
        offered is not None
        and _REQUEST_ID.fullmatch(offered)
        and not offered.lower().startswith(_KEY_PREFIXES)
    ):
        return offered
    return _new_request_id()


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, error rendering, the access line and metrics: the edge of every request."""
    record = AccessRecord(_request_id(request), request.method, request.path, request.app[CLOCK]())
    request[ACCESS] = record
    request[TRACE] = request.app[TRACING].begin(request, record)
    inflight = request.app[METRICS].inflight
    inflight.inc()
    try:
        response = await _answer(request, handler, record)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the caller disconnects: still one access line.
        record.client_closed = True
        record.status = 499  # nginx's "client closed request": nothing was sent in full
        _finished(request, record)
        raise
    finally:
        inflight.dec()
    # nginx's 499: the caller closed the connection before the response was complete.
    record.status = 499 if record.client_closed else response.status
    _finished(request, record)
    return response


async def _answer(
    request: web.Request, handler: Handler, record: AccessRecord
) -> web.StreamResponse:
    """The handler's response, or the rendering of whatever it raised."""
    try:
        if request.app[LIFECYCLE].draining and request.path not in _QUIET_PATHS:
            # In-flight work finishes; new work goes to another replica.
            raise errors.Unavailable("this gateway is shutting down; send the request again")
        return await handler(request)
    except errors.GatewayError as exc:
        error = exc
    except web.HTTPException as exc:
        error = _from_http(exc)
    except Exception:
        access_logger.exception("unhandled error", request_id=record.request_id)
        error = errors.GatewayError("the gateway failed on this request; it has been logged")
    record.error = error.code
    response = errors.render(error, record.request_id)
    if request.app[LIFECYCLE].draining:
        response.force_close()  # a keep-alive caller reconnects, to a replica that is up
    return response


def _finished(request: web.Request, record: AccessRecord) -> None:
    finished = request.app[CLOCK]()
    request[TRACE].finished(record)
    if request.path in _QUIET_PATHS:
        access_logger.debug("request", **record.fields(finished))
        return
    access_logger.info("request", **record.fields(finished))
    request.app[METRICS].finished(record, finished - record.started)


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
    """The caller port's: ready or not, and nothing more (anyone may ask it; the quota
    backend's state is the admin port's to tell)."""
    try:
        _readiness(request.app)
    except errors.Unavailable:
        raise errors.Unavailable("not ready") from None
    return web.json_response({"status": "ready"})


def _readiness(app: web.Application) -> dict[str, str]:
    """503 while shutting down, and while the quota backend is down under
    `on_backend_error: closed` (every request would be refused: send them elsewhere)."""
    if app[LIFECYCLE].draining:
        raise errors.Unavailable("the gateway is shutting down")
    quota = app[CONFIG].quota
    state = app[QUOTA].state
    if state != "ok" and quota.on_backend_error == "closed":
        raise errors.Unavailable(
            "the quota backend is unavailable and quota.on_backend_error is closed"
        )
    return {"status": "ready", "quota_backend": quota.backend, "quota_state": state}


def create_admin_app(gateway: web.Application) -> web.Application:
    """The admin listener's app: metrics, probes and usage reports of `gateway`, kept off the
    caller port."""
    admin = web.Application()
    admin.on_response_prepare.append(name_server)
    admin[GATEWAY] = gateway
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", admin_readyz)
    admin.router.add_get("/usage", usage_report)
    return admin


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY][METRICS].exposition()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def admin_readyz(request: web.Request) -> web.Response:
    try:
        return web.json_response(_readiness(request.app[GATEWAY]))
    except errors.GatewayError as exc:
        return errors.render(exc, _new_request_id())


async def usage_report(request: web.Request) -> web.Response:
    """`GET /usage?from=&to=&by=&format=json|csv`: the usage ledger as `thinnest-gateway usage`
    prints it (report.py), for every tenant: the admin port is the operator's."""
    gateway = request.app[GATEWAY]
    try:
        zone = gateway[CONFIG].quota.timezone
        query, fmt = report.params_query(request.query, today=report.today(zone, time.time()))
        rows = await gateway[QUOTA].ledger(query.first.isoformat(), query.last.isoformat())
    except report.ReportError as exc:
        return errors.render(errors.InvalidRequest(str(exc)), _new_request_id())
    except BACKEND_ERRORS:
        unreadable = errors.Unavailable("the quota backend did not answer; try again shortly")
        return errors.render(unreadable, _new_request_id())
    return web.Response(
        text=report.render(report.summarise(rows, query), fmt),
        content_type=report.CONTENT_TYPES[fmt],
    )


async def usage(request: web.Request) -> web.Response:
    """The calling tenant's own buckets and tokens used today."""
    caller = authenticate(request)
    body = await request.app[QUOTA].usage(
        caller.tenant.name, caller.key_name, end_user_of(request.headers, caller)
    )
    request[LIMITS] = buckets_of(body)
    return web.json_response(body)


def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM (in-flight requests get `shutdown_grace` seconds to finish);
    SIGHUP reloads tenants and agents from the same file (see reload.py). The event loop is
    THINNEST_GATEWAY_EVENT_LOOP's choice: by default uvloop when the `speed` extra installed
    it, else asyncio's own."""
    uvloop = _uvloop(event_loop())
    if uvloop is None:
        asyncio.run(_serve(config, loop_name="asyncio"))
    else:
        uvloop.run(_serve(config, loop_name="uvloop"))


def _uvloop(choice: EventLoop) -> ModuleType | None:
    """uvloop (the `speed` extra: a faster event loop, same behaviour) when `choice` takes it
    and it is installed; a ConfigError naming the extra when `choice` insists on it."""
    if choice == "asyncio":
        return None
    try:
        return importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "uvloop":
            raise errors.ConfigError(
                f"{EVENT_LOOP}=uvloop, but uvloop cannot be imported ({exc}): "
                "pip install 'thinnest-gateway[speed]'"
            ) from None
        return None


async def _serve(config: Config, *, loop_name: str) -> None:
    log = structlog.get_logger("gateway")
    app = create_app(config)
    # A caller gone before upstream answered cancels the upstream request; a stream's caller
    # gone mid-way hands the upstream response to a drain (see admission.py, drains.py).
    log_accept_errors(asyncio.get_running_loop(), f"{config.listen.host}:{config.listen.port}")
    max_connections = config.listen.max_connections or default_max_connections()
    # Both ports answer malformed requests in the gateway's shape; the caller port closes
    # connections past max_connections at once (see edge.py), the admin port has no cap.
    runner = EdgeRunner(
        app,
        name=f"{config.listen.host}:{config.listen.port}",
        max_connections=max_connections,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=config.shutdown_grace,
        # aiohttp has no timeout for reading a request head: an idle or slowly-sent one is
        # closed by this (its default is an hour).
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    admin_runner = EdgeRunner(
        create_admin_app(app),
        name=f"{config.admin.host}:{config.admin.port}",
        access_log=None,
        shutdown_timeout=1,
    )
    app[METRICS].registry.register(connections_refused(lambda: runner.refused))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, app)
    try:
        await admin_runner.setup()
        await runner.setup()
        await _listen(runner, config, "listen", app.get(CERTIFICATE))
        await _listen(admin_runner, config, "admin")
        certificate = app.get(CERTIFICATE)
        log.info(
            "started",
            listen=f"{config.listen.host}:{config.listen.port}",
            admin=f"{config.admin.host}:{config.admin.port}",
            config=config.source,
            event_loop=loop_name,
            max_connections=max_connections,
            **({"certificate_sha256": certificate.fingerprint} if certificate else {}),
        )
        await stop.wait()
        # /readyz answers 503 from now on and new requests are refused, on both ports, while
        # the requests and streams in flight get `shutdown_grace` seconds to finish.
        app[LIFECYCLE].draining = True
        log.info("stopping", grace_seconds=config.shutdown_grace)
    finally:
        # The admin port outlives the caller port, so the drain can be watched.
        await runner.cleanup()
        await admin_runner.cleanup()


async def _listen(
    runner: web.AppRunner,
    config: Config,
    section: str,
    certificate: ServerCertificate | None = None,
) -> None:
    where = config.listen if section == "listen" else config.admin
    context = certificate.context if certificate is not None else None
    try:
        await web.TCPSite(runner, where.host, where.port, ssl_context=context).start()
    except OSError as exc:
        raise errors.ConfigError(
            f"{config.source}: {section}: cannot listen on {where.host}:{where.port}: "
            f"{exc.strerror}"
        ) from None
