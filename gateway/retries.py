"""When a failed upstream call may be tried again, and after how long: `upstream.retries`.

A retry is only ever made while nothing has reached the caller (UpstreamClient.send has not
returned yet) and only when upstream cannot have acted on the message, so a chat turn is never
run twice:

- the connection could not be opened (aiohttp.ClientConnectorError: refused, unreachable,
  DNS), so the request was never sent. TLS failures (ClientSSLError) are not retried: they
  do not go away by themselves. Timeouts are never retried (upstream may be working on it),
  nor a connection that broke after the request went out;
- upstream answered 429 or 503 *with* a Retry-After (delta-seconds or an HTTP-date) of at
  most `max_wait` seconds: it refused the message without running it and said when to come
  back. Without Retry-After, or with a longer one, the answer goes back to the caller as it
  is. No other status (500, 502, 504, …) is ever retried.

`attempts` is the number of retries after the first try (config allows 0 = never retry), so
at most `attempts + 1` requests go upstream. The wait before retry n (n = 0, 1, …) is full
jitter, uniform(0, min(max_wait, backoff * 2**n)); after a Retry-After it is
max(Retry-After, that jitter): never sooner than upstream asked, spread a little beyond it.
Every wait must end within `remaining` (what is left of `budget` seconds counted from the
first try, and of the request's own deadline); when it would not, there is no retry and the
caller gets what the last try gave.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from types import MappingProxyType

import aiohttp

from gateway.config import Retries

# The longest wait ever taken before a retry: the backoff cap, and the longest Retry-After
# honoured (a longer one is upstream saying "not soon": the caller hears it directly).
MAX_WAIT = 5.0
CONNECT_ERROR = "connect_error"
RETRYABLE_STATUSES: Mapping[int, str] = MappingProxyType({429: "upstream_429", 503: "upstream_503"})
_DELTA_SECONDS = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str  # connect_error | upstream_429 | upstream_503
    wait: float  # seconds to sleep before the next try


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """Seconds a Retry-After header asks for, at epoch time `now`; None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value) if len(value) <= 9 else math.inf
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # An HTTP-date is always GMT; parsedate_to_datetime leaves "-0000" dates naive.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


class RetryPolicy:
    """Pure decisions: no clock, no sleeping; the caller says how much time remains."""

    __slots__ = ("_rng", "attempts", "backoff", "budget", "max_wait")

    def __init__(
        self, config: Retries, rng: random.Random | None = None, *, max_wait: float = MAX_WAIT
    ) -> None:
        self.attempts = config.attempts
        self.backoff = config.backoff
        self.budget = config.budget
        self.max_wait = max_wait
        self._rng = random.Random() if rng is None else rng

    def jitter(self, retry: int) -> float:
        """Full jitter before retry number `retry` (0 for the first)."""
        # min() first, so a large `retry` cannot overflow backoff * 2**retry.
        ceiling = self.max_wait if retry >= 64 else min(self.max_wait, self.backoff * 2**retry)
        return self._rng.uniform(0.0, ceiling)

    def after_error(
        self, error: BaseException | None, *, tries: int, remaining: float
    ) -> Retry | None:
        """After `tries` tries, the last of which raised `error` (aiohttp's own exception)."""
        if not isinstance(error, aiohttp.ClientConnectorError) or isinstance(
            error, aiohttp.ClientSSLError
        ):
            return None
        return self._fits(CONNECT_ERROR, 0.0, tries, remaining)

    def after_response(
        self, status: int, retry_after: str | None, *, tries: int, remaining: float, now: float
    ) -> Retry | None:
        """After `tries` tries, the last of which answered `status` with this Retry-After."""
        reason = RETRYABLE_STATUSES.get(status)
        if reason is None:
            return None
        asked = retry_after_seconds(retry_after, now=now)
        if asked is None or asked > self.max_wait:
            return None
        return self._fits(reason, asked, tries, remaining)

    def _fits(self, reason: str, at_least: float, tries: int, remaining: float) -> Retry | None:
        if tries > self.attempts:
            return None
        wait = max(at_least, self.jitter(tries - 1))
        if wait > remaining:
            return None
        return Retry(reason, wait)
