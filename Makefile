# One-command entry points. Each target creates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch; a GPU image sets PIP_CONSTRAINTS= to take the platform's build.
PIP_CONSTRAINTS ?= -c constraints.txt
EXTRAS ?= dev
# Offline by default: nothing downloads weights or data at run time.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install system-deps demo lint test test-all bench reproduce bam clean gpu-check

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Debian packages some integration tests use (headless Chromium for the UI screenshots, the
# docker-compose client to validate the compose file). Best effort: without them those tests skip.
SYSTEM_PACKAGES ?= chromium docker-compose
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	      >/dev/null 2>&1 || echo "warning: could not install$$missing; the tests that need them will skip"; fi; \
	else echo "note: not root or no apt-get: tests needing $(SYSTEM_PACKAGES) will skip"; fi

demo: install
	$(PY) -m flows.demo

# Lint and format check (rules in pyproject.toml [tool.ruff]; `ruff format .` fixes the formatting).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint system-deps
	$(PY) -m pytest

test-all: lint system-deps
	$(PY) -m pytest -m ""

bench: install
	$(PY) -m benchmarks

# The paper's experiment in the paper's regime at CPU size (docs/results.md); e.g. `make reproduce ARGS="--seeds 0"`.
reproduce: install
	$(PY) -m flows.reproduce $(ARGS)

# BAM attention experts vs the FFN-only MoE (docs/results.md, "BAM: attention experts"); e.g.
# `make bam ARGS="--seeds 0"`.
bam: install
	$(PY) -m flows.bam $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs

# On a GPU machine (after `make install PIP_CONSTRAINTS=`): MoE parity and sync-free checks, layer
# throughput and memory at the 470m shape, bf16 training steps of the 470m MoE, the micro pipeline
# on the GPU; under 10 minutes on one GPU (benchmarks/gpu_check.py, results in benchmarks/results/).
gpu-check: install
	$(PY) -m benchmarks.gpu_check
