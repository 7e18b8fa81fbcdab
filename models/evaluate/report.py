"""Markdown tables, JSON and a PNG chart from `compare.evaluate_models` results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

MIB = 1024 * 1024


def _label(q: Dict[str, Any]) -> str:
    m = q.get("method") or "none"
    if m == "none":
        return str(q.get("dtype") or "fp")
    sym = q.get("sym")
    grid = "" if sym is None else (" sym" if sym else " asym")
    if m == "awq":
        grid = " zp" if q.get("zero_point") else " no-zp"
    act = " act-order" if q.get("desc_act") else ""
    return f"{m.upper()} {q.get('bits')}-bit g{q.get('group_size')}{grid}{act}"


def _ref(models: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return next((m for m in models if m["quant"].get("method") == "none"), None)


def _fmt(v, spec: str, missing: str = "–") -> str:
    return missing if v is None else format(v, spec)


def markdown(res: Dict[str, Any]) -> str:
    p = res["protocol"]
    env = res["environment"]
    models = res["models"]
    ref = _ref(models)
    out = [
        f"Runtime `{p['runtime']}` on {p['device']} ({env.get('cpu') or env.get('machine')}, "
        f"{env.get('torch_threads')} torch threads), dtype {p['dtype']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "",
    ]
    if any("ppl" in m for m in models):
        out += [
            f"**Perplexity** — first {p['ppl_tokens']} tokens of `{p['text']}`, max_length {p['max_length']}, "
            f"stride {p['stride']} (sliding window; exact per-token NLL mean)",
            "",
            "| model | quantization | perplexity | vs bf16 | scored tokens |",
            "|---|---|---|---|---|",
        ]
        for m in models:
            if "ppl" not in m:
                continue
            rel = "–" if ref is None or m is ref or "ppl" not in ref else f"{(m['ppl'] / ref['ppl'] - 1) * 100:+.1f}%"
            out.append(f"| {m['name']} | {_label(m['quant'])} | {m['ppl']:.2f} | {rel} | {m['ppl_scored_tokens']} |")
        out.append("")
    if any("decode_tok_s_median" in m for m in models):
        out += [
            f"**Speed** — batch 1, greedy; decode: {p['new_tokens']} new tokens after a {p['prompt_tokens']}-token "
            f"prompt, median (min–max) of {p['runs']} runs after {p['warmup_runs']} warm-up; TTFT: "
            f"{p['ttft_prompt_tokens']}-token prompt, median",
            "",
            "| model | decode tok/s | min–max | vs bf16 | TTFT (ms) |",
            "|---|---|---|---|---|",
        ]
        for m in models:
            if "decode_tok_s_median" not in m:
                continue
            rel = (
                "–"
                if ref is None or m is ref or "decode_tok_s_median" not in ref
                else f"{m['decode_tok_s_median'] / ref['decode_tok_s_median']:.2f}x"
            )
            out.append(
                f"| {m['name']} | {m['decode_tok_s_median']:.1f} | {m['decode_tok_s_min']:.1f}–"
                f"{m['decode_tok_s_max']:.1f} | {rel} | {m['ttft_ms_median']:.0f} |"
            )
        out.append("")
    kind = models[0].get("peak_memory_kind", "") if models else ""
    peak_name = "peak RSS (MiB)" if kind == "process_rss" else "peak CUDA allocated (MiB)"
    out += [
        "**Memory** — weights: bytes of the loaded parameters and buffers; peak: "
        + (
            "process RSS sampled every 5 ms while loading and measuring (the process also holds Python, torch and "
            "the tokenized text: compare differences)"
            if kind == "process_rss"
            else "torch.cuda.max_memory_allocated"
        )
        + "; disk: safetensors files",
        "",
        f"| model | weights (MiB) | {peak_name} | on disk (MiB) |",
        "|---|---|---|---|",
    ]
    for m in models:
        out.append(
            f"| {m['name']} | {m['weights_bytes'] / MIB:.1f} | {m['peak_memory_bytes'] / MIB:.0f} | "
            f"{m['weights_on_disk'] / MIB:.1f} |"
        )
    out.append("")
    return "\n".join(out)


def write_outputs(res: Dict[str, Any], out_dir: Path, stem: str = "eval") -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(res, indent=2) + "\n")
    paths["md"].write_text(markdown(res))
    chart(res, paths["png"])
    return paths


def chart(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = res["models"]
    names = [m["name"] for m in models]
    panels = []
    if any("ppl" in m for m in models):
        panels.append(("perplexity (lower is better)", [m.get("ppl", 0.0) for m in models]))
    if any("decode_tok_s_median" in m for m in models):
        panels.append(("decode tok/s (higher is better)", [m.get("decode_tok_s_median", 0.0) for m in models]))
    panels.append(("weights MiB", [m["weights_bytes"] / MIB for m in models]))
    panels.append(("peak memory MiB", [m["peak_memory_bytes"] / MIB for m in models]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (title, vals) in zip(axes, panels):
        ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"jetserve eval — runtime {res['protocol']['runtime']} on {res['protocol']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
