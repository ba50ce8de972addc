"""Caller authentication: gateway keys are only ever known to us by their sha256."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config import Tenant
from gateway.errors import InvalidRequest, Unauthorized

KEY_PREFIX = "gw_"
# Far above any key we issue (46 chars); bounds the hashing work an attacker can ask for.
_MAX_KEY_LENGTH = 256
MAX_END_USER_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: Tenant
    key_name: str
    expires: float | None = None  # epoch seconds


def end_user_of(headers: Mapping[str, str], caller: Caller) -> str | None:
    """The end user the calling service names, where its tenant has an end-user level: a
    bucket id only (stored as a digest, never a label, never logged)."""
    level = caller.tenant.end_user
    if level is None:
        return None
    value = headers.get(level.header, "").strip()
    if len(value) > MAX_END_USER_LENGTH:
        raise InvalidRequest(
            f"the {level.header} header is longer than {MAX_END_USER_LENGTH} characters"
        )
    return value or None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh gateway key: `gw_` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Maps the hash of a presented key to the tenant and key name it belongs to. Never
    changed: a reload builds a new one with the rest of the tenancy (gateway/tenancy.py)."""

    __slots__ = ("_callers",)

    def __init__(self, tenants: Mapping[str, Tenant]) -> None:
        self._callers = {
            key.sha256: Caller(tenant, key.name, key.expires)
            for tenant in tenants.values()
            for key in tenant.keys
        }

    def authenticate(self, authorization: str | None, now: float) -> Caller:
        """The caller a bearer key names, at wall-clock time `now` (for key expiry)."""
        if not authorization:
            raise Unauthorized("missing gateway key: send 'Authorization: Bearer <gateway key>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if (
            scheme.lower() != "bearer"
            or not token
            or len(token) > _MAX_KEY_LENGTH
            or not (token.isascii() and token.isprintable())
        ):
            raise Unauthorized("malformed Authorization header: expected 'Bearer <gateway key>'")
        caller = self._callers.get(hash_key(token))
        if caller is None:
            raise Unauthorized("unknown or revoked gateway key")
        if caller.expires is not None and now >= caller.expires:
            # Distinct from unknown: whoever holds it knows the key, and needs a new one.
            raise Unauthorized("gateway key expired: ask for a new one (thinnest-gateway keys new)")
        return caller
