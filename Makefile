# The two commands in the README:
#   make serve   -> installs into .venv, prepares the served demo model (bf16 + GPTQ g64), serves it on 127.0.0.1:8000
#   make test    -> installs into .venv (with dev extras), prepares GPTQ g64 and AWQ g64 of the first 2 layers
#                   (awq-g64-l2), runs the suite, then reruns the int4-layout and kernel tests under the other CPU ISAs
# GPTQModel's AWQ of the whole model takes 7-30 min on a 2-core CPU even at 8 x 256 calibration tokens, so only
# `make demo` (and `make bench`) write the whole awq-g64 variant.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jetserve-installed
export GPTQMODEL_CPU_WORKERS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: serve test lint install system-deps demo peer bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24" -c constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[quantize,eval,dev]"
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

demo: $(STAMP)
	$(VENV)/bin/jetserve demo prepare

serve: $(STAMP)
	$(VENV)/bin/jetserve demo prepare --variants gptq-g64
	$(VENV)/bin/jetserve serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) system-deps lint
	$(VENV)/bin/jetserve demo prepare --variants gptq-g64 awq-g64-l2
	$(PY) -m pytest $(PYTEST_ARGS)
	PY=$(PY) bash scripts/isa-matrix.sh

# the speed peer: llama-cpp-python from the `peer` extra, built from source with CPU flags that work here
peer: $(STAMP)
	PY=$(PY) bash scripts/install-llama-cpp.sh

bench: demo peer
	$(PY) benchmarks/decode.py

clean-venv:
	rm -rf $(VENV)
