"""A self-contained local stand-in for api.thinnest.ai, for demos, tests and benchmarks."""

from .app import create_simulator_app
from .config import (
    AgentConfig,
    RateLimitConfig,
    SimulatorConfig,
    load_simulator_config,
    parse_simulator_config,
)
from .state import HELD_STREAMS

__all__ = [
    "HELD_STREAMS",
    "AgentConfig",
    "RateLimitConfig",
    "SimulatorConfig",
    "create_simulator_app",
    "load_simulator_config",
    "parse_simulator_config",
]
