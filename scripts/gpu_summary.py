"""Merge the outputs of scripts/gpu_check.sh into $OUT/gpu_results.json and print a short table."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(out: Path) -> int:
    res = {"env": (out / "gpu_env.txt").read_text().strip() if (out / "gpu_env.txt").is_file() else None}
    log = (out / "gpu_pytest.log").read_text() if (out / "gpu_pytest.log").is_file() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", log)}
    res["tests"] = counts
    bench = out / "gpu_bench.json"
    res["bench"] = json.loads(bench.read_text()) if bench.is_file() else None
    (out / "gpu_results.json").write_text(json.dumps(res, indent=1))
    print("\n| item | value |\n|---|---|")
    print(f"| environment | {(res['env'] or 'n/a').splitlines()[-1] if res['env'] else 'n/a'} |")
    print(f"| gpu tests | {counts or 'no result'} |")
    b = res["bench"]
    if b:
        print(f"| copy bandwidth (read+write) | {b['copy_GBps']:.0f} GB/s |")
        print(
            f"| 7B W4 g128 batch-1 decode | {b['tok_s']['1']:.1f} tok/s, {b['b1_GBps']:.0f} GB/s = "
            f"{100 * b['b1_frac_of_copy_bw']:.0f}% of copy |"
        )
        print(f"| eager batch 1 (no graph) | {b['eager_b1_tok_s']:.1f} tok/s |")
        print("| tok/s batch 1/2/4/8 | " + " / ".join(f"{b['tok_s'][k]:.0f}" for k in ("1", "2", "4", "8")) + " |")
        for name, kb in b.get("kernels", {}).items():
            if "tok_s" not in kb:
                print(f"| {name} | {kb.get('error')} |")
                continue
            micro = ", ".join(f"{s} {v['GBps']:.0f}" for s, v in kb.get("micro_m1", {}).items())
            print(
                f"| {name} | b1 {kb['tok_s']['1']:.0f} tok/s ({100 * kb['b1_frac_of_copy_bw']:.0f}% of copy), "
                f"b8 {kb['tok_s']['8']:.0f} tok/s; M=1 GB/s: {micro} |"
            )
    else:
        print("| bench | failed (see gpu_bench.log) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
