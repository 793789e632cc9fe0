# The two commands of the README.  Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch 2.13.0 is what the test machines have locally; for a GPU install
# see the README ("Install") and override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
ARGS   ?=
CONFIG ?= configs/default.yaml
PYTEST_ARGS ?=

BIN    := $(VENV)/bin
STAMP  := $(VENV)/.optimlib-installed
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP    := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: pretrain test install clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	# deepspeed ships as an sdist whose setup.py imports torch: build it against the torch
	# installed above (build isolation would pull the newest CUDA torch instead).
	$(PIP) install -q $(FIND_LINKS) --no-build-isolation -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

pretrain: $(STAMP)
	$(BIN)/python launch/pretrain.py --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Every GPU figure in one call of <= 9 minutes (launch/gpu_check.py; docs/benchmarks.md), on the
# machine's own Python, torch and Triton: no venv, nothing downloaded.  The editable install may
# fail offline (it needs setuptools); the script then imports this tree without it.
GPU_PYTHON ?= python3
gpu-check:
	-$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_PYTHON) launch/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
