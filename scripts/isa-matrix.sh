#!/usr/bin/env bash
# Reruns the tests that touch packed int4 layouts and our C++ kernels under every other torch CPU capability this
# CPU can run (ATEN_CPU_CAPABILITY), so a layout or kernel assumption cannot pass on one ISA and fail on another.
# `--info` only prints the CPU and torch's capability (CI's first line). Each run gets a fresh inductor cache:
# inductor's cache key ignores ATEN_CPU_CAPABILITY, and GPTQModel's compiled dequantizer from another ISA crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
native=$("$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
model=$(lscpu | sed -n 's/^Model name: *//p')
flags=$(grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "CPU: ${model}; flags: ${flags:-none of avx2/avx512/amx}; torch CPU capability: ${native}"
[ "${1:-}" = "--info" ] && exit 0
case "$native" in
  AVX512*) others="avx2 default" ;;
  AVX2) others="default" ;;
  *) others="" ;;
esac
if [ -z "$others" ]; then
  echo "isa-matrix: no other capability below ${native} to force"
  exit 0
fi
for cap in $others; do
  echo "== layout tests under ATEN_CPU_CAPABILITY=${cap} (native: ${native})"
  cache=$(mktemp -d)
  ATEN_CPU_CAPABILITY=$cap TORCHINDUCTOR_CACHE_DIR=$cache "$PY" -m pytest -q -p no:cacheprovider \
    tests/unit/test_kernels.py tests/unit/test_qlinear.py tests/unit/test_formats.py tests/unit/test_model_quant.py \
    tests/unit/test_w4a8.py tests/unit/test_attention.py tests/unit/test_fused.py
  rm -rf "$cache"
done
