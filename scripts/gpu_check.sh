#!/usr/bin/env bash
# GPU check for the fused runtime (< 8 min on a fresh H100; no network, no pip installs).
#   OUT=/some/dir bash scripts/gpu_check.sh
# Runs the GPU-marked parity tests and scripts/gpu_bench.py (Llama-2-7B-shaped W4 g128, random weights),
# writes $OUT/gpu_results.json and prints a short table last. A failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$(pwd)/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

echo "== environment"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/gpu_env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PYEOF

echo "== gpu tests"
# only the files that hold GPU tests: the device image lacks the serving stack (pydantic, openai, ...)
# and no model store (too large to travel): test_manager_real's CUDA memory check stays unmeasured there
GPU_FILES=$(grep -rlE "mark\.gpu" tests/ --include='test_*.py' | grep -v test_manager_real | sort)
timeout 300 "$PY" -m pytest -m gpu $GPU_FILES -q -rs -p no:cacheprovider \
    -o addopts="" --junitxml="$OUT/gpu_pytest.xml" 2>&1 | tail -n 60 | tee "$OUT/gpu_pytest.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_pytest.log"

echo "== gpu bench"
timeout 240 "$PY" scripts/gpu_bench.py --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
echo "bench exit: $?"
tail -n 5 "$OUT/gpu_bench.log"

"$PY" scripts/gpu_summary.py "$OUT"
