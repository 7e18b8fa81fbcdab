#!/usr/bin/env python3
"""Write deploy/grafana/jetserve-dashboard.json (Grafana 10+/11 schema) from the panel list below.

    python deploy/grafana/make_dashboard.py           # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check   # exit 1 if the JSON differs

Edit panels here, not in the JSON. tests/deploy/test_deploy_dashboard_metrics.py checks that every metric
the dashboard queries exists in jetserve's real /metrics exposition.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "jetserve-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'


def _q(expr: str, legend: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def _quantiles(metric: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
    return [
        _q(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
            f"p{int(q * 100)}",
        )
        for q in qs
    ]


# (row title, [(panel title, unit, targets, description)])
ROWS = [
    (
        "Serving",
        [
            (
                "Generated tokens/s",
                "tokens/s (generation)",
                [
                    _q(
                        f"sum by (instance) (rate(jetserve:generation_tokens_total{{{SEL}}}[$__rate_interval]))",
                        "generated {{instance}}",
                    ),
                    _q(
                        f"sum by (instance) (rate(jetserve:prompt_tokens_total{{{SEL}}}[$__rate_interval]))",
                        "prompt {{instance}}",
                    ),
                ],
                "Aggregate throughput across all concurrent requests.",
            ),
            (
                "Per-request decode tok/s",
                "tokens/s (per request)",
                _quantiles("jetserve:decode_tokens_per_second", (0.05, 0.5, 0.95)),
                "Decode speed each request saw (a low percentile is the slow tail).",
            ),
            (
                "Time to first token",
                "s",
                _quantiles("jetserve:time_to_first_token_seconds"),
                "Queue time + prefill of the prompt.",
            ),
            (
                "Inter-token latency",
                "s",
                _quantiles("jetserve:inter_token_latency_seconds"),
                "Gap between streamed tokens of one request.",
            ),
            ("End-to-end request latency", "s", _quantiles("jetserve:e2e_request_latency_seconds", (0.5, 0.95)), ""),
            (
                "Queue",
                "short",
                [
                    _q(f"sum by (instance) (jetserve:num_requests_waiting{{{SEL}}})", "waiting {{instance}}"),
                    _q(f"sum by (instance) (jetserve:num_requests_running{{{SEL}}})", "running {{instance}}"),
                ],
                "Waiting requests turn into 429s once JETSERVE_MAX_QUEUE is reached.",
            ),
            ("Queue time", "s", _quantiles("jetserve:request_queue_time_seconds", (0.5, 0.95)), ""),
            (
                "Requests/s by outcome",
                "reqps",
                [
                    _q(
                        f"sum by (finish_reason) (rate(jetserve:request_success_total{{{SEL}}}[$__rate_interval]))",
                        "{{finish_reason}}",
                    ),
                    _q(
                        f"sum by (code) (rate(jetserve:request_errors_total{{{SEL}}}[$__rate_interval]))",
                        "error {{code}}",
                    ),
                ],
                "",
            ),
            (
                "KV cache usage",
                "percentunit",
                [
                    _q(f"jetserve:kv_cache_usage_ratio{{{SEL}}}", "{{model}}"),
                ],
                "Fraction of KV slots in use.",
            ),
        ],
    ),
    (
        "Memory",
        [
            (
                "Model memory vs budget",
                "bytes",
                [
                    _q(f"sum by (instance) (jetserve:memory_used_bytes{{{SEL}}})", "used {{instance}}"),
                    _q(f"sum by (instance) (jetserve:memory_budget_bytes{{{SEL}}})", "budget {{instance}}"),
                    _q(f"sum by (model, kind) (jetserve:model_memory_bytes{{{SEL}}})", "{{model}} {{kind}}"),
                ],
                "What jetserve accounts against JETSERVE_MEMORY_BUDGET (weights + KV cache + workspace).",
            ),
            (
                "GPU allocator",
                "bytes",
                [
                    _q(f"jetserve:gpu_memory_allocated_bytes{{{SEL}}}", "allocated cuda:{{device}}"),
                    _q(f"jetserve:gpu_memory_reserved_bytes{{{SEL}}}", "reserved cuda:{{device}}"),
                ],
                "torch.cuda caching allocator (no series on CPU).",
            ),
            (
                "Jetson RAM, NvMap, swap",
                "bytes",
                [
                    _q(f"jetserve:jetson_ram_used_bytes{{{SEL}}}", "RAM used"),
                    _q(f"jetserve:jetson_ram_total_bytes{{{SEL}}}", "RAM total"),
                    _q(f"jetserve:jetson_nvmap_bytes{{{SEL}}}", "NvMap (GPU carve-outs)"),
                    _q(f"jetserve:jetson_swap_used_bytes{{{SEL}}}", "swap used"),
                ],
                "Unified memory as the OS sees it; NvMap is memory the GPU driver holds.",
            ),
            (
                "Model loads and evictions",
                "short",
                [
                    _q(f"sum by (model) (increase(jetserve:model_loads_total{{{SEL}}}[$__range]))", "loads {{model}}"),
                    _q(
                        f"sum by (model) (increase(jetserve:model_evictions_total{{{SEL}}}[$__range]))",
                        "evictions {{model}}",
                    ),
                ],
                "",
            ),
            (
                "Model load time",
                "s",
                [
                    _q(f"jetserve:model_load_seconds{{{SEL}}}", "{{model}}"),
                ],
                "Duration of each loaded model's last load, warm-up included.",
            ),
        ],
    ),
    (
        "Jetson",
        [
            (
                "EMC (memory controller) and GPU utilization",
                "percentunit",
                [
                    _q(f"jetserve:jetson_emc_utilization_ratio{{{SEL}}}", "EMC"),
                    _q(f"jetserve:jetson_gpu_utilization_ratio{{{SEL}}}", "GPU"),
                ],
                "Decode is memory-bound: EMC near 1.0 means bandwidth is the limit.",
            ),
            (
                "GPU and EMC frequency",
                "hertz",
                [
                    _q(f"jetserve:jetson_gpu_frequency_hertz{{{SEL}}}", "GPU"),
                    _q(f"jetserve:jetson_gpu_max_frequency_hertz{{{SEL}}}", "GPU max"),
                    _q(f"jetserve:jetson_emc_frequency_hertz{{{SEL}}}", "EMC"),
                ],
                "Drops under load mean thermal or power capping (see nvpmodel / jetson_clocks).",
            ),
            (
                "Temperatures",
                "celsius",
                [
                    _q(f"jetserve:jetson_temperature_celsius{{{SEL}}}", "{{zone}}"),
                ],
                "",
            ),
            (
                "Power by rail",
                "watt",
                [
                    _q(f"jetserve:jetson_power_watts{{{SEL}}}", "{{rail}}"),
                    _q(f"jetserve:jetson_board_power_watts{{{SEL}}}", "board"),
                ],
                "INA3221/INA238 rails; board = VDD_IN/VIN rail, else the sum of rails.",
            ),
            (
                "Energy per generated token",
                "J",
                [
                    _q(f"jetserve:joules_per_token{{{SEL}}}", "J/token"),
                ],
                "Board power integrated over decode steps divided by generated tokens.",
            ),
            (
                "Memory bandwidth efficiency",
                "percentunit",
                [
                    _q(f"jetserve:bandwidth_efficiency_ratio{{{SEL}}}", "weights read / peak DRAM bandwidth"),
                ],
                "Weight bytes streamed per second of engine step time over the board's peak DRAM bandwidth.",
            ),
        ],
    ),
]


def build() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "type": "row",
                "title": row_title,
                "id": pid,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets, desc) in enumerate(row_panels):
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": pid,
                    "description": desc,
                    "datasource": DS,
                    "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)},
                    "fieldConfig": {
                        "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
                        "overrides": [],
                    },
                    "options": {
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"},
                    },
                    "targets": [{**t, "refId": chr(ord("A") + k)} for k, t in enumerate(targets)],
                }
            )
            pid += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "uid": "jetserve-overview",
        "title": "jetserve",
        "description": "jetserve on NVIDIA Jetson: throughput, latency, queue, memory vs budget, Jetson telemetry.",
        "tags": ["jetserve", "jetson", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "query": {"query": "label_values(jetserve:num_requests_running, instance)", "refId": "instance"},
                    "definition": "label_values(jetserve:num_requests_running, instance)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "sort": 1,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python deploy/grafana/make_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
