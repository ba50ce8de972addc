"""Caller keys: only their hashes are configured; unknown, malformed and missing keys fail."""

from __future__ import annotations

import pytest

from gateway.auth import KeyRing, hash_key, new_key
from gateway.config import Tenant, TenantKey
from gateway.errors import Unauthorized

KEY = "gw_test_key_for_acme_billing"
EXPIRING = "gw_test_key_for_acme_reports"
NOW = 1_800_000_000.0


@pytest.fixture
def keyring() -> KeyRing:
    acme = Tenant(
        name="acme",
        keys=(
            TenantKey(name="billing", sha256=hash_key(KEY)),
            TenantKey(name="reports", sha256=hash_key(EXPIRING), expires=NOW + 60),
        ),
        agents=frozenset({"ag_support"}),
    )
    return KeyRing({"acme": acme})


def test_known_key_names_tenant_and_key(keyring: KeyRing) -> None:
    caller = keyring.authenticate(f"Bearer {KEY}", NOW)
    assert (caller.tenant.name, caller.key_name) == ("acme", "billing")


def test_scheme_is_case_insensitive(keyring: KeyRing) -> None:
    assert keyring.authenticate(f"bearer {KEY}", NOW).tenant.name == "acme"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing gateway key"),
        ("", "missing gateway key"),
        (KEY, "malformed Authorization header"),
        (f"Basic {KEY}", "malformed Authorization header"),
        ("Bearer ", "malformed Authorization header"),
        ("Bearer " + "x" * 1000, "malformed Authorization header"),
        ("Bearer gw_not_a_known_key", "unknown or revoked gateway key"),
    ],
)
def test_refusals_say_what_is_wrong_without_echoing_the_key(
    keyring: KeyRing, header: str | None, message: str
) -> None:
    with pytest.raises(Unauthorized) as info:
        keyring.authenticate(header, NOW)
    assert message in info.value.message
    assert KEY not in info.value.message and "gw_not_a_known_key" not in info.value.message


def test_a_key_is_refused_from_its_expiry_on_and_says_so(keyring: KeyRing) -> None:
    assert keyring.authenticate(f"Bearer {EXPIRING}", NOW + 59.9).key_name == "reports"
    with pytest.raises(Unauthorized) as info:
        keyring.authenticate(f"Bearer {EXPIRING}", NOW + 60)
    # Not "unknown": its holder has the right key, and needs a new one.
    assert info.value.message.startswith("gateway key expired")
    assert EXPIRING not in info.value.message
    assert keyring.authenticate(f"Bearer {KEY}", NOW + 10**9).key_name == "billing"


def test_new_keys_are_prefixed_long_and_unique() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("gw_")
        assert len(key) >= 3 + 43  # 32 random bytes in URL-safe base64
