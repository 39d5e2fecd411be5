# vlmtune: the two commands a fresh clone needs.
#   make demo   set up, then run the whole pipeline on this machine (tiny model + synthetic data, kfp.local)
#   make test   set up, then run the test suite (the same command CI runs)
PYTHON ?= python3
VENV ?= .venv
LINT_VENV ?= .venv-lint
BIN := $(VENV)/bin
WORKDIR ?= demo-workdir

.PHONY: setup setup-lint demo test test-all

$(BIN)/vlmtune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the CPU build on this disk; an open range would pull GBs of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/vlmtune

# hadolint/checkov live in their own venv: checkov pins packaging/boto3 versions that clash with the project's.
$(LINT_VENV)/bin/checkov: requirements-lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install --quiet -r requirements-lint.txt
	touch $@

setup-lint: $(LINT_VENV)/bin/checkov

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/vlmtune demo --workdir $(WORKDIR)

# The default tier plus the container tier: tests/pipelines/test_containers.py builds the CPU image with podman on a
# debootstrap base and runs prepare-data in it (skipped, saying why, where podman/buildah/debootstrap are absent).
test: setup setup-lint
	VLMTUNE_LINT_BIN=$(abspath $(LINT_VENV))/bin $(BIN)/python -m pytest -m "not slow and not gpu"

# Also the slow tier.
test-all: setup setup-lint
	VLMTUNE_LINT_BIN=$(abspath $(LINT_VENV))/bin $(BIN)/python -m pytest -m "not gpu"
