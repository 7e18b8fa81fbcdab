"""Jetson telemetry parsing on fixture trees (L4T r36 Orin AGX / Orin Nano, r38 Thor) and memory sources."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from server.telemetry.jetson import (
    JetsonCollector,
    JtopReader,
    SysfsReader,
    is_jetson,
    jetson_collector,
    l4t_release,
    peak_bandwidth_gbps,
)
from server.telemetry.memory import (
    MeminfoMemory,
    file_rss_under,
    parse_meminfo,
    parse_status_kb,
    process_model_bytes,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "jetson"
ORIN, NANO, THOR = FIX / "orin-agx-r36", FIX / "orin-nano-r36", FIX / "thor-r38"


def samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_parse_meminfo_units():
    mi = parse_meminfo("MemTotal:  1000 kB\nMemAvailable: 250 kB\nHugePages_Total:   0\nbogus line\n")
    assert mi == {"MemTotal": 1024000, "MemAvailable": 256000, "HugePages_Total": 0}


def test_integrated_gpu_memory_source_reads_nvmap():
    snap = MeminfoMemory(ORIN / "proc/meminfo", kind="integrated").snapshot()
    assert snap.total == 64335836 * 1024
    assert snap.available == 58000000 * 1024
    assert snap.gpu_shared == 1048576 * 1024
    assert snap.used == (64335836 - 58000000) * 1024


def test_process_memory_parsers(tmp_path):
    status = "Name:\tpython\nRssAnon:\t  1000 kB\nRssFile:\t 50 kB\n"
    assert parse_status_kb(status, "RssAnon") == 1024000 and parse_status_kb(status, "Nope") is None
    smaps = (
        "7f00-7f10 r--s 00000000 fd:01 123 /store/m/model.safetensors\nSize: 64 kB\nRss: 40 kB\n"
        "7f10-7f20 r-xp 00000000 fd:01 124 /usr/lib/libtorch.so\nRss: 900 kB\n"
        "7f20-7f30 rw-p 00000000 00:00 0 \nRss: 7 kB\n"
        "7f30-7f40 r--s 00000000 fd:01 125 /store/m2/model.safetensors\nRss: 11 kB\n"
    )
    assert file_rss_under(smaps, "/store/m") == 40 * 1024
    assert file_rss_under(smaps, "/store/m/") == 40 * 1024
    # the real /proc of this process: pages of a mapped file under the folder are counted once touched
    f = tmp_path / "w.bin"
    f.write_bytes(b"\x01" * (4 << 20))
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert sum(mm[i] for i in range(0, len(mm), 4096)) == (4 << 20) // 4096
        assert file_rss_under(Path("/proc/self/smaps").read_text(), str(tmp_path)) == 4 << 20
        assert process_model_bytes(tmp_path) > 4 << 20


def test_detection_and_release():
    assert is_jetson(ORIN) and is_jetson(THOR) and is_jetson(NANO)
    assert not is_jetson(FIX)  # a tree without Tegra markers
    assert l4t_release(ORIN) == "36.4.3" and l4t_release(THOR) == "38.2.1"


@pytest.mark.parametrize(
    "model,mem,peak",
    [
        ("NVIDIA Jetson AGX Orin Developer Kit", 64 << 30, 204.8),
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 16 << 30, 102.4),
        ("NVIDIA Jetson Orin Nano Developer Kit", 8 << 30, 68.0),
        ("NVIDIA Jetson Orin Nano Developer Kit", 4 << 30, 34.0),
        ("NVIDIA Jetson AGX Thor Developer Kit", 128 << 30, 273.0),
        ("Raspberry Pi 5", 8 << 30, None),
    ],
)
def test_peak_bandwidth_table(model, mem, peak):
    assert peak_bandwidth_gbps(model, mem) == peak


def test_orin_r36_sysfs_reading():
    r = SysfsReader(ORIN).read()
    assert r.ram_total == 64335836 * 1024 and r.ram_used == (64335836 - 58000000) * 1024
    assert r.nvmap_used == 1048576 * 1024
    assert r.swap_used == 100000 * 1024
    assert r.gpu_util == pytest.approx(0.473) and r.gpu_freq_hz == 918e6 and r.gpu_max_freq_hz == 1300.5e6
    assert r.emc_freq_hz == 3199e6 and r.emc_util == pytest.approx(1599500 / 3199000)
    assert r.temps_c == {"cpu-thermal": 51.25, "gpu-thermal": 49.718, "soc0-thermal": 48.187, "tj-thermal": 51.812}
    assert r.rails_w == pytest.approx(
        {
            "VDD_GPU_SOC": 5.072 * 1.968,
            "VDD_CPU_CV": 5.080 * 0.476,
            "VIN_SYS_5V0": 5.048 * 1.144,
            "VDDQ_VDD2_1V8AO": 5.008 * 0.160,
        }
    )
    assert r.board_power_w() == pytest.approx(sum(r.rails_w.values()))  # AGX Orin: no input rail


def test_orin_nano_uses_vdd_in_rail():
    r = SysfsReader(NANO).read()
    assert r.board_power_w() == pytest.approx(5.056 * 1.6)
    assert r.gpu_util == pytest.approx(0.999) and r.emc_util is None and r.emc_freq_hz is None


def test_thor_r38_sysfs_reading():
    r = SysfsReader(THOR).read()
    assert r.gpu_freq_hz == 1575e6 and r.gpu_util is None  # no load node: absent, not zero
    assert r.emc_freq_hz == 4266e6 and r.emc_util is None
    assert r.rails_w == pytest.approx({"VIN": 31.25, "VDD_GPU": 9.8, "VDD_CPU_SOC_MSS": 7.4})
    assert r.board_power_w() == pytest.approx(31.25)
    assert r.nvmap_used is None and r.swap_total == 0


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_collector_metrics_energy_per_token_and_bandwidth_efficiency():
    clock = Clock()
    tokens = {"n": 0}
    reg = CollectorRegistry()
    coll = JetsonCollector(
        SysfsReader(NANO),
        model="Orin Nano",
        peak_gbps=68.0,
        tokens_fn=lambda: tokens["n"],
        bandwidth_fn=lambda: 34e9,
        clock=clock,
    )
    reg.register(coll)
    s = samples(reg)  # first scrape: no interval yet
    watts = 5.056 * 1.6
    assert s[("jetserve:jetson_power_watts", (("rail", "VDD_IN"),))] == pytest.approx(watts)
    assert s[("jetserve:jetson_gpu_utilization_ratio", ())] == pytest.approx(0.999)
    assert s[("jetserve:jetson_temperature_celsius", (("zone", "cpu-thermal"),))] == 55.0
    assert s[("jetserve:jetson_nvmap_bytes", ())] == 524288 * 1024
    assert s[("jetserve:bandwidth_efficiency_ratio", ())] == pytest.approx(0.5)
    assert ("jetserve:joules_per_token", ()) not in s
    clock.t += 10.0
    tokens["n"] = 200
    s = samples(reg)
    assert s[("jetserve:jetson_energy_joules_total", ())] == pytest.approx(watts * 10)
    assert s[("jetserve:joules_per_token", ())] == pytest.approx(watts * 10 / 200)
    assert ("jetserve:jetson_emc_utilization_ratio", ()) not in s


def test_metrics_auto_detects_fixture_board_and_is_absent_off_jetson():
    m = Metrics(jetson_root=ORIN, use_jtop=False)
    text = m.exposition().decode()
    assert (
        'jetserve:jetson_info{model="NVIDIA Jetson AGX Orin Developer Kit",peak_bandwidth_gbps="204.8",source="sysfs"} 1.0'
        in text
    )
    assert "jetserve:jetson_emc_utilization_ratio 0.5" in text
    off = Metrics(jetson_root=FIX, use_jtop=False).exposition().decode()
    assert "jetson" not in off and "joules_per_token" not in off
    assert jetson_collector(FIX) is None


class FakeJtop:
    memory = {
        "RAM": {"tot": 7_800_000, "used": 3_000_000},
        "SWAP": {"tot": 3_900_000, "used": 10},
        "EMC": {"cur": 2_133_000, "max": 3_199_000, "val": 37},
    }
    gpu = {"gpu": {"status": {"load": 81.5}, "freq": {"cur": 612_000, "max": 1_020_000}}}
    temperature = {"cpu": {"temp": 50.5, "online": True}, "cv0": {"temp": -256.0, "online": False}}
    power = {
        "rail": {"VDD_IN": {"power": 7200, "online": True}, "VDD_SOC": {"power": 1400, "online": True}},
        "tot": {"power": 7200},
    }


def test_jtop_reader_maps_fields():
    r = JtopReader(FakeJtop(), root=NANO).read()
    assert r.ram_total == 7_800_000 * 1024 and r.ram_used == 3_000_000 * 1024
    assert r.emc_util == pytest.approx(0.37) and r.emc_freq_hz == 2.133e9
    assert r.gpu_util == pytest.approx(0.815) and r.gpu_freq_hz == 612e6
    assert r.temps_c == {"cpu": 50.5}
    assert r.rails_w == {"VDD_IN": 7.2, "VDD_SOC": 1.4} and r.board_power_w() == 7.2
    assert r.nvmap_used == 524288 * 1024


def test_jtop_absent_falls_back_to_sysfs():
    # jetson-stats is not installed here: connect() gives None and the collector reads sysfs
    assert JtopReader.connect(ORIN) is None
    coll = jetson_collector(ORIN, use_jtop=True)
    assert coll is not None and coll.reader.source == "sysfs"
