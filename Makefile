# Kvant: `make demo` runs the main job on the stand-in, `make test` runs the tests.
# Both set everything up on a fresh machine first (`make setup`, once).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVANT := $(VENV)/bin/kvant
# torch first, so that pip never swaps it: on machines with the CPU wheel on disk pip takes
# that; elsewhere PyPI's default (CUDA) build. Any torch >= 2.6 already installed is kept.
TORCH ?= torch==2.13.0
# llama-cpp-python ships only an sdist: build it with llama.cpp's tools (llama-quantize,
# llama-imatrix, llama-perplexity, llama-bench, llama-server in site-packages/bin; the server
# without its web UI, which would be downloaded) and Kvant's NorMistral tokenizer patch
# (patches/llama.cpp); the RPATH lets the tools find libllama. tools/llama_cpp_wheel.py builds
# it for this CPU, smoke-tests it with repacking on (falling back past a feature the CPU
# faults on) and keeps the wheel in pip's cache directory, keyed by the patch, these flags and
# the CPU, so each machine compiles once and later installs take seconds.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON \
	-DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_RPATH=$$ORIGIN/../lib
# GPU users get GPU llama.cpp: nvcc alone is not enough (CI images carry it without a GPU).
ifeq ($(shell command -v nvcc >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo y),y)
LLAMA_CMAKE_ARGS += -DGGML_CUDA=ON
endif

# Beside the checkout, ../shared/data holds the UD files and the calibration text: use them
# offline. Without it the text sets are downloaded (pinned commit, sha256-checked).
SHARED ?= ../shared/data
ifneq ($(wildcard $(SHARED)/ud/no_bokmaal-ud-test.conllu),)
export KVANT_DATA_DIR ?= $(abspath $(SHARED)/ud)
TRAIN_TEXT ?= $(abspath $(SHARED)/calib/nor.calib-1000.txt)
else
TRAIN_TEXT ?= nob-train,nno-train
endif

.DEFAULT_GOAL := help
.PHONY: help setup demo check test lint docs clean distclean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with torch, Kvant and every backend

$(VENV)/.installed: pyproject.toml patches/llama.cpp/normistral-tokenizer.patch \
		tools/llama_cpp_wheel.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) tools/llama_cpp_wheel.py
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

demo: setup ## the whole release recipe on the NorMistral stand-in: artifacts, bench, cards
	$(KVANT) release recipes/stand-in.toml --calib '$(TRAIN_TEXT)'

# The fast tier: what to run while working. Tests that use a model-building fixture are
# marked slow in tests/conftest.py (slow_fixtures); tests/core/test_tiers.py keeps it so.
CHECK_MARKERS := not slow

check: setup ## the fast tier (under 5 min): unit tests and a smoke run of every pipeline
	$(PY) -m pytest -m "$(CHECK_MARKERS)" --durations=10

test: setup ## the whole suite (what CI runs)
	$(PY) -m pytest --durations=30

docs: setup ## render every results table in README.md and docs/ from docs/results/*.json
	$(PY) tools/render_docs.py

lint: setup ## ruff, and the architecture's layers (tools/check_architecture.py)
	$(VENV)/bin/ruff check .
	$(PY) tools/check_architecture.py

clean: ## remove build and test leftovers
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean ## also remove .venv
	rm -rf $(VENV)
