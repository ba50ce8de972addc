"""Injected upstream misbehaviour, chosen through the control API.

The gateway strips unknown request headers, so a test cannot ask for a fault per request; it
registers one here first. The newest fault that matches a request applies, and `times`
counts down once per request it affected.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

FaultKind = Literal[
    "slow_first_byte",
    "slow_drip",
    "drop_mid_stream",
    "hang",
    "rate_limited",
    "error",
    "hold_stream",
    "pause_stream",
    "hold_answer",
    "stream_unasked",
    "endless_stream",
]

# The parameters each kind accepts besides kind, agent_id and times.
_PARAMS: Mapping[str, tuple[str, ...]] = {
    "slow_first_byte": ("delay",),
    "slow_drip": ("interval",),
    "drop_mid_stream": ("after_events",),
    "hang": (),
    "rate_limited": ("retry_after",),
    "error": ("status", "code", "message"),
    "hold_stream": ("after_events",),
    # Silent for `delay` seconds after `after_events` events, then the rest: a model that
    # thinks before its first words (0) or mid-answer, as a load balancer's idle timer sees it.
    "pause_stream": ("after_events", "delay"),
    # Runs the turn, then holds its answer (before any header) until released: a model's
    # generation as a JSON caller meets it, and as a stream's caller before its first byte.
    "hold_answer": (),
    # Streams a request that did not ask for a stream: misbehaviour a gateway must survive.
    "stream_unasked": (),
    # Content events and never a `done`, `burst` per write, as fast as the client reads,
    # until it leaves: a runaway generation, which a gateway must bound (its drains above all).
    "endless_stream": ("burst",),
}
# These only make sense for a stream; a JSON request skips them and leaves `times` alone.
STREAM_ONLY: frozenset[str] = frozenset(
    {"slow_drip", "drop_mid_stream", "hold_stream", "pause_stream", "endless_stream"}
)
_COMMON = frozenset({"kind", "agent_id", "times"})


@dataclass(slots=True)
class Fault:
    id: int
    kind: FaultKind
    agent_id: str | None
    times: int | None
    """Requests it will still affect; None until cleared."""
    delay: float = 0.0
    interval: float = 0.0
    after_events: int = 0
    burst: int = 1
    retry_after: int = 1
    status: int = 500
    code: str = ""
    message: str = ""

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "id": self.id,
            "kind": self.kind,
            "agent_id": self.agent_id,
            "times": self.times,
        }
        for name in _PARAMS[self.kind]:
            body[name] = getattr(self, name)
        return body


class FaultBook:
    __slots__ = ("_faults", "_ids")

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, spec: object) -> Fault:
        """Validate a control-API body and register it; ValueError explains a bad one."""
        fault = parse_fault(spec, next(self._ids))
        self._faults.append(fault)
        return fault

    def take(self, agent_id: str, streaming: bool) -> Fault | None:
        """The fault this request suffers, if any, counting it against `times`."""
        if not self._faults:
            return None
        for index in range(len(self._faults) - 1, -1, -1):
            fault = self._faults[index]
            if fault.agent_id not in (None, agent_id):
                continue
            if not streaming and fault.kind in STREAM_ONLY:
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    del self._faults[index]
            return fault
        return None

    def active(self) -> list[Fault]:
        return list(self._faults)

    def clear(self) -> None:
        self._faults.clear()


def parse_fault(spec: object, fault_id: int) -> Fault:
    if not isinstance(spec, dict):
        raise ValueError("Expected a JSON object.")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in _PARAMS:
        raise ValueError(f"'kind' must be one of: {', '.join(_PARAMS)}.")
    params = _PARAMS[kind]
    unknown = sorted(set(spec) - _COMMON - set(params))
    if unknown:
        raise ValueError(f"Unknown field(s) for kind {kind!r}: {', '.join(unknown)}.")
    agent_id = spec.get("agent_id")
    if agent_id is not None and (not isinstance(agent_id, str) or not agent_id):
        raise ValueError("'agent_id' must be a non-empty string.")
    times = spec.get("times")
    if times is not None:
        times = _int(times, "times", minimum=1)
    fault = Fault(id=fault_id, kind=cast(FaultKind, kind), agent_id=agent_id, times=times)
    if kind == "slow_first_byte":
        fault.delay = _seconds(_required(spec, kind, "delay"), "delay")
    elif kind == "slow_drip":
        fault.interval = _seconds(_required(spec, kind, "interval"), "interval")
    elif kind in ("drop_mid_stream", "hold_stream"):
        fault.after_events = _int(spec.get("after_events", 1), "after_events", minimum=0)
    elif kind == "pause_stream":
        fault.after_events = _int(spec.get("after_events", 1), "after_events", minimum=0)
        fault.delay = _seconds(_required(spec, kind, "delay"), "delay")
    elif kind == "endless_stream":
        fault.burst = _int(spec.get("burst", 1), "burst", minimum=1, maximum=10_000)
    elif kind == "rate_limited":
        fault.retry_after = _int(spec.get("retry_after", 1), "retry_after", minimum=0)
    elif kind == "error":
        fault.status = _int(spec.get("status", 500), "status", minimum=400, maximum=599)
        fault.code = _string(spec.get("code", ""), "code")
        fault.message = _string(spec.get("message", ""), "message")
    return fault


def _required(spec: Mapping[str, object], kind: str, name: str) -> object:
    if name not in spec:
        raise ValueError(f"Kind {kind!r} needs {name!r}.")
    return spec[name]


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string.")
    return value


def _int(value: object, name: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name!r} must be an integer.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name!r} must be {bound}.")
    return value


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name!r} must be a number of seconds.")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name!r} must be a finite number >= 0.")
    return float(value)
