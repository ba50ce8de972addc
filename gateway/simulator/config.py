"""What the simulated api.thinnest.ai knows: its agents, keys, rate limit and pacing.

`SimulatorConfig()` is ready for tests (demo agents and keys, 60/min and 10,000/day like the
documented Pro tier, no delay between stream events). `load_simulator_config(None)` is the demo
set-up: the same agents and keys with generous limits and a visible 20 ms between events.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import yaml

UsageFormat = Literal["documented", "usage", "tokens_used"]
USAGE_FORMATS: tuple[UsageFormat, ...] = ("documented", "usage", "tokens_used")
# How stream events are separated: a blank line after each (`data: {...}\n\n`, SSE as WHATWG
# defines it), or none (`data: {...}\n`, one line per event, as the deployment guide prints
# its stream and its Node client reads it).
StreamFraming = Literal["blank_lines", "lines"]
STREAM_FRAMINGS: tuple[StreamFraming, ...] = ("blank_lines", "lines")

AGENT_KEY_PREFIX = "ak_"
PLATFORM_KEY_PREFIX = "thns_sk_"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """One upstream agent; `keys` are its agent API keys (`ak_*`), valid for it alone."""

    name: str
    keys: tuple[str, ...] = ()
    usage_format: UsageFormat = "documented"
    stream_framing: StreamFraming = "blank_lines"


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Fixed windows per API key, as upstream's per-tier limits."""

    per_minute: int = 60
    per_day: int = 10_000


def _demo_agents() -> Mapping[str, AgentConfig]:
    return {
        "ag_support": AgentConfig(name="Support", keys=("ak_demo_support_0001",)),
        "ag_sales": AgentConfig(name="Sales"),
    }


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    agents: Mapping[str, AgentConfig] = field(default_factory=_demo_agents)
    platform_keys: tuple[str, ...] = ("thns_sk_demo_0001",)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    chunk_interval: float = 0.0
    # Both bounds keep memory flat however long a benchmark runs.
    max_sessions: int = 10_000
    max_recorded_requests: int = 1_000

    def __post_init__(self) -> None:
        # A read-only copy, so the caller's dict cannot change a running simulator.
        object.__setattr__(self, "agents", MappingProxyType(dict(self.agents)))


DEMO_CONFIG = SimulatorConfig(
    rate_limit=RateLimitConfig(per_minute=600, per_day=100_000),
    chunk_interval=0.02,
)

_TOP_LEVEL_KEYS = frozenset(
    {
        "agents",
        "platform_keys",
        "rate_limit",
        "chunk_interval",
        "max_sessions",
        "max_recorded_requests",
    }
)
_AGENT_KEYS = frozenset({"name", "keys", "usage_format", "stream_framing"})
_RATE_LIMIT_KEYS = frozenset({"per_minute", "per_day"})


def load_simulator_config(path: str | None) -> SimulatorConfig:
    """Read a YAML file; `None` gives the built-in demo configuration.

    Raises ValueError naming the YAML path of the first problem, e.g.
    `agents.ag_support.keys[0]: expected a string (in sim.yaml)`.
    """
    if path is None:
        return DEMO_CONFIG
    with open(path, encoding="utf-8") as stream:
        try:
            data = yaml.safe_load(stream)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_simulator_config(data)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {path})") from None


