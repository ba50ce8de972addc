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
Changed = Callable[["BreakerState", "BreakerState"], None]
"""Told (before, after) when the breaker opens and when it closes again: for a log line."""


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_cooldown",
        "_failures",
        "_on_change",
        "_since",
        "_state",
        "_threshold",
    )

    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown: float = 1.0,
        clock: Callable[[], float],
        on_change: Changed | None = None,
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("the breaker needs threshold >= 1 and cooldown > 0")
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
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
        before = self._state
        self._state, self._failures = "closed", 0
        if before != "closed" and self._on_change is not None:
            self._on_change(before, "closed")

    def failure(self) -> None:
        self._failures += 1
        if self._state == "half-open" or self._failures >= self._threshold:
            self.trip()

    def trip(self) -> None:
        """Open now, whatever the count (a failed start-up check)."""
        before = self._state
        self._state, self._since = "open", self._clock()
        # A failed probe (half-open → open) is no news: the breaker was open already.
        if before == "closed" and self._on_change is not None:
            self._on_change(before, "open")
