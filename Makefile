# The two commands in the README:
#   make serve   -> installs into .venv, prepares the demo model store, serves it on 127.0.0.1:8000
#   make test    -> installs into .venv (with dev extras), prepares the demo store, runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jetserve-installed
export GPTQMODEL_CPU_WORKERS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: serve test install system-deps demo bench clean-venv

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

serve: demo
	$(VENV)/bin/jetserve serve

test: $(STAMP) system-deps demo
	$(PY) -m pytest $(PYTEST_ARGS)

bench: demo
	$(PY) benchmarks/decode.py

clean-venv:
	rm -rf $(VENV)
