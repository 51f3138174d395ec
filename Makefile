# The README's two commands: `make demo` and `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch first and pinned: 2.13.0 is the CPU build on these machines (an unpinned torch pulls CUDA wheels).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,serve,plot]"
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Trains the `demo` preset (2.3M parameters, 2048-token BPE) on the bundled corpus, then prints samples.
# PASSIVE: OpenMP threads sleep instead of spinning when a core is taken by another process.
demo: install
	rm -rf runs/demo
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dsv3 train --preset demo --data data/tinyshakespeare.txt --out runs/demo

bench: install
	$(PY) benchmarks/model_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
