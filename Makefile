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

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m nexus.demo

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ""

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache outputs
