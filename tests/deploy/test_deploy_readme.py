"""README: opens with exactly the two set-up commands, and they are real Makefile targets doing what it says."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _opening_block() -> tuple[str, list[str]]:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"```[a-z]*\n(.*?)```", text, re.S)
    assert m, "README has no code block"
    before = text[: m.start()]
    commands = [ln.split("#", 1)[0].strip() for ln in m.group(1).splitlines()]
    return before, [c for c in commands if c]


def test_readme_opens_with_exactly_two_commands():
    before, commands = _opening_block()
    assert [ln for ln in before.splitlines() if ln.strip()] == ["# jetserve"], "only the title may precede them"
    assert commands == ["make serve", "make test"]


def _make_dry_run(target: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    # under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering/Leaving directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(
        [make, "--no-print-directory", "-n", "-B", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_serve_installs_prepares_and_serves():
    plan = _make_dry_run("serve")
    assert "-m venv .venv" in plan and "pip install" in plan  # installs into .venv
    assert "jetserve demo prepare" in plan  # prepares the demo store
    assert plan.strip().splitlines()[-1].endswith("jetserve serve")  # then serves


def test_make_test_runs_the_suite():
    plan = _make_dry_run("test")
    assert "scripts/system-deps.sh" in plan and "jetserve demo prepare" in plan
    lines = plan.strip().splitlines()
    assert "-m pytest" in lines[-2] and "scripts/isa-matrix.sh" in lines[-1]


def test_serve_default_address_matches_readme():
    from server.config import Settings

    fields = Settings.model_fields
    assert "http://127.0.0.1:8000" in README.read_text(encoding="utf-8")
    assert (fields["host"].default, fields["port"].default) == ("127.0.0.1", 8000)


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target and not (REPO / target).exists():
            missing.append(target)
    assert not missing, missing


def test_readme_states_what_was_and_was_not_measured():
    text = README.read_text(encoding="utf-8")
    assert "Measured on CPU here" in text and "Not measured" in text
