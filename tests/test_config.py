"""Configuration: one message naming the file and YAML path for every mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.auth import new_key
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
    assert config.streams.heartbeat == 15.0


@pytest.mark.parametrize(("given", "heartbeat"), [("0", 0.0), ("2.5", 2.5), ("20", 20.0)])
def test_stream_heartbeat_is_seconds_and_0_turns_it_off(given: str, heartbeat: float) -> None:
    config = parse_config(MINIMAL + f"streams: {{heartbeat: {given}}}\n")
    assert config.streams.heartbeat == heartbeat


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
            "gw.yaml:9: tenants.acme.keys[0].sha256: expected 64 hex characters",
        ),
        (
            ("agents: [ag_support]", "agents: [ag_other]"),
            "tenants.acme.agents[0]: agent 'ag_other' is not configured under agents",
        ),
        (("upstream:", "upstream:\n  colour: blue"), "upstream.colour: unknown key"),
        (("tenants:", "surprise: 1\ntenants:"), "gw.yaml:7: surprise: unknown key"),
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
            ("sha256: " + HASH + "}", "sha256: " + HASH + ", expires: 2027-06-30T00:00}"),
            "tenants.acme.keys[0].expires: give the time zone too, e.g. 2027-06-30T00:00:00Z",
        ),
        (
            ("sha256: " + HASH + "}", "sha256: " + HASH + ", expires: next year}"),
            "tenants.acme.keys[0].expires: expected a date or a time such as",
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
        (
            ("tenants:", "streams: {heartbeat: -1}\ntenants:"),
            "gw.yaml:7: streams.heartbeat: expected seconds >= 0 (0 turns heartbeats off), got -1",
        ),
        (
            ("tenants:", "streams: {heartbeat: .nan}\ntenants:"),
            "streams.heartbeat: expected seconds >= 0 (0 turns heartbeats off), got nan",
        ),
        (
            ("tenants:", "streams: {heartbeat: often}\ntenants:"),
            "streams.heartbeat: expected a number of seconds, got a string",
        ),
        (("tenants:", "streams: {heartbeats: 5}\ntenants:"), "streams.heartbeats: unknown key"),
    ],
)
def test_mistakes_name_the_yaml_path(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in MINIMAL
    message = problem(MINIMAL.replace(old, new, 1))
    assert expected in message
    assert re.match(r"gw\.yaml:\d+: ", message), message


def test_a_key_expires_at_the_moment_written_or_at_the_start_of_a_date_in_utc() -> None:
    def expires(value: str) -> float | None:
        text = MINIMAL.replace("sha256: " + HASH + "}", f"sha256: {HASH}, expires: {value}}}")
        return parse_config(text).tenants["acme"].keys[0].expires

    assert expires("2027-06-30T02:00:00+02:00") == 1_814_313_600  # 2027-06-30T00:00:00Z
    assert expires("2027-06-30") == 1_814_313_600
    assert expires("'2027-06-30T00:00:00Z'") == 1_814_313_600
    assert parse_config(MINIMAL).tenants["acme"].keys[0].expires is None


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
    assert problem("tenants: [unclosed").startswith("gw.yaml:1: not valid YAML")
    with pytest.raises(ConfigError, match=re.escape("nope.yaml: cannot read configuration")):
        load_config("nope.yaml")


def test_secret_file_reference_is_trimmed(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  thns_sk_from_file \n")
    config = parse_config(MINIMAL.replace("${TEST_PLATFORM_KEY}", f"${{file:{key_file}}}"))
    assert config.upstream.api_key == Secret("thns_sk_from_file")


# --- the loader refuses what it cannot be sure of -----------------------------------------

OTHER_HASH = "b" * 64
# Line numbers below are this file's: line 1 is the comment.
GATEWAY_YAML = f"""\
# gateway.yaml
listen: {{host: 0.0.0.0, port: 8080}}
admin: {{host: 127.0.0.1, port: 9091}}
upstream:
  base_url: http://127.0.0.1:9000
  api_key: ${{TEST_PLATFORM_KEY}}
agents:
  ag_support:
    api_key: ${{TEST_AGENT_KEY}}
  ag_sales: {{}}
quota:
  backend: memory