def parse_simulator_config(data: object) -> SimulatorConfig:
    """Build a config from already-parsed YAML; an empty document means all defaults."""
    if data is None:
        return SimulatorConfig()
    root = _mapping(data, "<root>", _TOP_LEVEL_KEYS)
    defaults = SimulatorConfig()
    agents = _agents(root["agents"]) if "agents" in root else defaults.agents
    platform_keys = (
        _keys(root["platform_keys"], "platform_keys", PLATFORM_KEY_PREFIX)
        if "platform_keys" in root
        else defaults.platform_keys
    )
    if set(platform_keys) & {key for agent in agents.values() for key in agent.keys}:
        raise ValueError("platform_keys: a key cannot be both a platform key and an agent key")
    return SimulatorConfig(
        agents=agents,
        platform_keys=platform_keys,
        rate_limit=(
            _rate_limit(root["rate_limit"]) if "rate_limit" in root else defaults.rate_limit
        ),
        chunk_interval=(
            _non_negative_number(root["chunk_interval"], "chunk_interval")
            if "chunk_interval" in root
            else defaults.chunk_interval
        ),
        max_sessions=(
            _positive_int(root["max_sessions"], "max_sessions")
            if "max_sessions" in root
            else defaults.max_sessions
        ),
        max_recorded_requests=(
            _positive_int(root["max_recorded_requests"], "max_recorded_requests")
            if "max_recorded_requests" in root
            else defaults.max_recorded_requests
        ),
    )


def _agents(value: object) -> dict[str, AgentConfig]:
    entries = _mapping(value, "agents", None)
    agents: dict[str, AgentConfig] = {}
    owner: dict[str, str] = {}
    for agent_id, raw in entries.items():
        where = f"agents.{agent_id}"
        if not agent_id:
            raise ValueError(f"{where}: an agent id must be a non-empty string")
        body = _mapping({} if raw is None else raw, where, _AGENT_KEYS)
        keys = _keys(body.get("keys", []), f"{where}.keys", AGENT_KEY_PREFIX)
        for index, key in enumerate(keys):
            if key in owner:
                raise ValueError(
                    f"{where}.keys[{index}]: this key already belongs to agent {owner[key]}; "
                    "an agent key is valid for one agent only"
                )
            owner[key] = agent_id
        usage_format = body.get("usage_format", "documented")
        if usage_format not in USAGE_FORMATS:
            raise ValueError(f"{where}.usage_format: expected one of {', '.join(USAGE_FORMATS)}")
        stream_framing = body.get("stream_framing", "blank_lines")
        if stream_framing not in STREAM_FRAMINGS:
            raise ValueError(
                f"{where}.stream_framing: expected one of {', '.join(STREAM_FRAMINGS)}"
            )
        agents[agent_id] = AgentConfig(
            name=_non_empty_string(body.get("name", agent_id), f"{where}.name"),
            keys=keys,
            usage_format=usage_format,
            stream_framing=stream_framing,
        )
    return agents


def _rate_limit(value: object) -> RateLimitConfig:
    body = _mapping(value, "rate_limit", _RATE_LIMIT_KEYS)
    defaults = RateLimitConfig()
    return RateLimitConfig(
        per_minute=_positive_int(
            body.get("per_minute", defaults.per_minute), "rate_limit.per_minute"
        ),
        per_day=_positive_int(body.get("per_day", defaults.per_day), "rate_limit.per_day"),
    )


def _mapping(value: object, where: str, allowed: frozenset[str] | None) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping")
    result: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {key!r}")
        if allowed is not None and key not in allowed:
            raise ValueError(
                f"{_join(where, key)}: unknown key (expected one of {', '.join(sorted(allowed))})"
            )
        result[key] = item
    return result


def _keys(value: object, where: str, prefix: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of strings")
    keys: list[str] = []
    for index, item in enumerate(value):
        key = _non_empty_string(item, f"{where}[{index}]")
        if not key.startswith(prefix) or key == prefix:
            raise ValueError(f"{where}[{index}]: expected a key starting with {prefix!r}")
        if key in keys:
            raise ValueError(f"{where}[{index}]: duplicate key")
        keys.append(key)
    return tuple(keys)


def _non_empty_string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string")
    if not value:
        raise ValueError(f"{where}: expected a non-empty string")
    return value


def _positive_int(value: object, where: str) -> int:
    # bool is an int subclass; `per_minute: yes` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer")
    if value < 1:
        raise ValueError(f"{where}: expected an integer of at least 1")
    return value


def _non_negative_number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: expected a finite number of at least 0")
    return float(value)


def _join(where: str, key: str) -> str:
    return key if where == "<root>" else f"{where}.{key}"
