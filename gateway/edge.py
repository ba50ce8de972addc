"""Below the apps, where aiohttp answers on its own: a malformed request head, and how many
connections the caller port holds. Both ports are served by an `EdgeRunner`.

    EdgeRunner (web.AppRunner) ──_make_server──▶ EdgeServer (web.Server, one per port)
                                                   ├─ connection_made: past max_connections,
                                                   │  the new connection is closed at once
                                                   └─ __call__ ──▶ EdgeHandler (RequestHandler)
                                                                     └─ handle_error: our JSON

aiohttp renders a request head it cannot parse (`RequestHandler.handle_error`) as a text/plain
400 that quotes the raw bytes back, the caller's Authorization included, and logs them. Here it
is the gateway's error body with an `X-Request-ID`, never a byte of the request, and one log
line per interval for all of them (the kind of the first, and how many were held back),
without the bytes.

The hook: aiohttp builds the Server inside `Application._make_handler` and each connection's
RequestHandler inside `Server.__call__`, with no parameter for either class. So the runner's
`_make_server` (the method every BaseRunner implements) takes the Server aiohttp built and makes
it an EdgeServer, a subclass adding no state of aiohttp's and overriding only public methods
(`__call__`, `connection_made`, `connection_lost`); each handler it makes becomes an
EdgeHandler likewise (`handle_error`, whose signature is aiohttp's public one). Nothing reads or
writes aiohttp's private attributes.
"""

from __future__ import annotations

import asyncio
import os
import resource
from typing import Any, ClassVar, cast

import structlog
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway import errors
from gateway.headers import SERVER
from gateway.outages import FailureLog

log = structlog.get_logger("gateway.edge")

RESERVED_DESCRIPTORS = 128
"""Descriptors kept back from the caller port when `listen.max_connections` is derived from the
descriptor limit: Redis connections, the admin port's, listening sockets, log and config
files."""
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"
"""asyncio's message when accept() fails for want of descriptors or memory (EMFILE, ...)."""


def default_max_connections() -> int:
    """Half of what the descriptor limit leaves after RESERVED_DESCRIPTORS: every caller
    connection may hold an upstream connection of its own."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


class MalformedRequest(Exception):
    """What the log line about a malformed request names (aiohttp's exception would bring its
    unrelated context along, and its text quotes the request)."""


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server answers malformed requests in the gateway's shape and, with
    `max_connections`, closes connections past it at once (counted in `refused`)."""

    def __init__(
        self,
        app: web.Application,
        *,
        name: str,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        """`name` (e.g. the port's address) is what its log lines say as `peer`."""
        super().__init__(app, **kwargs)
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.refused = 0
        self.admitted: set[RequestHandler] = set()  # the connections open now
        self.malformed = FailureLog(log, "malformed request refused", name)
        self.refusals = FailureLog(log, "connections refused: max_connections reached", name)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = EdgeServer
        edge = cast(EdgeServer, server)
        edge.edge = self

        class Handler(EdgeHandler):
            __slots__ = ()
            runner = self

        edge.handler_class = Handler
        return edge


class EdgeServer(web.Server):
    """aiohttp's Server, with the connection cap and EdgeHandler (see the module docstring)."""

    edge: EdgeRunner
    handler_class: type[EdgeHandler]  # EdgeHandler, knowing this server's runner

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = self.handler_class  # the same slots: only methods differ
        return handler

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        edge = self.edge
        limit = edge.max_connections
        if limit is not None and len(edge.admitted) >= limit:
            # Closed before the handler reads a byte (its connection_lost follows): the
            # descriptor is free again at once, and the connections held are served on.
            edge.refused += 1
            edge.refusals.failed(ConnectionRefusedError(), max_connections=limit)
            transport.close()
            return
        edge.admitted.add(handler)
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.edge.admitted.discard(handler)
        super().connection_lost(handler, exc)


class EdgeHandler(RequestHandler):
    """One connection's handler; only the response to what aiohttp refuses itself differs."""

    __slots__ = ()
    runner: ClassVar[EdgeRunner]  # set on the subclass each EdgeRunner makes

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for a request head it could not parse (400), a handler that raised
        past the middleware (500) or timed out (504): the gateway's error body, never `message`
        (it quotes the request) and never the request's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error response can follow")
        error: errors.GatewayError
        if status < 500:
            # The class names the malformation (BadHttpMessage, LineTooLong, InvalidHeader…);
            # its text would quote the bytes.
            what = type(exc).__name__ if exc is not None else "malformed"
            error = errors.InvalidRequest(f"the request is not valid HTTP ({what})")
            error.status = status
            # One line per interval for all of them: the kind of the first, how many since.
            self.runner.malformed.failed(MalformedRequest(), kind=what)
        else:
            log.error("unhandled error", status=status, exc_info=exc)
            error = errors.GatewayError("the gateway failed on this request; it has been logged")
        response = errors.render(error, os.urandom(16).hex())
        response.headers[hdrs.SERVER] = SERVER
        response.force_close()
        return response


def log_accept_errors(loop: asyncio.AbstractEventLoop, name: str) -> None:
    """asyncio logs every failed accept() (EMFILE: out of descriptors) with a traceback, and
    retries each second per listening socket: here it is one line per interval, with the
    count held back in between. Every other exception the loop reports goes on as before."""
    failures = FailureLog(log, "accept failed", name)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_OUT_OF_RESOURCES and isinstance(exc, OSError):
            failures.failed(exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
