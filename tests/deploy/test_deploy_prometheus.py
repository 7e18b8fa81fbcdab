"""Prometheus config and alert rules, checked by the real promtool (Debian `prometheus`; scripts/system-deps.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = sorted((DEPLOY / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "rules" / "tests").glob("*.yml"))


def _promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run scripts/system-deps.sh (make test does)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_check_config():
    proc = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the rule_files glob must pick up our rules, not match nothing
    assert all(f"Checking {r}" in proc.stdout or r.name in proc.stdout for r in RULES), proc.stdout


def test_promtool_check_rules():
    assert RULES, "no rule files under deploy/rules"
    proc = _promtool("check", "rules", *map(str, RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests():
    assert RULE_TESTS
    proc = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_fail_when_a_threshold_changes(tmp_path):
    """The promtool unit tests are sensitive: raising the TTFT threshold must break them."""
    (tmp_path / "tests").mkdir()
    src = (DEPLOY / "rules" / "jetserve-alerts.yml").read_text(encoding="utf-8")
    assert "jetserve:time_to_first_token_seconds:p95_5m > 2\n" in src
    (tmp_path / "jetserve-alerts.yml").write_text(
        src.replace(
            "jetserve:time_to_first_token_seconds:p95_5m > 2\n", "jetserve:time_to_first_token_seconds:p95_5m > 10\n"
        ),
        encoding="utf-8",
    )
    for t in RULE_TESTS:
        shutil.copy(t, tmp_path / "tests" / t.name)
    proc = _promtool("test", "rules", *[str(tmp_path / "tests" / t.name) for t in RULE_TESTS])
    assert proc.returncode != 0
    assert "JetserveHighTTFT" in proc.stdout + proc.stderr


def test_every_alert_has_severity_summary_and_description():
    import yaml

    names = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    names.add(rule["alert"])
                    assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert {
        "JetserveInstanceDown",
        "JetserveHighTTFT",
        "JetserveQueueBuildingUp",
        "JetserveMemoryNearBudget",
        "JetsonThermalThrottling",
    } <= names
    tested = "".join(t.read_text(encoding="utf-8") for t in RULE_TESTS)
    assert all(f"alertname: {n}" in tested for n in names), "every alert needs a promtool unit test"
