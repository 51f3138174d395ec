# The README's two commands: `make demo` and `make test`. Everything is installed into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo bench llamacpp clean

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
# Then aligns a copy's MTP module with the trained main model for speculative decoding (runs/demo/mtp-distilled,
# about 1.5 minutes; the main weights stay bitwise the same).
demo: install
	rm -rf runs/demo
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dsv3 train --preset demo --data data/tinyshakespeare.txt --out runs/demo
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dsv3 distill-mtp --model runs/demo/latest --data data/tinyshakespeare.txt \
		--out runs/demo/mtp-distilled

bench: install
	$(PY) benchmarks/model_bench.py

# Optional: llama.cpp as a second reference in `dsv3 bench` and benchmarks/engine_bench.py (--llama-cpp).
# PyPI ships llama-cpp-python as source only: this builds llama.cpp (about 15 minutes on two cores) and
# unpacks llama.cpp's HF -> GGUF converter from the same source package into .cache/llamacpp.
LLAMACPP_VERSION ?= 0.3.36
llamacpp: install
	$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d .cache/llamacpp
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF" \
		$(PIP) install -q .cache/llamacpp/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
	$(PY) -m dsv3.commands.llamacpp unpack ".cache/llamacpp/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz" .cache/llamacpp

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
