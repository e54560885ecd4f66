"""The Helm chart, linted and rendered by the real Helm engine (helm-python-sdk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "modelops"


def render(values: dict[str, Any] | None = None, namespace: str = "modelops-system") -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    out = chart.render(values or {}, name="modelops", namespace=namespace, is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_chart_crd_is_the_canonical_crd() -> None:
    assert (CHART / "crds" / "modeldeployments.modelops.dev.yaml").read_bytes() == \
        (ROOT / "crds" / "modeldeployments.modelops.dev.yaml").read_bytes()


def test_lint_is_clean() -> None:
    result = helm.lint(str(CHART), strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_default_render_is_one_recreate_operator_with_restricted_security() -> None:
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/modelops/operator:0.1.0"
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["resources"]["limits"]
    assert not any(a.startswith("--namespace") for a in c["args"])


def test_image_by_digest_wins_over_tag() -> None:
    digest = "sha256:" + "a" * 64
    (dep,) = [d for d in render({"image": {"repository": "r/op", "tag": "9", "digest": digest}})
              if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"r/op@{digest}"


def test_namespaced_scope_gets_roles_per_namespace_and_watches_only_those() -> None:
    docs = render({"rbac": {"scope": "namespace", "watchNamespaces": ["team-a", "team-b"]}})
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    default_ns = render({"rbac": {"scope": "namespace"}}, namespace="ml")
    assert [r["metadata"]["namespace"] for r in default_ns if r["kind"] == "Role"] == ["ml"]


def test_rbac_rules_are_exactly_the_checked_in_list_and_least_privilege() -> None:
    expected = yaml.safe_load((ROOT / "tests" / "data" / "expected-rbac-rules.yaml").read_text())
    (role,) = [d for d in render() if d["kind"] == "ClusterRole"]
    assert role["rules"] == expected
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        assert "secrets" not in rule["resources"]


def test_service_monitor_is_optional() -> None:
    assert not [d for d in render() if d["kind"] == "ServiceMonitor"]
    (sm,) = [d for d in render({"metrics": {"serviceMonitor": {"enabled": True}}}) if d["kind"] == "ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("values", [
    {"rbac": {"scope": "everywhere"}},
    {"image": {"repository": "x", "digest": "latest"}},
    {"operator": {"workers": 0}},
    {"unknownKey": 1},
])
def test_values_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmError):
        render(values)


def test_notes_tell_the_user_what_to_do_next() -> None:
    chart = helm.Chart.load(str(CHART))
    notes = chart.render({}, name="modelops", namespace="ops", is_install=True)["modelops/templates/NOTES.txt"]
    assert "kubectl apply" in notes and "modelops promote" in notes


def test_argocd_configmap_snippet_carries_the_health_check_verbatim() -> None:
    patch = yaml.safe_load((ROOT / "argocd" / "argocd-cm-patch.yaml").read_text())
    lua = patch["data"]["resource.customizations.health.modelops.dev_ModelDeployment"]
    assert lua.strip() == (ROOT / "argocd" / "health.lua").read_text().strip()


def test_gitops_examples_are_argocd_applications() -> None:
    for path in (ROOT / "examples" / "gitops").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "Application", path
        assert doc["spec"]["destination"]["namespace"] and doc["spec"]["source"]["path"]
        assert (ROOT / doc["spec"]["source"]["path"]).exists(), path


def test_readme_reference_is_generated_from_the_current_crd() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (ROOT / "README.md").read_text()
    section = readme.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    assert section.strip() == gen.generate().strip(), "run: python docs/gen_reference.py --write"
    assert "make demo" in readme and "make test" in readme
