"""Kubernetes manifests, the systemd unit, and every JETSERVE_* variable the deploy assets set.

No cluster exists in CI: manifests are parsed and cross-checked here (Service -> Deployment port,
ServiceMonitor -> Service labels, probes), and built with `kubectl kustomize` when kubectl is installed.
The unit file is checked with `systemd-analyze verify` when systemd is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
UNIT = REPO / "deploy" / "systemd" / "jetserve.service"
ENV_FILE = REPO / "deploy" / "systemd" / "jetserve.env"


def _docs() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") != "Kustomization":
                assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
                out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return _docs()


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_deployment(k8s):
    dep = k8s["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pod["runtimeClassName"] == "nvidia" == k8s["RuntimeClass"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    assert c["envFrom"][0]["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert mounts["/models"] in volumes and k8s["ConfigMap"]["data"]["JETSERVE_MODEL_STORE"] == "/models"
    assert volumes[mounts["/run/jtop.sock"]]["hostPath"]["type"] == "Socket"
    # the pod's grace period must cover jetserve's own drain time
    assert pod["terminationGracePeriodSeconds"] > float(k8s["ConfigMap"]["data"]["JETSERVE_SHUTDOWN_GRACE_S"])


def test_service_and_servicemonitor_select_the_pods(k8s):
    dep, svc, sm = k8s["Deployment"], k8s["Service"], k8s["ServiceMonitor"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    namespaced = [d for k, d in k8s.items() if k not in ("Namespace", "RuntimeClass")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {k8s["Namespace"]["metadata"]["name"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds():
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(proc.stdout) if d}
    assert {
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "Namespace",
        "RuntimeClass",
    } <= kinds


def _unit() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            k, _, v = line.partition("=")
            current[k] = v
    return sections


def test_systemd_unit_contract():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Restart"] == "on-failure"
    assert re.fullmatch(r"\d+[KMGT]?", svc["MemoryMax"])
    assert svc["ExecStart"].endswith("/.venv/bin/jetserve serve")
    assert svc["EnvironmentFile"] == "/etc/jetserve/jetserve.env"
    assert svc["User"] != "root"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    grace = float(_env_file()["JETSERVE_SHUTDOWN_GRACE_S"]) if "JETSERVE_SHUTDOWN_GRACE_S" in _env_file() else 30.0
    assert float(svc["TimeoutStopSec"].rstrip("s")) > grace


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd's own parser: unknown keys or bad values show up on stderr (its exit code stays 0 for them)."""
    exe = tmp_path / "jetserve"
    exe.write_text("#!/bin/sh\n", encoding="utf-8")
    exe.chmod(0o755)
    unit = tmp_path / "jetserve.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/jetserve/.venv/bin/jetserve", str(exe)), encoding="utf-8"
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", unit.name], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    problems = [ln for ln in proc.stderr.splitlines() if "jetserve.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stderr
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nRestartt=always\n", encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", bad.name], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert "Unknown key" in proc.stderr  # the check above can fail


def _env_file() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def test_every_jetserve_variable_in_deploy_assets_is_a_real_setting():
    """A typo like JETSERVE_MEMORY_BUGDET would be silently ignored (extra="ignore"): catch it here."""
    from server.config import Settings

    known = {f"JETSERVE_{name.upper()}" for name in Settings.model_fields}
    files = [
        ENV_FILE,
        *K8S.glob("*.yaml"),
        REPO / "docker" / "compose.yaml",
        REPO / "Dockerfile.l4t",
        REPO / "docker" / "Dockerfile.cpu",
    ]
    used = {}
    for f in files:
        for name in re.findall(r"\bJETSERVE_[A-Z0-9_]+", f.read_text(encoding="utf-8")):
            used.setdefault(name, f.name)
    # compose's own variables (image tag, host paths, published port) are not server settings
    compose_only = {"JETSERVE_IMAGE", "JETSERVE_MODELS", "JETSERVE_PUBLISH"}
    unknown = {n: f for n, f in used.items() if n not in known | compose_only}
    assert not unknown, unknown
    assert {"JETSERVE_MEMORY_BUDGET", "JETSERVE_MODEL_STORE"} <= set(used)
    for key, value in _env_file().items():
        Settings.model_validate({key[len("JETSERVE_") :].lower(): value} if value else {})


def test_prometheusrule_matches_rules_file(k8s):
    proc = subprocess.run(
        [sys.executable, str(K8S / "sync_rules.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rules = yaml.safe_load((REPO / "deploy" / "rules" / "jetserve-alerts.yml").read_text(encoding="utf-8"))
    assert k8s["PrometheusRule"]["spec"]["groups"] == rules["groups"]
    assert (
        k8s["PrometheusRule"]["metadata"]["labels"]["release"] == k8s["ServiceMonitor"]["metadata"]["labels"]["release"]
    )
