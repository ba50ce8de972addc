"""Upstream's own per-key rate limit: a fixed per-minute and a fixed per-day window."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .config import RateLimitConfig

MINUTE = 60
DAY = 86_400


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset: int
    """Epoch second at which the binding window starts afresh."""
    retry_after: int
    """Whole seconds to wait; meaningful only when not allowed."""

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


@dataclass(slots=True)
class _Windows:
    minute: int
    minute_count: int
    day: int
    day_count: int


class RateLimiter:
    """Counts per API key; only valid keys reach it, so its memory is bounded by the config."""

    __slots__ = ("_clock", "_per_day", "_per_minute", "_windows")

    def __init__(self, limits: RateLimitConfig, clock: Callable[[], float]) -> None:
        self._per_minute = limits.per_minute
        self._per_day = limits.per_day
        self._clock = clock
        self._windows: dict[str, _Windows] = {}

    def hit(self, key: str) -> RateDecision:
        """Count one request for `key` unless a window is already full (refusals are free)."""
        now = self._clock()
        minute = int(now // MINUTE)
        day = int(now // DAY)
        windows = self._windows.get(key)
        if windows is None:
            windows = self._windows[key] = _Windows(minute, 0, day, 0)
        if windows.minute != minute:
            windows.minute, windows.minute_count = minute, 0
        if windows.day != day:
            windows.day, windows.day_count = day, 0
        allowed = windows.minute_count < self._per_minute and windows.day_count < self._per_day
        if allowed:
            windows.minute_count += 1
            windows.day_count += 1
        return self._decision(windows, now, allowed=allowed)

    def peek(self, key: str | None) -> RateDecision:
        """`key`'s windows as they stand, counting nothing: what a response that is not
        counted (a 401) reports. A key never counted (or None) has fresh windows, and is not
        remembered, so unknown keys cannot grow the table."""
        now = self._clock()
        minute, day = int(now // MINUTE), int(now // DAY)
        seen = self._windows.get(key) if key is not None else None
        windows = _Windows(minute, 0, day, 0)
        if seen is not None:  # a window that has not turned over keeps its count
            windows.minute_count = seen.minute_count if seen.minute == minute else 0
            windows.day_count = seen.day_count if seen.day == day else 0
        return self._decision(windows, now, allowed=True)

    def _decision(self, windows: _Windows, now: float, *, allowed: bool) -> RateDecision:
        minute, day = windows.minute, windows.day
        minute_left = self._per_minute - windows.minute_count
        day_left = self._per_day - windows.day_count
        # Report whichever window will refuse first, as that is what a client must respect.
        if day_left == 0 or day_left < minute_left:
            limit, remaining, reset = self._per_day, day_left, (day + 1) * DAY
        else:
            limit, remaining, reset = self._per_minute, minute_left, (minute + 1) * MINUTE
        return RateDecision(
            allowed=allowed,
            limit=limit,
            remaining=remaining,
            reset=reset,
            retry_after=max(1, math.ceil(reset - now)),
        )

    def clear(self) -> None:
        self._windows.clear()
