"""docker/compose.yaml and its Grafana provisioning.

No `docker compose` CLI exists in CI, so the file is validated against the vendored Compose Specification
schema (deploy/schemas/compose-spec.json, see its README) with jsonschema, after interpolating `${VAR:-x}`
defaults the way compose does, plus structural checks of what the deploy guide promises. Where the CLI
exists, `docker compose config` runs too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yaml"
SCHEMA = REPO / "deploy" / "schemas" / "compose-spec.json"
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


def _interpolate(node, env: dict):
    """Compose-style interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env) for v in node]
    if isinstance(node, str):

        def sub(m):
            name, op, arg = m.group(1), m.group(2), m.group(3)
            if env.get(name):
                return env[name]
            if op == "?":
                raise KeyError(f"{name}: {arg}")
            return arg or ""

        return _VAR.sub(sub, node)
    return node


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), {"JTOP_GID": "998"})


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def test_compose_matches_compose_spec_schema(compose, validator):
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_rejects_a_misspelled_key(compose, validator):
    broken = json.loads(json.dumps(compose))
    broken["services"]["jetserve"]["runtim"] = "nvidia"
    assert any("runtim" in e.message for e in validator.iter_errors(broken))


def test_missing_jtop_gid_is_a_clear_error():
    with pytest.raises(KeyError, match="JTOP_GID"):
        _interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), {})


def test_jetserve_service(compose):
    svc = compose["services"]["jetserve"]
    assert svc["runtime"] == "nvidia"
    assert svc["build"]["dockerfile"] == "Dockerfile.l4t"
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()
    targets = {v["target"]: v for v in svc["volumes"]}
    assert targets["/run/jtop.sock"]["source"] == "/run/jtop.sock"
    assert "/models" in targets
    assert "JETSERVE_MEMORY_BUDGET" in svc["environment"]
    assert any(p.endswith(":8000") for p in svc["ports"])
    assert "/health" in " ".join(svc["healthcheck"]["test"])


def test_prometheus_and_grafana_mounts_exist(compose):
    for name in ("prometheus", "grafana"):
        for vol in compose["services"][name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).resolve().exists(), f"{name}: {src} does not exist"
    prom = compose["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == REPO / "deploy" / "prometheus.yml"
    # prometheus.yml's relative rule_files must resolve next to the mounted config
    assert mounts["/etc/prometheus/rules"].endswith("deploy/rules")


def test_prometheus_scrapes_the_compose_service(compose):
    cfg = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "jetserve")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["jetserve:8000"]


def test_grafana_provisioning(compose):
    prov = REPO / "docker" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text(encoding="utf-8"))
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((prov / "dashboards" / "jetserve.yaml").read_text(encoding="utf-8"))
    (provider,) = dash["providers"]
    grafana = compose["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    dashboard_in_container = next(t for t in mounted if t.endswith(".json"))
    assert Path(dashboard_in_container).parent == Path(provider["options"]["path"])
    board = json.loads((COMPOSE.parent / mounted[dashboard_in_container]).read_text(encoding="utf-8"))
    uids = {t.get("datasource", {}).get("uid") for p in board["panels"] for t in p.get("targets", [])}
    assert uids <= {source["uid"], "${datasource}"}, uids


@pytest.mark.skipif(
    not (
        shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ),
    reason="docker compose CLI not installed",
)
def test_docker_compose_config():
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JTOP_GID": "998"},
    )
    assert proc.returncode == 0, proc.stderr
