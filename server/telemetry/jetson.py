"""Jetson board telemetry as Prometheus metrics: through jtop when its service runs, else /proc and sysfs.

Everything is read under a `root` path (default "/") so tests run on fixture trees laid out like L4T r36
(Orin) and r38 (Thor) in tests/fixtures/jetson/. Off a Jetson `jetson_collector()` returns None and no
board metric exists at all (absent, not zero).

sysfs sources (first match wins):
- memory: /proc/meminfo (MemTotal, MemAvailable, NvMapMemUsed, SwapTotal, SwapFree)
- GPU: devfreq `/sys/class/devfreq/{17000000.gpu (Orin, r36) | gpu-gpc-0 (Thor, r38)}`: cur_freq, max_freq (Hz);
  load (permille) from `<devfreq>/device/load`
- EMC: frequency from `/sys/class/devfreq/bwmgr/cur_freq` (Thor) or
  `/sys/kernel/debug/bpmp/debug/clk/emc/rate` (Orin, root only); utilization = actmon
  `/sys/kernel/actmon_avg_activity/mc_all` (kHz of busy cycles) / EMC frequency in kHz
- temperatures: `/sys/class/thermal/thermal_zone*/{type,temp}` (millidegrees; -256 C marks an offline zone)
- power: INA3221/INA238 hwmon (`/sys/class/hwmon/hwmon*` and `/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*`):
  rail name from in<N>_label; power<N>_input (uW) when present, else in<N>_input (mV) x curr<N>_input (mA)

Derived figures:
- energy per generated token: board power (rail VDD_IN / VIN when present, else the sum of all rails; AGX
  Orin has no input rail) integrated (trapezoid) between scrapes, divided by the tokens generated meanwhile.
- bandwidth efficiency: achieved weight bytes/s during engine steps (server.metrics) / the board's peak DRAM
  bandwidth from `PEAK_BANDWIDTH`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.telemetry.memory import parse_meminfo

logger = logging.getLogger(__name__)

PREFIX = "jetserve:jetson_"
GB = 1e9

# (substring of /proc/device-tree/model, lowercase), peak DRAM GB/s; Orin Nano split by RAM size below.
PEAK_BANDWIDTH: Tuple[Tuple[str, float], ...] = (
    ("agx thor", 273.0),
    ("thor", 273.0),
    ("agx orin", 204.8),
    ("orin nx", 102.4),
    ("orin nano", 68.0),  # 8GB; 4GB is 34.0 (see peak_bandwidth_gbps)
)
TOTAL_RAILS = ("VDD_IN", "VIN")
GPU_DEVFREQ = ("17000000.gpu", "gpu-gpc-0", "17000000.ga10b", "57000000.gpu")


def peak_bandwidth_gbps(model: str, mem_total_bytes: Optional[int]) -> Optional[float]:
    """Peak DRAM bandwidth (GB/s) of a board from its device-tree model string; None if unknown."""
    m = model.lower()
    for key, gbps in PEAK_BANDWIDTH:
        if key in m:
            if key == "orin nano" and mem_total_bytes is not None and mem_total_bytes < 6 * 1024**3:
                return 34.0
            return gbps
    return None


@dataclass
class JetsonReading:
    """One snapshot. Bytes, ratios in [0, 1], Hz, degrees C, watts. None = not readable on this board."""

    ram_total: Optional[int] = None
    ram_used: Optional[int] = None
    nvmap_used: Optional[int] = None
    swap_total: Optional[int] = None
    swap_used: Optional[int] = None
    emc_util: Optional[float] = None
    emc_freq_hz: Optional[float] = None
    gpu_util: Optional[float] = None
    gpu_freq_hz: Optional[float] = None
    gpu_max_freq_hz: Optional[float] = None
    temps_c: Dict[str, float] = field(default_factory=dict)
    rails_w: Dict[str, float] = field(default_factory=dict)

    def board_power_w(self) -> Optional[float]:
        for name in TOTAL_RAILS:
            if name in self.rails_w:
                return self.rails_w[name]
        return sum(self.rails_w.values()) if self.rails_w else None


# ---------------------------------------------------------------- sysfs reader


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip().strip("\x00")
    except (OSError, UnicodeDecodeError):
        return None


def _num(path: Path) -> Optional[float]:
    s = _read(path)
    if s is None:
        return None
    try:
        return float(s.split()[0])
    except (ValueError, IndexError):
        return None


def is_jetson(root: Path = Path("/")) -> bool:
    """A Tegra board: /etc/nv_tegra_release exists or the device-tree model names a Jetson."""
    root = Path(root)
    if (root / "etc/nv_tegra_release").is_file():
        return True
    model = _read(root / "proc/device-tree/model") or ""
    return "jetson" in model.lower()


def board_model(root: Path = Path("/")) -> str:
    return _read(Path(root) / "proc/device-tree/model") or ""


def l4t_release(root: Path = Path("/")) -> Optional[str]:
    """'36.4.3' from '# R36 (release), REVISION: 4.3, ...' in /etc/nv_tegra_release."""
    text = _read(Path(root) / "etc/nv_tegra_release") or ""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


class SysfsReader:
    """Reads a JetsonReading from /proc and sysfs under `root`."""

    source = "sysfs"

    def __init__(self, root: Path = Path("/")):
        self.root = Path(root)

    def _gpu_devfreq(self) -> Optional[Path]:
        base = self.root / "sys/class/devfreq"
        for name in GPU_DEVFREQ:
            if (base / name).is_dir():
                return base / name
        return None

    def _hwmon_dirs(self) -> List[Path]:
        seen, out = set(), []
        for pattern in ("sys/class/hwmon/hwmon*", "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"):
            for d in sorted(self.root.glob(pattern)):
                key = d.resolve()
                if key in seen:
                    continue
                seen.add(key)
                name = (_read(d / "name") or "").lower()
                if name.startswith("ina") or pattern.startswith("sys/bus"):
                    out.append(d)
        return out

    def rails(self) -> Dict[str, float]:
        rails: Dict[str, float] = {}
        for d in self._hwmon_dirs():
            for label_file in sorted(d.glob("in*_label")):
                n = label_file.name[2 : -len("_label")]
                label = _read(label_file)
                if not label or label.upper() == "NC":
                    continue
                power_uw = _num(d / f"power{n}_input")
                if power_uw is not None:
                    rails[label] = power_uw / 1e6
                    continue
                mv, ma = _num(d / f"in{n}_input"), _num(d / f"curr{n}_input")
                if mv is not None and ma is not None:
                    rails[label] = mv * ma / 1e6
        return rails

    def temps(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for z in sorted(self.root.glob("sys/class/thermal/thermal_zone*")):
            name, t = _read(z / "type"), _num(z / "temp")
            if name and t is not None and t > -40000:
                out[name] = t / 1000.0
        return out

    def read(self) -> JetsonReading:
        r = JetsonReading()
        mem_text = _read(self.root / "proc/meminfo")
        if mem_text:
            mi = parse_meminfo(mem_text)
            if "MemTotal" in mi:
                r.ram_total = mi["MemTotal"]
                r.ram_used = mi["MemTotal"] - mi.get("MemAvailable", mi.get("MemFree", 0))
            r.nvmap_used = mi.get("NvMapMemUsed")
            if "SwapTotal" in mi:
                r.swap_total = mi["SwapTotal"]
                r.swap_used = mi["SwapTotal"] - mi.get("SwapFree", 0)
        gpu = self._gpu_devfreq()
        if gpu is not None:
            r.gpu_freq_hz = _num(gpu / "cur_freq")
            r.gpu_max_freq_hz = _num(gpu / "max_freq")
            load = _num(gpu / "device/load")
            if load is not None:
                r.gpu_util = min(1.0, load / 1000.0)
        emc = _num(self.root / "sys/class/devfreq/bwmgr/cur_freq")
        if emc is None:
            emc = _num(self.root / "sys/kernel/debug/bpmp/debug/clk/emc/rate")
        r.emc_freq_hz = emc
        mc_all = _num(self.root / "sys/kernel/actmon_avg_activity/mc_all")
        if mc_all is not None and emc:
            r.emc_util = min(1.0, mc_all / (emc / 1000.0))
        r.temps_c = self.temps()
        r.rails_w = self.rails()
        return r


# ---------------------------------------------------------------- jtop reader


class JtopReader:
    """Reads through a running jtop client (jetson-stats). NvMap comes from /proc/meminfo (jtop lacks it)."""

    source = "jtop"

    def __init__(self, client, root: Path = Path("/")):
        self.client = client
        self.root = Path(root)

    @classmethod
    def connect(cls, root: Path = Path("/")) -> Optional["JtopReader"]:
        """A reader when the jtop service answers, else None (jtop missing or JtopException)."""
        try:
            from jtop import JtopException, jtop
        except ImportError:
            return None
        try:
            client = jtop()
            client.start()
        except JtopException as e:
            logger.info("jtop service not available (%s): reading /proc and sysfs", e)
            return None
        return cls(client, root)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # jtop raises its own errors on a dead socket; closing is best effort
            logger.debug("jtop close failed", exc_info=True)

    def read(self) -> JetsonReading:
        j = self.client
        r = JetsonReading()
        mem = getattr(j, "memory", {}) or {}
        ram, swap, emc = mem.get("RAM") or {}, mem.get("SWAP") or {}, mem.get("EMC") or {}
        if "tot" in ram:
            r.ram_total = int(ram["tot"]) * 1024
            r.ram_used = int(ram.get("used", 0)) * 1024
        if "tot" in swap:
            r.swap_total = int(swap["tot"]) * 1024
            r.swap_used = int(swap.get("used", 0)) * 1024
        if "val" in emc:
            r.emc_util = float(emc["val"]) / 100.0
        if "cur" in emc:
            r.emc_freq_hz = float(emc["cur"]) * 1000.0
        for g in (getattr(j, "gpu", {}) or {}).values():
            status, freq = g.get("status") or {}, g.get("freq") or {}
            if "load" in status:
                r.gpu_util = float(status["load"]) / 100.0
            if "cur" in freq:
                r.gpu_freq_hz = float(freq["cur"]) * 1000.0
            if "max" in freq:
                r.gpu_max_freq_hz = float(freq["max"]) * 1000.0
            break
        for zone, t in (getattr(j, "temperature", {}) or {}).items():
            if t.get("online", True) and t.get("temp", -256) > -40:
                r.temps_c[zone] = float(t["temp"])
        for rail, p in ((getattr(j, "power", {}) or {}).get("rail") or {}).items():
            if p.get("online", True) and "power" in p:
                r.rails_w[rail] = float(p["power"]) / 1000.0
        mi = parse_meminfo(_read(self.root / "proc/meminfo") or "")
        r.nvmap_used = mi.get("NvMapMemUsed")
        return r


# ---------------------------------------------------------------- collector


class JetsonCollector(Collector):
    """Prometheus collector over a reader. `tokens_fn()` -> generated tokens so far; `bandwidth_fn()` -> achieved
    weight bytes/s (server.metrics.Metrics). Readings happen at scrape time (cheap file reads)."""

    def __init__(
        self,
        reader,
        *,
        model: str = "",
        peak_gbps: Optional[float] = None,
        tokens_fn: Optional[Callable[[], int]] = None,
        bandwidth_fn: Optional[Callable[[], float]] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.reader = reader
        self.model = model
        self.peak_gbps = peak_gbps
        self.tokens_fn = tokens_fn
        self.bandwidth_fn = bandwidth_fn
        self.clock = clock
        self._lock = threading.Lock()
        self._energy_j = 0.0
        self._last: Optional[Tuple[float, float, int]] = None  # (time, watts, tokens)
        self._j_per_token: Optional[float] = None

    def _integrate(self, watts: Optional[float]) -> None:
        if watts is None:
            return
        now = self.clock()
        tokens = int(self.tokens_fn()) if self.tokens_fn else 0
        with self._lock:
            if self._last is not None:
                t0, w0, tok0 = self._last
                de = (w0 + watts) / 2.0 * max(0.0, now - t0)
                self._energy_j += de
                if tokens > tok0:
                    self._j_per_token = de / (tokens - tok0)
            self._last = (now, watts, tokens)

    def collect(self) -> Iterable:
        try:
            r = self.reader.read()
        except Exception:
            logger.exception("reading Jetson telemetry (%s) failed", getattr(self.reader, "source", "?"))
            return
        info = GaugeMetricFamily(
            PREFIX + "info", "Board and telemetry source (value 1).", labels=["model", "source", "peak_bandwidth_gbps"]
        )
        info.add_metric([self.model, self.reader.source, "" if self.peak_gbps is None else f"{self.peak_gbps:g}"], 1)
        yield info

        def g(name, doc, value):
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=float(value))

        yield from g("ram_total_bytes", "RAM total (MemTotal).", r.ram_total)
        yield from g("ram_used_bytes", "RAM used (MemTotal - MemAvailable).", r.ram_used)
        yield from g("nvmap_bytes", "GPU-shared memory in use (NvMapMemUsed).", r.nvmap_used)
        yield from g("swap_total_bytes", "Swap total.", r.swap_total)
        yield from g("swap_used_bytes", "Swap used.", r.swap_used)
        yield from g("emc_utilization_ratio", "Memory-controller (EMC) utilization.", r.emc_util)
        yield from g("emc_frequency_hertz", "EMC frequency.", r.emc_freq_hz)
        yield from g("gpu_utilization_ratio", "GPU load (devfreq load / 1000).", r.gpu_util)
        yield from g("gpu_frequency_hertz", "GPU current frequency.", r.gpu_freq_hz)
        yield from g("gpu_max_frequency_hertz", "GPU max frequency.", r.gpu_max_freq_hz)
        if r.temps_c:
            t = GaugeMetricFamily(PREFIX + "temperature_celsius", "Thermal zone temperature.", labels=["zone"])
            for zone, c in sorted(r.temps_c.items()):
                t.add_metric([zone], c)
            yield t
        if r.rails_w:
            p = GaugeMetricFamily(PREFIX + "power_watts", "Power per rail (INA3221/INA238).", labels=["rail"])
            for rail, w in sorted(r.rails_w.items()):
                p.add_metric([rail], w)
            yield p
        board_w = r.board_power_w()
        self._integrate(board_w)
        if board_w is not None:
            yield GaugeMetricFamily(
                PREFIX + "board_power_watts", "Board power (VDD_IN/VIN rail, else sum of rails).", value=board_w
            )
            c = CounterMetricFamily(PREFIX + "energy_joules", "Board energy integrated between scrapes.")
            c.add_metric([], self._energy_j)
            yield c
        if self._j_per_token is not None:
            yield GaugeMetricFamily(
                "jetserve:joules_per_token",
                "Board energy per generated token over the last scrape interval with tokens.",
                value=self._j_per_token,
            )
        if self.bandwidth_fn is not None and self.peak_gbps:
            bw = self.bandwidth_fn()
            if bw > 0:
                yield GaugeMetricFamily(
                    "jetserve:bandwidth_efficiency_ratio",
                    "Achieved weight bytes/s during engine steps / board peak DRAM bandwidth.",
                    value=bw / (self.peak_gbps * GB),
                )


def jetson_collector(
    root: Path = Path("/"),
    *,
    use_jtop: bool = True,
    tokens_fn: Optional[Callable[[], int]] = None,
    bandwidth_fn: Optional[Callable[[], float]] = None,
) -> Optional[JetsonCollector]:
    """A collector for this board (jtop when its service answers, else sysfs), or None off a Jetson."""
    root = Path(root)
    if not is_jetson(root):
        return None
    reader = JtopReader.connect(root) if use_jtop else None
    if reader is None:
        reader = SysfsReader(root)
    model = board_model(root)
    mem = parse_meminfo(_read(root / "proc/meminfo") or "").get("MemTotal")
    peak = peak_bandwidth_gbps(model, mem)
    logger.info(
        "Jetson telemetry: %s (L4T %s) via %s, peak bandwidth %s GB/s",
        model or "unknown board",
        l4t_release(root),
        reader.source,
        peak,
    )
    return JetsonCollector(reader, model=model, peak_gbps=peak, tokens_fn=tokens_fn, bandwidth_fn=bandwidth_fn)
