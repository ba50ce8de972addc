"""Typed keys for everything the simulator remembers; all of it lives on the app."""

from __future__ import annotations

from aiohttp import web

from .auth import KeyIndex
from .config import SimulatorConfig
from .faults import FaultBook
from .holds import HeldStreams
from .ratelimit import RateLimiter
from .recorder import RequestRecorder
from .sessions import SessionStore

CONFIG = web.AppKey("simulator_config", SimulatorConfig)
KEYS = web.AppKey("simulator_keys", KeyIndex)
SESSIONS = web.AppKey("simulator_sessions", SessionStore)
RATE_LIMITER = web.AppKey("simulator_rate_limiter", RateLimiter)
FAULTS = web.AppKey("simulator_faults", FaultBook)
HELD_STREAMS = web.AppKey("simulator_held_streams", HeldStreams)
REQUESTS = web.AppKey("simulator_requests", RequestRecorder)
