"""models.heap: release_freed_heap returns freed C-heap pages to the OS (glibc malloc_trim); keep_workspace_heap sets
glibc's thresholds once, and leaves them to an operator who set them. Its effect on a real prefill (no page faults):
tests/integration/test_prefill_heap.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, psutil, torch
from models.heap import release_freed_heap
p = psutil.Process()
r0 = p.memory_info().rss
xs = [torch.ones(256) for _ in range(200_000)]  # 1 KiB tensors: C heap, below glibc's mmap threshold
r1 = p.memory_info().rss
del xs
r2 = p.memory_info().rss
ok = release_freed_heap()
r3 = p.memory_info().rss
print(json.dumps({"ok": ok, "held": r1 - r0, "after_free": r2 - r0, "after_release": r3 - r0}))
"""


def test_freed_heap_goes_back_to_the_os():
    # a fresh process, so other tests' allocations do not blur the RSS readings
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r["ok"]:
        pytest.skip("libc without malloc_trim (not glibc)")
    mib = 2**20
    assert r["held"] > 150 * mib, r
    assert r["after_free"] > 100 * mib, r  # glibc keeps what Python freed ...
    assert r["after_release"] < 40 * mib, r  # ... until it is trimmed


KEEP = """
import json
from models.heap import keep_workspace_heap
print(json.dumps([keep_workspace_heap(), keep_workspace_heap()]))
"""


def _keep(env_extra: dict) -> list:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", KEEP], capture_output=True, text=True, timeout=120, check=True, env={**env, **env_extra}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_workspace_heap_sets_the_thresholds_once():
    first, second = _keep({})
    if "no mallopt" in first:
        pytest.skip("libc without mallopt (not glibc)")
    assert first == "mmap threshold 32 MiB, trim threshold 128 MiB"
    assert second == first  # once per process


def test_keep_workspace_heap_leaves_an_operators_thresholds():
    assert _keep({"MALLOC_TRIM_THRESHOLD_": "1048576"})[0] == "left as set by MALLOC_TRIM_THRESHOLD_"
