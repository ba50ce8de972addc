"""Configuration: one message naming the file and YAML path for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import Secret, load_config, parse_config
from gateway.errors import ConfigError

HASH = "a" * 64
MINIMAL = f"""
upstream:
  base_url: http://127.0.0.1:9000
  api_key: ${{TEST_PLATFORM_KEY}}
agents:
  ag_support: {{api_key: "${{TEST_AGENT_KEY}}"}}
tenants:
  acme:
    keys: [{{name: billing, sha256: {HASH}}}]
    agents: [ag_support]
"""


@pytest.fixture(autouse=True)
def upstream_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PLATFORM_KEY", "thns_sk_test_platform")
    monkeypatch.setenv("TEST_AGENT_KEY", "ak_test_agent")


def problem(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    return str(info.value)


def test_minimal_config_reads_secrets_from_the_environment() -> None:
    config = parse_config(MINIMAL)
    assert config.upstream.api_key == Secret("thns_sk_test_platform")
    assert config.agents["ag_support"].api_key == Secret("ak_test_agent")
    assert config.tenants["acme"].keys[0].sha256 == HASH
    assert config.listen.port == 8080 and config.admin.host == "127.0.0.1"
    assert config.limits.max_body_bytes == 65536
    assert config.quota.backend == "memory"


def test_the_shipped_examples_are_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THINNESTAI_API_KEY", "thns_sk_x")
    monkeypatch.setenv("SUPPORT_AGENT_KEY", "ak_x")
    demo = load_config("config/demo.yaml")
    assert set(demo.tenants) == {"acme", "globex"}
    production = Path("config/gateway.yaml").read_text()
    secret = tmp_path / "support-agent-key"
    secret.write_text("ak_from_file\n")
    production = production.replace("/run/secrets/thinnest/support-agent-key", str(secret))
    config = parse_config(production)
    assert config.agents["ag_support"].api_key == Secret("ak_from_file")
    assert config.quota.backend == "redis" and config.quota.expected_replicas == 3


def test_secrets_never_show_in_repr() -> None:
    config = parse_config(MINIMAL)
    assert "thns_sk_test_platform" not in repr(config)
    assert "ak_test_agent" not in repr(config)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("sha256: " + HASH, "sha256: abc"),
            "gw.yaml: tenants.acme.keys[0].sha256: expected 64 hex characters",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_other]"),
            "tenants.acme.agents[0]: agent 'ag_other' is not configured under agents",
        ),
        (("upstream:", "upstream:\n  colour: blue"), "upstream.colour: unknown key"),
        (("tenants:", "surprise: 1\ntenants:"), "gw.yaml: surprise: unknown key"),
        (
            ("${TEST_PLATFORM_KEY}", "${NOT_SET_ANYWHERE}"),
            "upstream.api_key: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            ("${TEST_PLATFORM_KEY}", "${file:/nonexistent/key}"),
            "upstream.api_key: cannot read secret file /nonexistent/key",
        ),
        (
            ("${TEST_PLATFORM_KEY}", "thns_sk_inline"),
            "upstream.api_key: secrets are never written inline",
        ),
        (
            ("base_url: http://127.0.0.1:9000", "base_url: ftp://x"),
            "upstream.base_url: expected an http:// or https:// URL",
        ),
        (
            (
                "agents: [ag_support]",
                "agents: [ag_support]\n    limits: {requests: {per_minute: many}}",
            ),
            "tenants.acme.limits.requests.per_minute: expected a whole number, got a string",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_support]\n    limits: {tokens: {per_day: 0}}"),
            "tenants.acme.limits.tokens.per_day: must be at least 1, got 0",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_support]\n    session_isolation: sure"),
            "tenants.acme.session_isolation: expected one of tenant, key, off, got 'sure'",
        ),
        (
            ("tenants:", "quota: {backend: redis}\ntenants:"),
            "quota.redis_url: is required when quota.backend is redis",
        ),
        (
            ("tenants:", "quota: {on_backend_error: maybe}\ntenants:"),
            "quota.on_backend_error: expected one of local, open, closed, got 'maybe'",
        ),
        (("tenants:", "listen: {port: 70000}\ntenants:"), "listen.port: must be at most 65535"),
        (
            ("keys: [", "keys: [{name: second, sha256: " + HASH + "}, "),
            "tenants.acme.keys[1].sha256: the same key hash is already used by tenants.acme",
        ),
        (
            ("keys: [{name: billing,", "keys: [{name: all,"),
            "tenants.acme.keys[0].name: 'all' names the tenant's own level on /metrics",
        ),
        (
            ("tenants:", "quota: {timezone: Europe/Berln}\ntenants:"),
            "quota.timezone: 'Europe/Berln' is not an IANA time zone (e.g. UTC, Europe/Berlin)",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_support]\n    budget: {tokens: {per_week: 9}}"),
            "tenants.acme.budget.tokens.per_week: unknown key",
        ),
        (
            (
                "agents: [ag_support]",
                "agents: [ag_support]\n    budget: {requests: {per_month: 9}, warn_at: [80]}",
            ),
            "tenants.acme.budget.warn_at[0]: expected a fraction above 0 and at most 1, got 80",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_support]\n    budget: {warn_at: [0.8]}"),
            "tenants.acme.budget.warn_at: there is no budget to warn about",
        ),
        (
            (
                "sha256: " + HASH + "}",
                "sha256: " + HASH + ", budget: {tokens: {per_month: 0}}}",
            ),
            "tenants.acme.keys[0].budget.tokens.per_month: must be at least 1, got 0",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_support]\n    end_user: {header: 'X End'}"),
            "tenants.acme.end_user.header: 'X End' does not match",
        ),
    ],
)
def test_mistakes_name_the_yaml_path(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in MINIMAL
    assert expected in problem(MINIMAL.replace(old, new, 1))


def test_a_key_hash_shared_by_two_tenants_is_refused() -> None:
    text = (
        MINIMAL
        + f"""
  globex:
    keys: [{{name: web, sha256: {HASH}}}]
    agents: [ag_support]
"""
    )
    assert (
        "tenants.globex.keys[0].sha256: the same key hash is already used by tenants.acme"
        in problem(text)
    )


def test_wildcard_agents_need_a_platform_key() -> None:
    text = MINIMAL.replace("  api_key: ${TEST_PLATFORM_KEY}\n", "").replace(
        "agents: [ag_support]", 'agents: ["*"]'
    )
    assert "upstream.api_key: is required when a tenant may use agents" in problem(text)


def test_an_agent_without_any_upstream_key_is_refused() -> None:
    text = MINIMAL.replace("  api_key: ${TEST_PLATFORM_KEY}\n", "").replace(
        'ag_support: {api_key: "${TEST_AGENT_KEY}"}', "ag_support: {}"
    )
    assert "agents.ag_support.api_key: no upstream key" in problem(text)


def test_invalid_yaml_and_missing_file() -> None:
    assert problem("tenants: [unclosed").startswith("gw.yaml: not valid YAML")
    with pytest.raises(ConfigError, match=re.escape("nope.yaml: cannot read configuration")):
        load_config("nope.yaml")


def test_secret_file_reference_is_trimmed(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  thns_sk_from_file \n")
    config = parse_config(MINIMAL.replace("${TEST_PLATFORM_KEY}", f"${{file:{key_file}}}"))
    assert config.upstream.api_key == Secret("thns_sk_from_file")
