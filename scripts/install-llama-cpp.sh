#!/usr/bin/env bash
# Build llama-cpp-python (the speed peer of `make bench`) from source into the venv, with CPU flags that work on
# this machine: GGML_NATIVE=ON, except on a CPU with AMX, where the native build crashes (llama.cpp's AMX path);
# there native and AMX are off and AVX2/AVX-512 are on explicitly. Not part of `make test`; about 10 min on 2 cores.
# Usage: PY=.venv/bin/python bash scripts/install-llama-cpp.sh   (CMAKE_ARGS from the environment wins)
set -euo pipefail
PY=${PY:-.venv/bin/python}
if "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already installed: $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi
if [ -z "${CMAKE_ARGS:-}" ]; then
    if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    else
        CMAKE_ARGS="-DGGML_NATIVE=ON"
    fi
fi
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "building llama-cpp-python with CMAKE_ARGS=$CMAKE_ARGS"
"$PY" -m pip install -q -c constraints.txt -e ".[peer]"
