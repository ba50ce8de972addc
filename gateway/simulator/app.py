"""The simulator as an aiohttp application: upstream's chat endpoint plus `/_sim/` controls."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from . import control
from .auth import KeyIndex
from .chat import chat
from .config import SimulatorConfig
from .faults import FaultBook
from .holds import HeldStreams
from .ratelimit import RateLimiter
from .recorder import RequestRecorder
from .sessions import SessionStore
from .state import CONFIG, FAULTS, HELD_STREAMS, KEYS, RATE_LIMITER, REQUESTS, SESSIONS

MAX_BODY_BYTES = 16 * 2**20


def create_simulator_app(
    config: SimulatorConfig, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """`clock` (epoch seconds) drives the rate-limit windows, so tests need not sleep."""
    # Upstream documents no body limit; the gateway enforces its own (limits.max_body_bytes),
    # so the stand-in takes what a gateway configured for large messages may send.
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[CONFIG] = config
    app[KEYS] = KeyIndex(config)
    app[SESSIONS] = SessionStore(config.max_sessions)
    app[RATE_LIMITER] = RateLimiter(config.rate_limit, clock)
    app[FAULTS] = FaultBook()
    app[HELD_STREAMS] = HeldStreams()
    app[REQUESTS] = RequestRecorder(config.max_recorded_requests)
    app.router.add_post("/v1/agents/{agent_id}/chat", chat)
    control.add_routes(app)
    app.on_shutdown.append(_unpark)
    return app


async def _unpark(app: web.Application) -> None:
    # Held and hanging handlers would otherwise hold up shutdown for its full timeout.
    app[HELD_STREAMS].close()
