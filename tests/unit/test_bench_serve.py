"""benchmarks/serve.py's per-thread CPU reading (/proc task times)."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from benchmarks.serve import _task_cpu_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc task times are Linux's")


def test_task_cpu_follows_this_threads_cpu_time():
    tid = threading.get_native_id()
    before = _task_cpu_s(os.getpid())
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.3:  # 0.3 s of this thread's CPU, whatever the load
        pass
    after = _task_cpu_s(os.getpid())
    assert tid in before and tid in after
    assert 0.2 <= after[tid] - before[tid] <= 5.0  # clock ticks: 10 ms resolution
    assert all(v >= 0 for v in after.values())
