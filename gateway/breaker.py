"""A circuit breaker, so a dead backend (Redis, the upstream API) costs nothing per request
until it is probed back.

    closed ──(threshold consecutive failures)──▶ open ──(cooldown)──▶ half-open
      ▲                                           ▲                       │
      └────────────── probe succeeds ─────────────┴──── probe fails ──────┘

Half-open lets exactly one call through as the probe; everyone else keeps failing fast until it
answers. A probe that never reports (its caller was cancelled) stops blocking after a cooldown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    __slots__ = ("_clock", "_cooldown", "_failures", "_since", "_state", "_threshold")

    def __init__(
        self, *, threshold: int = 3, cooldown: float = 1.0, clock: Callable[[], float]
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("the breaker needs threshold >= 1 and cooldown > 0")
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._since = 0.0  # when it opened, or when the probe went out

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may touch the backend now (in half-open: whether it is the probe)."""
        if self._state == "closed":
            return True
        if self._clock() - self._since < self._cooldown:
            return False
        self._state, self._since = "half-open", self._clock()
        return True

    def success(self) -> None:
        self._state, self._failures = "closed", 0

    def failure(self) -> None:
        self._failures += 1
        if self._state == "half-open" or self._failures >= self._threshold:
            self.trip()

    def trip(self) -> None:
        """Open now, whatever the count (a failed start-up check)."""
        self._state, self._since = "open", self._clock()
