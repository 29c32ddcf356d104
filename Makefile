# One entry point for people and CI: `make serve`, `make test`. Everything goes into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test proto gpu-kit gpu-check gpu-rehearsal

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The same recipe as the Dockerfile's (scripts/install.sh), plus the dev extra, editable.
$(STAMP): $(BIN)/python pyproject.toml requirements/gfpgan-nodeps.txt requirements/reference-nodeps.txt scripts/install.sh
	PIP=$(BIN)/pip scripts/install.sh --dev --editable
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/gfpgan-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto:
	$(BIN)/python scripts/gen_proto.py

# The GPU check (BENCHMARKS.md, "The GPU check"): the kit of wheels the GPU machine lacks, the
# command to run there, and its CPU rehearsal in a Python 3.12 copy of that machine's packages.
gpu-kit:
	PYTHON=$(BIN)/python scripts/gpu_kit.sh

gpu-check:
	bash scripts/gpu_device.sh $(ARGS)

gpu-rehearsal:
	scripts/gpu_rehearsal.sh
