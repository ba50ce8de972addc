"""TLS at both network edges: whom the upstream client trusts, what the caller port serves.

- Upstream: the system's default trust store (`ssl.create_default_context()`: the OS bundle, or
  `SSL_CERT_FILE`/`SSL_CERT_DIR` where set), plus `upstream.ca_file`'s anchors when given,
  added to it, never replacing it. A TLS failure to upstream is logged like every failure to
  reach it (gateway/outages.py: the peer, `cause` SSLCertVerificationError, `tls` OpenSSL's
  verify message, once per kind per interval).
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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import ListenTLS

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
