"""deploy/: the Prometheus config, alert rules and Grafana dashboard are valid, and speak of
metrics and labels the gateway really exposes (a renamed metric would silently blank an alert).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.logs import AccessRecord
from gateway.metrics import (
    KeyExpiry,
    MetricLabels,
    Metrics,
    UpstreamCircuits,
    quota_backend_errors,
    stream_drains,
)
from gateway.usage import Usage
from tests.conftest import gateway_yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS = DEPLOY / "alerts.yml"
ALERT_TESTS = DEPLOY / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "thinnest-gateway.json"

# Labels Prometheus adds to every scraped series (the scrape's job and target address).
TARGET_LABELS = frozenset({"job", "instance"})
METRIC_NAME = re.compile(r"\bgateway_[a-zA-Z0-9_]+")
# `gateway_x{a="1", b=~"2"}`: the metric and the text of its matchers.
SELECTOR = re.compile(r"\b(gateway_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# `by (a, b)`, `on (a)`, …: checked against the first metric named after the clause.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: `make test` installs it (Debian's prometheus)")
    return subprocess.run([binary, *args], check=False, capture_output=True, text=True)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


@pytest.fixture
def exposed_labels() -> dict[str, set[str]]:
    """Sample name → its label names, from a real registry with every metric observed once."""
    config = parse_config(gateway_yaml("http://127.0.0.1:9"), "test.yaml")
    allowed = MetricLabels.of(config)
    metrics = Metrics(lambda: allowed)
    for sampled in (quota_backend_errors, stream_drains):
        metrics.registry.register(sampled(lambda: 0))
    metrics.registry.register(UpstreamCircuits(lambda: [("ag_support", False)]))
    metrics.registry.register(KeyExpiry(lambda: [("acme", "billing-service", 1.8e9)]))
    # Labelled metrics have no samples until first used: one request that did everything.
    record = AccessRecord(
        request_id="r1",
        method="POST",
        path="/v1/agents/ag_support/chat",
        started=0.0,
        status=200,
        tenant="acme",
        agent="ag_support",
        stream=True,
        upstream_status=200,
        upstream_ttfb=0.1,
        upstream_wait=0.2,
        client_closed=True,
    )
    metrics.finished(record, 0.25)
    metrics.settled("acme", "ag_support", Usage(input=1, output=2, total=3), estimated=3)
    # Budget ratios have no series until the quota reports one: a tenant's and a key's.
    metrics.budget_used("acme", None, "tokens_per_month", 0.5)
    metrics.budget_used("acme", "billing-service", "tokens_per_day", 0.25)
    labels: dict[str, set[str]] = defaultdict(set)
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels[sample.name].update(sample.labels)
    return dict(labels)


def unknown_names_and_labels(expr: str, exposed: dict[str, set[str]]) -> list[str]:
    """What in one PromQL expression the registry does not have."""
    problems = [f"no metric {name}" for name in METRIC_NAME.findall(expr) if name not in exposed]
    used: list[tuple[str, str]] = []  # (metric, label)
    for selector in SELECTOR.finditer(expr):
        metric, matchers = selector.groups()
        used += [(metric, label) for label in MATCHER_LABEL.findall(matchers)]
    for clause in GROUPING.finditer(expr):
        following = METRIC_NAME.search(expr, clause.end())
        assert following, f"no metric after {clause.group(0)!r} in {expr}"
        labels = [label.strip() for label in clause.group(1).split(",") if label.strip()]
        used += [(following.group(0), label) for label in labels]
    for metric, label in used:
        if metric in exposed and label not in exposed[metric] | TARGET_LABELS:
            problems.append(f"{metric} has no label {label!r}")
    return problems


def test_the_prometheus_config_passes_promtool() -> None:
    assert_ok(promtool("check", "config", str(PROMETHEUS_YML)))


def test_the_alert_rules_pass_promtool() -> None:
    assert_ok(promtool("check", "rules", str(ALERTS)))


def test_the_alert_rule_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", str(ALERT_TESTS)))


def test_alerts_use_only_exposed_metrics_and_labels(exposed_labels: dict[str, set[str]]) -> None:
    rules = alert_rules()
    assert rules
    problems = {
        rule["alert"]: unknown_names_and_labels(rule["expr"], exposed_labels) for rule in rules
    }
    assert not {alert: found for alert, found in problems.items() if found}


def test_dashboard_uses_only_exposed_metrics_and_labels(
    exposed_labels: dict[str, set[str]],
) -> None:
    exprs = dashboard_exprs()
    assert exprs
    problems = {expr: unknown_names_and_labels(expr, exposed_labels) for expr in exprs}
    assert not {expr: found for expr, found in problems.items() if found}


def test_every_alert_is_ready_to_route_and_read() -> None:
    for rule in alert_rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown staying silent"


def test_the_dashboard_has_a_tenant_variable_and_queries_in_every_panel() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert "label_values(gateway_requests_total, tenant)" in json.dumps(variables["tenant"])
    assert variables["datasource"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool has no query linter, so the panels' queries go through it as recording rules."""
    variables = {"$__rate_interval": "5m", "$job": ".*", "$tenant": ".*"}
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a dashboard variable this test does not know: {expr}"
        rules.append({"record": f"dashboard_query_{number}", "expr": expr})
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(rule_file)))
