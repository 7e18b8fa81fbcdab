#!/usr/bin/env bash
# Reproduce the tables of docs/benchmarks.md (quantization quality, speed, memory) in one command:
#   scripts/reproduce_benchmarks.sh
# Protocol (the issue's): calibration c4 NS x SL tokens (64 x 512), seed 0; evaluation: first PPL (32768)
# tokens of wiki.utf8, max_length 2048, stride 512; decode: 256 new tokens, batch 1, median of RUNS runs after a
# warm-up; TTFT on a 512-token prompt. Every model is evaluated in ONE `jetserve eval` process.
# Runtime: jetserve's own (default; perplexity within 0.5% of transformers, tests/integration/test_runtime_parity.py)
# or RUNTIME=transformers (transformers + GPTQModel kernels).
# Reduced runs for a busy machine: NS=16 PPL=8192 RUNS=3 scripts/reproduce_benchmarks.sh
# Also runs the GPTQ sweep when SWEEP=1 (scripts/gptq_sweep.sh, reduced protocol).
set -euo pipefail
cd "$(dirname "$0")/.."
JS=${JS:-.venv/bin/jetserve}
STORE=${JETSERVE_MODEL_STORE:-model-store}
NS=${NS:-64}
SL=${SL:-512}
PPL=${PPL:-32768}
RUNS=${RUNS:-5}
RUNTIME=${RUNTIME:-jetserve}
OUT=${OUT:-$STORE/results/bench-c4-${NS}x${SL}-ppl${PPL}-${RUNTIME}}
BASE=$STORE/smollm2-135m-instruct
B=$STORE/bench-c4-${NS}x${SL}
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2}

$JS demo prepare --store "$STORE"
mkdir -p "$B" "$OUT"
quant() {  # name, args...
  local name=$1; shift
  if [ ! -f "$B/$name/config.json" ]; then
    $JS quantize "$BASE" "$B/$name" "$@" --overwrite
  fi
}
# jetserve defaults for GPTQ (asym, no act-order, damp 0.01, sink weight 128) and AWQ (zero point); g64 like the demo.
quant gptq-g64 --method gptq --group-size 64 --calib c4 --nsamples "$NS" --seqlen "$SL" --seed 0
quant awq-g64 --method awq --group-size 64 --calib c4 --nsamples "$NS" --seqlen "$SL" --seed 0
quant rtn-g64 --method rtn --group-size 64 --asym

$JS eval "$BASE" "$B/gptq-g64" "$B/awq-g64" "$B/rtn-g64" --runtime "$RUNTIME" --text wiki --ppl-tokens "$PPL" \
  --max-length 2048 --stride 512 --max-new-tokens 256 --ttft-tokens 512 --runs "$RUNS" --out "$OUT" --name benchmarks

if [ "${SWEEP:-0}" = 1 ]; then scripts/gptq_sweep.sh; fi
echo "tables: $OUT/benchmarks.md  json: $OUT/benchmarks.json  chart: $OUT/benchmarks.png"
