"""docs/configuration.md is generated from server.config.Settings and must not drift from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_config_docs.py"
DOC = REPO / "docs" / "configuration.md"


def test_configuration_doc_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr + "\nregenerate with: .venv/bin/python scripts/gen_config_docs.py"


def test_every_setting_is_documented_with_its_env_var():
    from server.config import Settings

    text = DOC.read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `{name}` | `JETSERVE_{name.upper()}` |" in text, name


def test_check_mode_detects_drift(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("JETSERVE_MAX_QUEUE", "JETSERVE_MAX_Q"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(stale)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "out of date" in proc.stderr
