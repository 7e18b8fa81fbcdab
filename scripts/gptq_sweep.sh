#!/usr/bin/env bash
# GPTQ settings sweep on SmolLM2-135M-Instruct (reduced protocol; see docs/benchmarks.md "GPTQ sweep").
#   calibration: c4, $NS samples x $SL tokens, seed 0      (full protocol: 64 x 512)
#   evaluation:  first $PPL tokens of wiki.utf8, max_length 2048, stride 512, transformers runtime, bf16
# Every point is `jetserve quantize` + `jetserve eval`; results land in $OUT/<name>.json and $OUT/sweep.md.
# Points without "sink" in their name are plain GPTQ (--sink-weight 1); jetserve's default is the sink128 point.
# Usage: scripts/gptq_sweep.sh [point ...]   (default: all points). Needs `jetserve demo prepare` first.
set -euo pipefail
cd "$(dirname "$0")/.."
JS=${JS:-.venv/bin/jetserve}
STORE=${JETSERVE_MODEL_STORE:-model-store}
BASE=$STORE/smollm2-135m-instruct
NS=${NS:-16}
SL=${SL:-512}
PPL=${PPL:-8192}
OUT=${OUT:-$STORE/results/sweep-c4-${NS}x${SL}-ppl${PPL}}
Q=$STORE/sweep
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}
mkdir -p "$OUT" "$Q"

declare -A POINTS=(
  [bf16]="none"
  [rtn-g64-sym]="--method rtn --group-size 64 --sym"
  [rtn-g64-asym]="--method rtn --group-size 64 --asym"
  [rtn-g32-asym]="--method rtn --group-size 32 --asym"
  [gptq-g64-sym-actorder-damp0.01]="--method gptq --group-size 64 --sym --desc-act --damp-percent 0.01 --sink-weight 1"
  [gptq-g64-sym-gar-damp0.05]="--method gptq --group-size 64 --sym --no-desc-act --act-group-aware --damp-percent 0.05 --sink-weight 1"
  [gptq-g64-asym-damp0.01]="--method gptq --group-size 64 --asym --no-desc-act --no-act-group-aware --damp-percent 0.01 --sink-weight 1"
  [gptq-g64-asym-actorder-damp0.01]="--method gptq --group-size 64 --asym --desc-act --damp-percent 0.01 --sink-weight 1"
  [gptq-g64-asym-gar-damp0.01]="--method gptq --group-size 64 --asym --no-desc-act --act-group-aware --damp-percent 0.01 --sink-weight 1"
  [gptq-g64-asym-damp0.1]="--method gptq --group-size 64 --asym --no-desc-act --no-act-group-aware --damp-percent 0.1 --sink-weight 1"
  [gptq-g64-asym-mse2.4]="--method gptq --group-size 64 --asym --no-desc-act --no-act-group-aware --damp-percent 0.01 --mse 2.4 --sink-weight 1"
  [gptq-g32-asym-damp0.01]="--method gptq --group-size 32 --asym --no-desc-act --no-act-group-aware --damp-percent 0.01 --sink-weight 1"
  [gptq-g64-asym-sink128]="--method gptq --group-size 64 --asym --no-desc-act --no-act-group-aware --damp-percent 0.01 --sink-weight 128"
  [gptq-g64-asym-sink512]="--method gptq --group-size 64 --asym --no-desc-act --no-act-group-aware --damp-percent 0.01 --sink-weight 512"
  [awq-g64-zp]="--method awq --group-size 64 --zero-point"
)
ORDER=(bf16 rtn-g64-sym rtn-g64-asym rtn-g32-asym gptq-g64-asym-damp0.01 gptq-g64-sym-actorder-damp0.01
       gptq-g64-sym-gar-damp0.05 gptq-g64-asym-gar-damp0.01 gptq-g64-asym-actorder-damp0.01 gptq-g64-asym-mse2.4
       gptq-g64-asym-damp0.1 gptq-g32-asym-damp0.01 gptq-g64-asym-sink128 gptq-g64-asym-sink512 awq-g64-zp)
[ $# -gt 0 ] && ORDER=("$@")

for name in "${ORDER[@]}"; do
  args=${POINTS[$name]}
  if [ "$args" = none ]; then model=$BASE; else model=$Q/$name; fi
  if [ "$args" != none ] && [ ! -f "$model/config.json" ]; then
    # shellcheck disable=SC2086
    $JS quantize "$BASE" "$model" $args --calib c4 --nsamples "$NS" --seqlen "$SL" --seed 0 --overwrite \
      > "$OUT/$name.quantize.log" 2>&1
  fi
  if [ ! -f "$OUT/$name.json" ]; then
    $JS eval "$model" --skip-speed --ppl-tokens "$PPL" --max-length 2048 --stride 512 --out "$OUT" --name "$name" \
      > "$OUT/$name.eval.log" 2>&1
  fi
  grep -h "^\[.*perplexity" "$OUT/$name.eval.log" | tail -1
done

.venv/bin/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for f in sorted(out.glob("*.json")):
    m = json.loads(f.read_text())["models"][0]
    spec = (m["quant"].get("jetserve_spec") or {})
    rows.append((f.stem, m["ppl"], m["quant"].get("quantize_seconds"), spec))
ref = next((r[1] for r in rows if r[0] == "bf16"), None)
lines = ["| point | perplexity | vs bf16 | quantize time (s) |", "|---|---|---|---|"]
for name, ppl, secs, _ in sorted(rows, key=lambda r: r[1]):
    rel = "–" if ref is None or name == "bf16" else f"{(ppl / ref - 1) * 100:+.1f}%"
    lines.append(f"| {name} | {ppl:.2f} | {rel} | {secs if secs is not None else '–'} |")
(out / "sweep.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
