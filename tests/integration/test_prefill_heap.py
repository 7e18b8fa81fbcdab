"""A real 512-token prefill (SmolLM2 GPTQ g64 with its bf16 head, the loader's default) faults in no fresh pages
once warm: models.heap.keep_workspace_heap, which load_runner applies, keeps its temporaries' pages in the heap.
With glibc's defaults the same prefill took 18-20 thousand minor page faults a call on the 2-core dev box
(docs/benchmarks.md), so this fails if the tuning is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, resource, sys, torch
from models.loader import load_runner
from models.threads import run_in_fresh_thread

def go():
    r = load_runner(sys.argv[1], dtype=torch.bfloat16, max_batch_size=2, max_seq=1024)
    x = torch.randint(100, 40000, (512,), generator=torch.Generator().manual_seed(0))
    faults = []
    with torch.inference_mode():
        for i in range(5):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            r.prefill(x, 0, 0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return faults

print(json.dumps(run_in_fresh_thread(go)))
"""


def test_warm_prefill_faults_in_no_pages(model_store: Path):
    from models.heap import keep_workspace_heap

    if "no mallopt" in keep_workspace_heap():
        pytest.skip("libc without mallopt (not glibc)")
    d = model_store / "smollm2-135m-instruct-gptq-g64"
    if not (d / "config.json").is_file():
        pytest.skip(f"{d} missing: run `jetserve demo prepare` (make test does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(d)], capture_output=True, text=True, timeout=300, check=True, env=env
    )
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    # the first calls may still grow the heap; a 512-token prefill's temporaries are ~90 MiB (23 thousand pages)
    assert min(faults[2:]) < 500, faults
