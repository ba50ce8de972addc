"""How the gateway tells an operator that a peer (Redis, the upstream API) is failing.

One log line per kind of failure per interval, not one per request: an outage at 1,000
requests a second must not bury everything else in the log. The line names the peer
(`host:port`, never a URL: a URL may carry a password), the error's class and the OS or TLS error
under it (`ConnectionRefusedError`, `SSLCertVerificationError`, with its errno name), and how
many of the same were held back since the last line.
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import Callable
from typing import Any

INTERVAL = 10.0
"""Seconds between two lines about the same kind of failure of one peer."""


def root_cause(exc: BaseException) -> BaseException:
    """The deepest error under `exc`: what the OS or the TLS library said."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        under = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
        if not isinstance(under, BaseException):
            break
        exc = under
    return exc


def describe(exc: BaseException) -> dict[str, str]:
    """Log fields for an error, without its text (which may quote a URL or a server's reply):
    `error` (its class), `cause` (the OS or TLS error under it) and `errno` or `tls`."""
    fields = {"error": type(exc).__name__}
    cause = root_cause(exc)
    if cause is not exc:
        fields["cause"] = type(cause).__name__
    if isinstance(cause, ssl.SSLCertVerificationError):
        fields["tls"] = str(cause.verify_message)
    elif isinstance(cause, ssl.SSLError) and cause.reason:
        fields["tls"] = str(cause.reason)
    elif isinstance(cause, OSError) and cause.errno is not None:
        fields["errno"] = errno.errorcode.get(cause.errno, str(cause.errno))
    return fields


class FailureLog:
    """Failures of one peer, logged at most once per `interval` per kind."""

    def __init__(
        self,
        logger: Any,
        event: str,
        peer: str,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._event = event
        self._peer = peer
        self._interval = interval
        self._clock = clock
        self._last: dict[tuple[str, ...], float] = {}
        self._held: dict[tuple[str, ...], int] = {}

    def failed(self, exc: BaseException, **context: object) -> None:
        fields = describe(exc)
        kind = tuple(fields.values())
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        self._log.warning(
            self._event,
            peer=self._peer,
            **fields,
            **({"repeated": held} if held else {}),
            **context,
        )
