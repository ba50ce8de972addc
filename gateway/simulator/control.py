"""The `/_sim/` control API: inject faults, release held streams, inspect what arrived.

Not part of upstream's contract, and unauthenticated: the simulator is a local test double.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from .responses import error_response, json_response
from .state import FAULTS, HELD_STREAMS, RATE_LIMITER, REQUESTS, SESSIONS

MAX_HELD_WAIT = 60.0


async def add_fault(request: web.Request) -> web.Response:
    try:
        spec = await request.json()
    except ValueError:
        return error_response(400, "Request body must be a JSON object.")
    try:
        fault = request.app[FAULTS].add(spec)
    except ValueError as exc:
        return error_response(400, str(exc))
    return json_response(fault.to_json(), status=201)


async def list_faults(request: web.Request) -> web.Response:
    return json_response({"faults": [fault.to_json() for fault in request.app[FAULTS].active()]})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS].clear()
    return web.Response(status=204)


async def release(request: web.Request) -> web.Response:
    return json_response({"released": request.app[HELD_STREAMS].release()})


async def held(request: web.Request) -> web.Response:
    """`?at_least=N[&timeout=S]` long-polls until N streams are held (or S seconds pass)."""
    streams = request.app[HELD_STREAMS]
    if "at_least" in request.query:
        try:
            at_least = int(request.query["at_least"])
            timeout = float(request.query.get("timeout", "5"))
        except ValueError:
            return error_response(400, "'at_least' must be an integer, 'timeout' a number.")
        if at_least < 0 or not (math.isfinite(timeout) and 0 <= timeout <= MAX_HELD_WAIT):
            message = f"'at_least' must be >= 0 and 'timeout' between 0 and {MAX_HELD_WAIT:g}."
            return error_response(400, message)
        try:
            async with asyncio.timeout(timeout):
                await streams.wait_for(at_least)
        except TimeoutError:
            pass
    return json_response({"held": streams.count})


async def list_requests(request: web.Request) -> web.Response:
    return json_response(request.app[REQUESTS].to_json())


async def clear_requests(request: web.Request) -> web.Response:
    request.app[REQUESTS].clear()
    return web.Response(status=204)


async def reset(request: web.Request) -> web.Response:
    """Forget everything between test cases or benchmark runs that share one simulator."""
    app = request.app
    app[FAULTS].clear()
    app[REQUESTS].clear()
    app[SESSIONS].clear()
    app[RATE_LIMITER].clear()
    app[HELD_STREAMS].release()
    return web.Response(status=204)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/_sim/faults", add_fault)
    app.router.add_get("/_sim/faults", list_faults)
    app.router.add_delete("/_sim/faults", clear_faults)
    app.router.add_post("/_sim/release", release)
    app.router.add_get("/_sim/held", held)
    app.router.add_get("/_sim/requests", list_requests)
    app.router.add_delete("/_sim/requests", clear_requests)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_get("/healthz", healthz)