tenants:
  acme:
    keys:
      - name: billing
        sha256: {HASH}
    agents: [ag_support]
    limits:
      requests: {{per_minute: 60}}
      tokens:
        per_minute: 20000
        per_day: 1000000
  globex:
    keys:
      - {{name: web, sha256: {OTHER_HASH}}}
    agents:
      - ag_support
      - ag_sales
"""


def edited(old: str, new: str) -> str:
    assert old in GATEWAY_YAML
    return GATEWAY_YAML.replace(old, new, 1)


def test_the_example_of_this_section_is_valid() -> None:
    config = parse_config(GATEWAY_YAML)
    assert set(config.tenants) == {"acme", "globex"}
    assert config.tenants["acme"].limits.tokens.per_day == 1_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            GATEWAY_YAML
            + f"tenants:\n  initech:\n    keys: [{{name: ops, sha256: {'c' * 64}}}]\n"
            + "    agents: [ag_sales]\n",
            "gw.yaml:30: tenants: defined twice, at lines 13 and 30",
            id="two tenants blocks after a merge",
        ),
        pytest.param(
            GATEWAY_YAML
            + f"  acme:\n    keys: [{{name: ops, sha256: {'c' * 64}}}]\n    agents: [ag_sales]\n",
            "gw.yaml:30: tenants.acme: defined twice, at lines 14 and 30",
            id="two entries for one tenant",
        ),
        pytest.param(
            edited(
                f"{{name: web, sha256: {OTHER_HASH}}}",
                f"{{name: web, sha256: {OTHER_HASH}, name: ui}}",
            ),
            "gw.yaml:26: tenants.globex.keys[0].name: defined twice on line 26",
            id="a key repeated inside a flow mapping",
        ),
        pytest.param(
            edited("per_day: 1000000\n", "per_day: 1000000\n        per_minute: 20000\n"),
            "gw.yaml:24: tenants.acme.limits.tokens.per_minute: defined twice, at lines 22 and 24",
            id="deep, even with the same value",
        ),
        pytest.param(
            edited("  backend: memory\n", "  backend: memory\n  backend: memory\n"),
            "gw.yaml:13: quota.backend: defined twice, at lines 12 and 13",
            id="a repeated line",
        ),
    ],
)
def test_a_key_written_twice_is_refused_naming_both_lines(text: str, expected: str) -> None:
    assert problem(text) == expected


def test_a_merged_key_overridden_by_its_mapping_is_no_duplicate() -> None:
    text = edited("    limits:\n", "    limits: &standard\n").replace(
        "      - ag_sales\n",
        "      - ag_sales\n    limits:\n      <<: *standard\n      requests: {per_minute: 5}\n",
    )
    globex = parse_config(text).tenants["globex"]
    assert globex.limits.requests.per_minute == 5
    assert globex.limits.tokens.per_day == 1_000_000


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            ("per_day: 1000000", "per_day: 0"),
            "gw.yaml:23: tenants.acme.limits.tokens.per_day: must be at least 1, got 0",
            id="a value",
        ),
        pytest.param(
            ("- ag_sales", "- ag_nowhere"),
            "gw.yaml:29: tenants.globex.agents[1]: agent 'ag_nowhere' is not configured under "
            "agents",
            id="a list item",
        ),
        pytest.param(
            (f"sha256: {OTHER_HASH}", "sha256: abc"),
            "gw.yaml:26: tenants.globex.keys[0].sha256: expected 64 hex characters",
            id="in a flow mapping",
        ),
        pytest.param(
            ("  backend: memory", "  backend: redis"),
            "gw.yaml:11: quota.redis_url: is required when quota.backend is redis",
            id="missing: its mapping's line",
        ),
        pytest.param(
            ("      - name: billing\n        sha256:", "      - sha256:"),
            "gw.yaml:16: tenants.acme.keys[0].name: is required",
            id="missing in a list item",
        ),
        pytest.param(
            ("  ag_sales: {}", "  ag sales: {}"),
            "gw.yaml:10: agents.ag sales: agent ids are letters, digits, _ and - (at most 128)",
            id="a name",
        ),
        pytest.param(
            ("  api_key: ${TEST_PLATFORM_KEY}\n", ""),
            "gw.yaml:9: agents.ag_sales.api_key: no upstream key: set it here or upstream.api_key",
            id="a rule across sections",
        ),
        pytest.param(
            ("tenants:\n", "tenants: [\n"),
            "gw.yaml:15: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow "
            "sequence at line 13)",
            id="YAML syntax",
        ),
    ],
)
def test_every_error_names_the_line_of_the_value_or_of_its_mapping(
    edit: tuple[str, str], expected: str
) -> None:
    assert problem(edited(*edit)).startswith(expected)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("quota:", "qouta:"), "gw.yaml:11: qouta: unknown key; did you mean quota?"),
        (
            ("  backend: memory", "  backend: redis\n  redis_ulr: redis://127.0.0.1:6379/0"),
            "gw.yaml:13: quota.redis_ulr: unknown key; did you mean redis_url?",
        ),
        (
            ("  base_url:", "  timeouts: {frist_byte: 5}\n  base_url:"),
            "gw.yaml:5: upstream.timeouts.frist_byte: unknown key; did you mean first_byte?",
        ),
        (
            ("    api_key: ${TEST_AGENT_KEY}", "    api_kye: ${TEST_AGENT_KEY}"),
            "gw.yaml:9: agents.ag_support.api_kye: unknown key; did you mean api_key?",
        ),
        (
            ("    limits:\n", "    limts:\n"),
            "gw.yaml:19: tenants.acme.limts: unknown key; did you mean limits?",
        ),
        (
            ("        per_day:", "        per_dya:"),
            "gw.yaml:23: tenants.acme.limits.tokens.per_dya: unknown key; did you mean per_day?",
        ),
        (
            ("        sha256:", "        sha265:"),
            "gw.yaml:17: tenants.acme.keys[0].sha265: unknown key; did you mean sha256?",
        ),
        (
            ("    agents:\n      - ag_support", "    agent:\n      - ag_support"),
            "gw.yaml:27: tenants.globex.agent: unknown key; did you mean agents?",
        ),
    ],
)
def test_an_unknown_key_suggests_the_closest_known_one_at_every_depth(
    edit: tuple[str, str], expected: str
) -> None:
    assert problem(edited(*edit)) == expected


def test_an_unknown_key_with_nothing_close_is_just_unknown() -> None:
    assert problem(edited("  backend: memory", "  colour: blue")) == (
        "gw.yaml:12: quota.colour: unknown key"
    )


@pytest.mark.parametrize(
    ("listen", "admin", "expected"),
    [
        (
            "{host: 0.0.0.0, port: 8080}",
            "{host: 127.0.0.1, port: 8080}",
            "gw.yaml:3: admin.port: 8080 is listen.port too (line 2), on the same address; "
            "the admin port needs a port of its own",
        ),
        ("{host: 127.0.0.1, port: 8080}", "{host: 127.0.0.1, port: 8080}", "gw.yaml:3: admin.port"),
        ("{host: 10.0.0.5, port: 8080}", "{host: '::', port: 8080}", "gw.yaml:3: admin.port"),
        (
            "{port: 9091}",
            "{host: 127.0.0.1}",
            "gw.yaml:2: listen.port: 9091 is the admin port too (admin.port's default), on the "
            "same address; set admin.port to another port",
        ),
    ],
)
def test_the_admin_port_may_not_be_the_caller_port(listen: str, admin: str, expected: str) -> None:
    text = edited("listen: {host: 0.0.0.0, port: 8080}", f"listen: {listen}")
    assert problem(
        text.replace("admin: {host: 127.0.0.1, port: 9091}", f"admin: {admin}")
    ).startswith(expected)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("{host: 127.0.0.1, port: 8080}", "{host: 127.0.0.2, port: 8080}"),  # two addresses
        ("{host: 127.0.0.1, port: 0}", "{host: 127.0.0.1, port: 0}"),  # two free ports
    ],
)
def test_one_port_number_on_two_addresses_is_allowed(listen: str, admin: str) -> None:
    text = edited("listen: {host: 0.0.0.0, port: 8080}", f"listen: {listen}")
    parse_config(text.replace("admin: {host: 127.0.0.1, port: 9091}", f"admin: {admin}"))


def test_a_gateway_key_where_its_hash_belongs_gets_a_hint_and_is_not_echoed() -> None:
    key = new_key()
    message = problem(edited(f"sha256: {HASH}", f"sha256: {key}"))
    assert message == (
        "gw.yaml:17: tenants.acme.keys[0].sha256: this looks like a gateway key itself; put its "
        "sha256 here: `thinnest-gateway keys hash` or the `keys new` output"
    )
    assert key not in message and key.removeprefix("gw_") not in message
    # Nor when the line is not even valid YAML.
    broken = problem(edited(f"sha256: {HASH}", f"sha256: {key}: oops"))
    assert broken.startswith("gw.yaml:17: not valid YAML") and key not in broken


def test_an_empty_environment_variable_is_not_reported_as_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_PLATFORM_KEY", "")
    assert problem(GATEWAY_YAML) == (
        "gw.yaml:6: upstream.api_key: environment variable TEST_PLATFORM_KEY is set but empty"
    )
    monkeypatch.delenv("TEST_PLATFORM_KEY")
    assert problem(GATEWAY_YAML) == (
        "gw.yaml:6: upstream.api_key: environment variable TEST_PLATFORM_KEY is not set"
    )


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "platform-key"
    empty.write_text("\n")
    text = edited("${TEST_PLATFORM_KEY}", f"${{file:{empty}}}")
    assert problem(text) == f"gw.yaml:6: upstream.api_key: secret file {empty} is empty"


PASSWORD = "pw-never-shown-4e1c"


@pytest.mark.parametrize(
    ("edit", "env", "expected"),
    [
        pytest.param(
            ("  backend: memory", "  backend: redis\n  redis_url: ${REDIS_URL}"),
            f"redis://:{PASSWORD}@redis.internal:port/0",
            "gw.yaml:13: quota.redis_url: not a usable Redis URL",
            id="a malformed Redis URL from a reference",
        ),
        pytest.param(
            (
                "  backend: memory",
                "  backend: redis\n  redis_url: ['${REDIS_URL}', redis://b:6379]",
            ),
            f"http://:{PASSWORD}@redis.internal:6379",
            "gw.yaml:13: quota.redis_url[0]: expected a redis://, rediss://, unix:// or",
            id="a Redis URL of the wrong kind",
        ),
        pytest.param(
            ("  base_url: http://127.0.0.1:9000", "  base_url: ${UPSTREAM_URL}"),
            f"ftp://user:{PASSWORD}@upstream.internal/",
            "gw.yaml:5: upstream.base_url: expected an http:// or https:// URL, got the value "
            "of ${UPSTREAM_URL}",
            id="a URL from a reference",
        ),
        pytest.param(
            ("  base_url: http://127.0.0.1:9000", f"  base_url: ftp://user:{PASSWORD}@up/?t=x"),
            "",
            "gw.yaml:5: upstream.base_url: expected an http:// or https:// URL, got "
            "'ftp://***@up/?t=***'",
            id="a URL written with credentials",
        ),
        pytest.param(
            ("  backend: memory", "  backend: memory\n  timezone: ${ZONE}"),
            PASSWORD,
            "gw.yaml:13: quota.timezone: the value of ${ZONE} is not an IANA time zone",
            id="a text value from a reference",
        ),
        pytest.param(
            ("  backend: memory", "  backend: ${BACKEND}"),
            PASSWORD,
            "gw.yaml:12: quota.backend: expected one of memory, redis, got the value of ${BACKEND}",
            id="a choice from a reference",
        ),
    ],
)
def test_no_error_shows_what_a_reference_resolved_to_nor_credentials(
    monkeypatch: pytest.MonkeyPatch, edit: tuple[str, str], env: str, expected: str
) -> None:
    for name in ("REDIS_URL", "UPSTREAM_URL", "ZONE", "BACKEND"):
        monkeypatch.setenv(name, env)
    message = problem(edited(*edit))
    assert message.startswith(expected), message
    assert PASSWORD not in message and "internal" not in message


def test_max_connections_is_the_caller_ports_only() -> None:
    listen = "listen: {host: 0.0.0.0, port: 8080, max_connections: 2000}"
    config = parse_config(edited("listen: {host: 0.0.0.0, port: 8080}", listen))
    assert config.listen.max_connections == 2000
    assert parse_config(MINIMAL).listen.max_connections is None  # from the descriptor limit
    zero = edited("listen: {host: 0.0.0.0, port: 8080}", listen.replace("2000", "0"))
    assert problem(zero) == "gw.yaml:2: listen.max_connections: must be at least 1, got 0"
    admin = "admin: {host: 127.0.0.1, port: 9091, max_connections: 10}"
    message = problem(edited("admin: {host: 127.0.0.1, port: 9091}", admin))
    assert "admin.max_connections: unknown key" in message
