"""Where total and available memory come from, per device kind.

- Integrated GPU (Jetson; `torch.cuda.get_device_properties(0).is_integrated`): CPU and GPU share RAM, and
  `cudaMemGetInfo` reports MemFree (too low: it ignores reclaimable page cache), so we read /proc/meminfo:
  MemTotal, MemAvailable and NvMapMemUsed (GPU-shared buffers).
- Discrete GPU: `torch.cuda.mem_get_info()` (free, total) of the device.
- CPU: /proc/meminfo when readable, else psutil.

Parsing is pure (`parse_meminfo`) and tested on fixture text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger(__name__)


def parse_meminfo(text: str) -> Dict[str, int]:
    """/proc/meminfo text -> {key: bytes}. Values with a `kB` unit are multiplied by 1024."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, rest = line.split(":", 1)
        fields = rest.split()
        if not fields:
            continue
        try:
            value = int(fields[0])
        except ValueError:
            continue
        if len(fields) > 1 and fields[1].lower() == "kb":
            value *= 1024
        out[key.strip()] = value
    return out


@dataclass(frozen=True)
class MemorySnapshot:
    """Bytes. `gpu_shared` is NvMapMemUsed on Jetson, None elsewhere."""

    total: int
    available: int
    gpu_shared: Optional[int] = None

    @property
    def used(self) -> int:
        return self.total - self.available


class MemorySource:
    """Base: `kind` names the source; `snapshot()` reads it now."""

    kind = "base"

    def snapshot(self) -> MemorySnapshot:  # pragma: no cover - interface
        raise NotImplementedError


class MeminfoMemory(MemorySource):
    """MemTotal / MemAvailable (/ NvMapMemUsed) from a meminfo file. Used for Jetson and for CPU."""

    def __init__(self, path: Path = Path("/proc/meminfo"), kind: str = "cpu"):
        self.path = Path(path)
        self.kind = kind

    def snapshot(self) -> MemorySnapshot:
        info = parse_meminfo(self.path.read_text())
        total = info["MemTotal"]
        avail = info.get("MemAvailable", info.get("MemFree", 0))
        return MemorySnapshot(total=total, available=avail, gpu_shared=info.get("NvMapMemUsed"))


class PsutilMemory(MemorySource):
    kind = "cpu"

    def snapshot(self) -> MemorySnapshot:
        import psutil

        vm = psutil.virtual_memory()
        return MemorySnapshot(total=int(vm.total), available=int(vm.available))


class CudaMemory(MemorySource):
    """Discrete GPU: cudaMemGetInfo via torch."""

    kind = "cuda"

    def __init__(self, device_index: int = 0):
        self.device_index = device_index

    def snapshot(self) -> MemorySnapshot:
        import torch

        free, total = torch.cuda.mem_get_info(self.device_index)
        return MemorySnapshot(total=int(total), available=int(free))


def memory_source_for(device: str, *, meminfo: Path = Path("/proc/meminfo")) -> MemorySource:
    """Pick the source for a resolved device string ("cpu", "cuda", "cuda:1")."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if torch.cuda.get_device_properties(index).is_integrated:
            logger.info("memory source: integrated GPU -> %s (MemAvailable, NvMapMemUsed)", meminfo)
            return MeminfoMemory(meminfo, kind="integrated")
        logger.info("memory source: discrete GPU %d -> cudaMemGetInfo", index)
        return CudaMemory(index)
    if meminfo.is_file():
        return MeminfoMemory(meminfo, kind="cpu")
    return PsutilMemory()


# ---------------------------------------------------------------- process memory (what a load costs)


def parse_status_kb(text: str, key: str) -> Optional[int]:
    """Bytes of one `Key:   123 kB` line of /proc/<pid>/status (None when absent)."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            fields = line.split(":", 1)[1].split()
            return int(fields[0]) * 1024
    return None


def file_rss_under(smaps_text: str, prefix: str) -> int:
    """Resident bytes of the mappings in /proc/<pid>/smaps whose file lies under directory `prefix`."""
    total = 0
    inside = False
    pre = prefix.rstrip("/") + "/"
    for line in smaps_text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # mapping header: addr perms offset dev inode [path]
            inside = len(head) == 6 and head[5].strip().startswith(pre)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def process_model_bytes(model_dir: Path, proc: Path = Path("/proc/self")) -> int:
    """Anonymous RSS of the process + resident pages of `model_dir`'s mmap'd files (bytes).

    The difference of this figure around a load is what the load costs: the runner's own tensors
    (anonymous) and the checkpoint pages it maps instead of copying. Shared-library code paged in by a
    first kernel call is runtime overhead shared by every model and is left out. Falls back to psutil RSS
    where /proc is unavailable.
    """
    try:
        anon = parse_status_kb((proc / "status").read_text(), "RssAnon")
        smaps = (proc / "smaps").read_text()
    except OSError:
        anon = None
    if anon is None:
        import psutil

        return int(psutil.Process().memory_info().rss)
    return anon + file_rss_under(smaps, str(Path(model_dir).resolve()))
