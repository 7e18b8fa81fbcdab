"""The C heap (glibc malloc) under the runtime's CPU tensors: the one owner of how it is tuned and trimmed.

- `keep_workspace_heap()`: prefill allocates and frees megabyte-sized temporaries every call (each layer's
  dequantized weight, its activations). glibc serves blocks above its mmap threshold (128 KiB at first, raised
  to the size of the last such block freed) with fresh `mmap`s, and trims free memory at the top of a heap above
  twice that threshold; either way the pages go back to the kernel and every new temporary faults its pages in
  again, zero-filled. On a 2-core Xeon a 512-token prefill of SmolLM2 took 44-54 thousand page faults and
  205-217 ms; with the thresholds below, none and 146-156 ms (docs/benchmarks.md). Blocks up to `MMAP_THRESHOLD`
  then come from the heap, and up to `TRIM_THRESHOLD` of free memory stays with it for the next call: the
  resident set keeps the prefill's peak workspace, which the memory prediction already counts
  (`loader.workspace_bytes`). An operator's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` win (glibc reads
  them at start-up; we then leave both alone).
- `release_freed_heap()`: return the heap's free pages to the OS after a load, whatever the thresholds.

Where libc has no `mallopt` / `malloc_trim` (musl, macOS) both say so and change nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): bigger blocks are still mmap'd
TRIM_THRESHOLD = 128 * 2**20
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def keep_workspace_heap() -> str:
    """Set glibc's mmap threshold to MMAP_THRESHOLD and its trim threshold to TRIM_THRESHOLD, once per process
    (see the module docstring). Returns what was done (logged once), also when nothing was."""
    set_by = [k for k in ENV if os.environ.get(k)]
    if set_by:
        what = f"left as set by {', '.join(set_by)}"
    else:
        mallopt = getattr(_libc(), "mallopt", None)
        if mallopt is None:
            what = "unchanged: this libc has no mallopt"
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            what = f"mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
        else:
            what = "unchanged: mallopt refused the thresholds"
    logger.info("C heap: %s", what)
    return what


def release_freed_heap() -> bool:
    """Collect garbage, then return the C heap's free pages to the OS (glibc `malloc_trim(0)`).

    Returns False where libc has no malloc_trim (the garbage is still collected). The one heap-trimming helper:
    the loader, the server's load measurement and `jetserve eval` call it. Loading frees tens of MiB of
    unpack/repack temporaries that glibc keeps in its arenas: resident and counted by the OS (on a Jetson, against
    the RAM the GPU shares) though no tensor uses them. On SmolLM2 GPTQ g64 the RSS growth of a load fell from
    357-389 MiB (varying run to run) to 326 MiB against 331 MiB predicted.
    """
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
