"""TLS at both network edges: whom the upstream client trusts, what the caller port serves.

- Upstream: the system's default trust store (`ssl.create_default_context()`: the OS bundle, or
  `SSL_CERT_FILE`/`SSL_CERT_DIR` where set), plus `upstream.ca_file`'s anchors when given,
  added to it, never replacing it. A TLS failure to upstream is logged with the host and the
  error's class (`ssl.SSLCertVerificationError`, OpenSSL's verify code and message) at most
  once per host and class every `TLSFailureLog.interval` seconds, with how many it stood for.
- Caller port: `listen.tls`'s chain and key in one SSLContext for the listener's lifetime. On
  SIGHUP (gateway/reload.py) the files are read again into that same context: the handshakes
  of new connections get the new certificate, connections already open keep theirs.

The configuration loader builds these contexts once to validate the files (check-config and a
refused reload name a bad file), so nothing here runs on a file that did not load there.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import structlog

if TYPE_CHECKING:
    from gateway.config import ListenTLS

log = structlog.get_logger("gateway.tls")

TLS_FAILURE_LOG_INTERVAL = 60.0
"""Seconds between two log lines for the same upstream host and TLS error class."""
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL
)


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The upstream client's context: the system's trust store, plus `ca_file` if given."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def server_context(tls: ListenTLS) -> ssl.SSLContext:
    """The caller port's context, its certificate chain and key loaded from `tls`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])  # aiohttp's server speaks HTTP/1.1 only
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def fingerprint(cert_file: str) -> str:
    """SHA-256 of the first certificate in a PEM file (the leaf), as hex: what a client sees
    (`openssl x509 -fingerprint -sha256`), and safe to log."""
    match = _PEM_CERTIFICATE.search(Path(cert_file).read_bytes())
    if match is None:
        return "unknown"
    der = ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))
    return hashlib.sha256(der).hexdigest()


class ServerCertificate:
    """The caller port's SSLContext, whose chain a reload replaces in place."""

    __slots__ = ("context", "fingerprint", "tls")

    def __init__(self, tls: ListenTLS) -> None:
        self.context = server_context(tls)
        self.tls = tls
        self.fingerprint = fingerprint(tls.cert_file)

    def reload(self, tls: ListenTLS) -> None:
        """Read the chain and key again (from `tls`, the reloaded configuration's paths) into
        the live context: new handshakes get them. Raises OSError (ssl.SSLError) when they
        do not load; the loader has just loaded the same files, so that takes a change on
        disk in between."""
        self.context.load_cert_chain(tls.cert_file, tls.key_file)
        self.tls = tls
        self.fingerprint = fingerprint(tls.cert_file)


@dataclass(slots=True)
class _Seen:
    logged_at: float
    since: int = 0  # failures not logged since the last line


class TLSFailureLog:
    """Upstream TLS failures, logged per (host, port, error class) at most once an interval.

    An expired certificate or a missing company CA fails every request to upstream the same
    way: one line names it, and the next, an interval later, counts the failures between.
    """

    __slots__ = ("_clock", "_seen", "interval")

    def __init__(
        self, clock: Callable[[], float], interval: float = TLS_FAILURE_LOG_INTERVAL
    ) -> None:
        self._clock = clock
        self.interval = interval
        self._seen: dict[tuple[str, int, str], _Seen] = {}

    def failed(self, exc: aiohttp.ClientSSLError) -> None:
        error = describe(exc)
        key = (exc.host, exc.port or 0, str(error["error"]))
        now, seen = self._clock(), self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.interval:
            seen.since += 1
            return
        repeated = seen.since if seen is not None else 0
        self._seen[key] = _Seen(now)
        log.error(
            "upstream TLS failed",
            host=exc.host,
            port=exc.port,
            **error,
            **({"failures_since_last_line": repeated} if repeated else {}),
        )


def describe(exc: aiohttp.ClientSSLError) -> dict[str, object]:
    """The error class and OpenSSL's reason: never a certificate's contents or a key."""
    cause: BaseException = (
        exc.certificate_error
        if isinstance(exc, aiohttp.ClientConnectorCertificateError)
        else exc.os_error
    )
    fields: dict[str, object] = {"error": f"{type(cause).__module__}.{type(cause).__qualname__}"}
    if isinstance(cause, ssl.SSLCertVerificationError):
        fields.update(verify_code=cause.verify_code, verify_message=cause.verify_message)
    elif isinstance(cause, ssl.SSLError) and cause.reason:
        fields["reason"] = cause.reason
    return fields
