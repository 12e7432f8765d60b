"""deploy/k8s: rendered by kustomize, every object valid against the Kubernetes schemas."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from edge import settings
from tests.test_deploy_contract import DEPLOY, design_env_vars, missing, tool

K8S = DEPLOY / "k8s"
#: the oldest Kubernetes still in common support, and the newest the schemas cover
VERSIONS = ("1.30.0", "1.37.0")

#: The Prometheus Operator's CRD is not among the core schemas; this holds the fields the
#: base uses to the operator's documented shape (monitoring.coreos.com/v1).
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": r"^(\d+(ms|s|m|h))+$",
                            },
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("the kubernetes-validate package")
    return kubernetes_validate


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in rendered() if doc["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def config() -> dict[str, str]:
    data: dict[str, str] = one("ConfigMap")["data"]
    return data


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_renders_every_object() -> None:
    kinds = sorted(doc["kind"] for doc in rendered())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_are_valid_strictly(version: str) -> None:
    kubernetes_validate = validator()
    checked = 0
    for doc in rendered():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below against SERVICE_MONITOR_SCHEMA
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc.message}")
        checked += 1
    assert checked == len(rendered()) - 1


def test_service_monitor_matches_its_schema() -> None:
    jsonschema.validate(one("ServiceMonitor"), SERVICE_MONITOR_SCHEMA)


def test_schemas_reject_a_broken_object() -> None:
    kubernetes_validate = validator()
    broken = {**one("Service"), "spec": {**one("Service")["spec"], "portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
    monitor = one("ServiceMonitor")
    broken = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": 8080}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)


def test_config_map_holds_contract_settings() -> None:
    data = config()
    assert set(data) <= design_env_vars(), set(data) - design_env_vars()
    declared = {var.name: var for var in settings.VARS}
    for name in set(data) & set(declared):
        declared[name].parse(data[name])
    env_from = container()["envFrom"]
    assert {"configMapRef": {"name": one("ConfigMap")["metadata"]["name"]}} in env_from


def test_probes_and_port() -> None:
    spec = container()
    (port,) = spec["ports"]
    assert port["containerPort"] == int(config()["EDGE_PORT"])
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}


def test_resources_are_bounded() -> None:
    resources = container()["resources"]
    for key in ("cpu", "memory"):
        assert resources["requests"][key], key
        assert resources["limits"][key], key
    # the memory limit edge admits against is a share of the container's
    assert config()["EDGE_MEMORY_LIMIT"].endswith("%")
    assert int(config()["EDGE_MEMORY_LIMIT"].rstrip("%")) < 100


def test_runs_locked_down() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # the image's numeric USER
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+)", dockerfile, re.MULTILINE)
    assert pod["securityContext"]["runAsUser"] == int(user)
    mounts = {m["mountPath"] for m in container()["volumeMounts"]}
    assert "/tmp" in mounts, "a writable /tmp on a read-only root"


def test_termination_outlasts_the_prestop_sleep_and_the_drain() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = float(config()["EDGE_SHUTDOWN_GRACE"])
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def test_selectors_line_up() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(one("Deployment")["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(one("Service")["spec"]["selector"], pod_labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    service = one("Service")
    monitor = one("ServiceMonitor")["spec"]
    assert selects(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= port_names
    assert {e["path"] for e in monitor["endpoints"]} == {"/metrics"}
    for endpoint in monitor["endpoints"]:
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    # the ServiceMonitor's job label is the Service name; alerts match job="edge"
    assert service["metadata"]["name"] == "edge"
    assert "jobLabel" not in monitor


def test_autoscaler_targets_the_deployment_on_cpu() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = one("Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # the PDB leaves at least one pod up at the smallest scale
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
