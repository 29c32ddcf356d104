# One entry point for people and CI: `make serve`, `make test`. Everything goes into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The same recipe as the Dockerfile's (scripts/install.sh), plus the dev extra, editable.
$(STAMP): $(BIN)/python pyproject.toml requirements/gfpgan-nodeps.txt scripts/install.sh
	PIP=$(BIN)/pip scripts/install.sh --dev --editable
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/gfpgan-serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto:
	$(BIN)/python scripts/gen_proto.py
